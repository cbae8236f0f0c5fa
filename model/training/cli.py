"""``deepvit train`` and ``deepvit evaluate`` (torch needed; the heavy modules are imported when run).

Every default of ``deepvit train`` is the official recipe's (see :mod:`.settings`); the parser takes
them from :class:`.settings.TrainSettings` so that the help and the code cannot disagree.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any


def _defaults() -> dict[str, Any]:
    # model.settings is plain dataclasses (no torch), so building the parser stays cheap for every command.
    from .settings import TrainSettings

    return {f.name: f.default for f in dataclasses.fields(TrainSettings) if f.default is not dataclasses.MISSING}


def _model_choice(p: argparse.ArgumentParser, what: str) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--arch", help=f"an official variant, e.g. deepvit_S ({what})")
    g.add_argument("--model-config", type=Path, metavar="FILE.json", help=f"a config in the official fields ({what})")


def register(sub: Any) -> None:
    d = _defaults()
    p = sub.add_parser(
        "train",
        help="train or fine-tune on an image folder (DATA/train/<class>/*, DATA/val/<class>/*); torchrun for DDP",
        description="Defaults are the official DeiT/DeepViT recipe. Under torchrun --nproc_per_node N it runs "
        "DistributedDataParallel (NCCL on GPUs, gloo on the CPU); --batch-size is per process and the "
        "learning rate, unless --lr is given, is base-lr x batch-size x processes / 512.",
    )
    p.add_argument("--data", type=Path, required=True, metavar="DIR")
    p.add_argument("--output", type=Path, required=True, metavar="DIR", help="checkpoints, log.jsonl, curves.png")
    _model_choice(p, "not needed with --resume")
    p.add_argument("--init", type=Path, metavar="CHECKPOINT", help="fine-tune from these weights (new head if needed)")
    p.add_argument("--init-ema", action="store_true", help="take --init's EMA weights")
    p.add_argument("--resume", type=Path, metavar="CHECKPOINT", help="continue exactly, e.g. OUTPUT/last.pth.tar")
    g = p.add_argument_group("schedule and optimizer (AdamW, cosine with warm-up)")
    _num(g, d, "epochs", int)
    _num(g, d, "batch_size", int, "per process")
    _num(g, d, "eval_batch_size", int, "default 2 x --batch-size")
    _num(g, d, "lr", float, "absolute; default --base-lr x global batch / 512")
    for name in ("base_lr", "min_lr", "warmup_lr", "weight_decay", "opt_eps"):
        _num(g, d, name, float)
    _num(g, d, "warmup_epochs", int)
    _num(g, d, "clip_grad", float, "max gradient norm; default off")
    g = p.add_argument_group("regularisation and augmentation (timm)")
    for name in ("drop_path", "smoothing", "mixup", "cutmix", "mixup_prob", "mixup_switch_prob", "color_jitter"):
        _num(g, d, name, float)
    g.add_argument(
        "--aa", dest="auto_augment", default=d.get("auto_augment"), help=f"default {d.get('auto_augment')}; 'none': off"
    )
    for name in ("reprob", "hflip"):
        _num(g, d, name, float)
    for name, what in (("scale", "random-resized-crop area"), ("ratio", "random-resized-crop aspect ratio")):
        lo, hi = d[name]
        shown = f"{what}; default {lo:.3g} {hi:.3g}"
        g.add_argument(f"--{name}", type=float, nargs=2, default=d.get(name), metavar=("LO", "HI"), help=shown)
    g.add_argument("--remode", default=d.get("remode"), help=f"random-erasing mode; default {d.get('remode')}")
    _num(g, d, "recount", int)
    g.add_argument("--train-interpolation", default=d.get("train_interpolation"), choices=["bicubic", "bilinear"])
    g = p.add_argument_group("EMA, Re-attention BatchNorm recalibration, machinery")
    g.add_argument("--ema", action=argparse.BooleanOptionalAction, default=d.get("ema"), help="keep a model EMA")
    _num(g, d, "ema_decay", float)
    _num(g, d, "recalibrate_batches", int, "training batches to re-estimate var_norm statistics on; 0 = off")
    g.add_argument("--amp", action=argparse.BooleanOptionalAction, default=d.get("amp"), help="fp16 AMP (CUDA only)")
    g.add_argument("--device", choices=["auto", "cpu", "cuda"], default=d.get("device"))
    _num(g, d, "workers", int, "data loader processes per training process")
    _num(g, d, "seed", int)
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=d.get("progress"))
    p.set_defaults(handler=_train, model_side=True)

    p = sub.add_parser(
        "evaluate", help="top-1/top-5 of a checkpoint (official eval transform) or of a model.onnx (service path)"
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", type=Path)
    src.add_argument("--artifact", type=Path, metavar="model.onnx")
    p.add_argument("--ema", action="store_true", help="the checkpoint's EMA weights")
    _model_choice(p, "default: the config a deepvit train checkpoint carries")
    p.add_argument("--data", type=Path, required=True, metavar="DIR", help="one folder of images per class")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--provider", choices=["cpu", "cuda"], default="cpu", help="ONNX Runtime provider (--artifact)")
    p.add_argument(
        "--predictions",
        type=Path,
        metavar="FILE.jsonl",
        help="also write one line per image: its path, target and top-5 predictions (label, class_id, "
        "softmax score), as /classify answers them",
    )
    p.set_defaults(handler=_evaluate, model_side=True)


def _num(g: Any, d: dict[str, Any], name: str, kind: type, note: str = "") -> None:
    """A numeric option whose help shows the official default (or the note, for unset defaults)."""
    default = d.get(name)
    shown = note if default is None else f"default {default}" + (f"; {note}" if note else "")
    metavar = "N" if kind is int else "X"
    g.add_argument("--" + name.replace("_", "-"), type=kind, default=default, metavar=metavar, help=shown)


def _fail(command: str, exc: Exception) -> int:
    print(f"deepvit {command}: error: {exc}", file=sys.stderr)
    return 2


def _log(msg: str) -> None:
    print(f"deepvit: {msg}", file=sys.stderr, flush=True)


def _train(args: argparse.Namespace) -> int:
    from . import distributed
    from .folders import DatasetError
    from .loop import TrainingError, train
    from .settings import TrainSettings

    names = {f.name for f in dataclasses.fields(TrainSettings)}
    values: dict[str, Any] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k in names}
    values["scale"], values["ratio"] = tuple(values["scale"]), tuple(values["ratio"])
    if values.get("auto_augment") in ("none", ""):
        values["auto_augment"] = None
    try:
        settings = TrainSettings(**values)
    except ValueError as exc:
        return _fail("train", exc)
    d = distributed.setup(settings.device)
    try:
        train(settings, d, log=_log if d.is_main else lambda _msg: None)
    except (DatasetError, TrainingError) as exc:
        return _fail("train", exc)
    finally:
        distributed.teardown(d)
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from ..checkpoint import WeightsKind
    from ..config import DeepViTConfig, get_config
    from .evaluation import EvaluationError, evaluate_artifact, evaluate_checkpoint
    from .folders import DatasetError

    try:
        if args.artifact is not None:
            if args.ema or args.arch or args.model_config:
                return _fail("evaluate", ValueError("--ema, --arch and --model-config go with --checkpoint"))
            report = evaluate_artifact(args.artifact, args.data, args.batch_size, args.workers, args.provider)
        else:
            cfg = get_config(args.arch) if args.arch else None
            if args.model_config is not None:
                cfg = DeepViTConfig.from_json(args.model_config)
            weights: WeightsKind = "ema" if args.ema else "state_dict"
            report = evaluate_checkpoint(
                args.checkpoint, args.data, cfg, args.arch or "custom", weights, args.batch_size, args.workers
            )
    except (DatasetError, EvaluationError) as exc:
        return _fail("evaluate", exc)
    if args.predictions is not None:
        with open(args.predictions, "w", encoding="utf-8") as f:
            for row in report.prediction_rows():
                f.write(json.dumps(row) + "\n")
    print(json.dumps(report.to_dict(), indent=2))
    c = report.counts
    _log(f"{report.source} top-1 {c.top1:.2%}, top-5 {c.top5:.2%} on {int(c.count)} images")
    return 0
