"""``deepvit analyze``: attention collapse of a checkpoint (or of random weights) on a folder of images.

The images go through the official evaluation transform, as ``deepvit evaluate --checkpoint`` feeds them;
labels are not needed, so any folder works (class sub-folders included, searched recursively).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from ..config import DeepViTConfig
    from ..net import DeepViT

DEFAULT_IMAGES = 500


def register(sub: Any) -> None:
    p = sub.add_parser(
        "analyze",
        help="attention collapse (Zhou et al. 2021): cross-block similarity of attention maps on images",
        description="Runs the model over images (the official evaluation transform) and averages the paper's "
        "cross-block similarity M(p,q) = cos(A^p[h,:,t], A^q[h,:,t]) over heads, tokens and images, for the "
        "maps each block applies and, in Re-attention blocks, for the softmax maps before the head mixing. "
        "Writes OUTPUT/report.json and OUTPUT/attention_similarity.png and prints a table.",
    )
    w = p.add_mutually_exclusive_group(required=True)
    w.add_argument("--checkpoint", type=Path, help="official .pth.tar, a state dict, or a deepvit train checkpoint")
    w.add_argument("--random-init", action="store_true", help="untrained weights (needs --arch or --model-config)")
    p.add_argument("--ema", action="store_true", help="the checkpoint's EMA weights (state_dict_ema)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--arch", help="an official variant (default: the config a deepvit train checkpoint carries)")
    g.add_argument("--model-config", type=Path, metavar="FILE.json", help="a config in the official field names")
    p.add_argument("--data", type=Path, required=True, metavar="DIR", help="images, searched recursively")
    p.add_argument(
        "--images", type=int, default=DEFAULT_IMAGES, metavar="N",
        help=f"analyse N images spread evenly over the sorted files (default {DEFAULT_IMAGES}; all when fewer)",
    )  # fmt: skip
    p.add_argument("--threshold", type=float, default=0.9, help="a block is similar to the next above it (0.9)")
    p.add_argument("--output", type=Path, required=True, metavar="DIR", help="report.json and the PNG go here")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--workers", type=int, default=2, help="data loader processes")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--seed", type=int, default=0, help="seed for --random-init")
    p.add_argument("--name", help="what the report and plot call the model (default: the arch or file name)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="a progress bar")
    p.set_defaults(handler=_analyze, model_side=True)


def _log(msg: str) -> None:
    print(f"deepvit: {msg}", file=sys.stderr, flush=True)


def _fail(msg: str) -> int:
    print(f"deepvit analyze: error: {msg}", file=sys.stderr)
    return 2


def _given_config(args: argparse.Namespace) -> tuple[str, DeepViTConfig | None]:
    from ..config import DeepViTConfig, get_config

    if args.model_config is not None:
        return "custom", DeepViTConfig.from_json(args.model_config)
    if args.arch is not None:
        return args.arch, get_config(args.arch)
    return "custom", None


def _model(args: argparse.Namespace) -> tuple[DeepViT, dict[str, Any]]:
    """The model to analyse and what the report says about it."""
    import torch

    from ..checkpoint import WeightsKind, model_from_checkpoint, read_checkpoint, sha256_of
    from ..config import ConfigError
    from ..net import DeepViT

    arch, cfg = _given_config(args)
    if args.random_init:
        if args.ema:
            raise ConfigError("--ema needs --checkpoint")
        if cfg is None:
            raise ConfigError("--random-init needs --arch or --model-config")
        torch.manual_seed(args.seed)
        _log("WARNING: random initial weights (--random-init): the maps are those of an untrained model")
        return DeepViT(cfg).eval(), {"weights": "random_init", "seed": args.seed, "arch": arch}
    weights: WeightsKind = "ema" if args.ema else "state_dict"
    _log(f"reading checkpoint {args.checkpoint}…")
    obj = read_checkpoint(args.checkpoint)
    model = model_from_checkpoint(obj, args.checkpoint, cfg, arch, weights)
    if cfg is None and isinstance(obj, dict):
        arch = str(obj.get("arch", arch))
    about: dict[str, Any] = {
        "weights": weights,
        "checkpoint": str(args.checkpoint),
        "sha256": sha256_of(args.checkpoint),
    }
    if isinstance(obj, dict) and isinstance(obj.get("epoch"), int):
        about["epoch"] = obj["epoch"]  # the training epoch the weights are from (0-based), when recorded
    return model, about | {"arch": arch}


def _label(args: argparse.Namespace, arch: str) -> str:
    """What the plot calls the model: --name, else its architecture, config file or checkpoint file."""
    if args.name:
        return str(args.name)
    if arch != "custom":
        return arch
    if args.model_config is not None:
        return str(args.model_config.stem)
    return str(args.checkpoint.name if args.checkpoint is not None else arch)


def _device(name: str) -> torch.device:
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("deepvit analyze: --device cuda, but PyTorch sees no CUDA device")
    return torch.device(name)


def _analyze(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from ..training.folders import DatasetError
    from .collapse import measure_collapse
    from .images import ImageFiles, pick_evenly
    from .report import PLOT, REPORT, plot_reports, table, write_report

    if args.images < 1:
        return _fail("--images must be at least 1")
    if not 0 < args.threshold <= 1:
        return _fail("--threshold must be in (0, 1]")
    if args.batch_size < 1 or args.workers < 0:
        return _fail("--batch-size must be at least 1 and --workers at least 0")
    try:
        files = pick_evenly(ImageFiles.under(args.data), args.images)
    except DatasetError as exc:
        return _fail(str(exc))
    model, about = _model(args)
    cfg = model.cfg
    device = _device(args.device)
    kinds = f"Re-attention in blocks {list(cfg.reattention_blocks)}" if cfg.reattention_blocks else "no Re-attention"
    _log(f"analysing {about['arch']} ({cfg.depth} blocks, {cfg.num_heads} heads, {kinds}) on {len(files)} images…")
    loader = ImageFiles(files, cfg.preprocessing).loader(args.batch_size, args.workers)
    bar = tqdm(
        total=len(files), desc="analyze", unit="img", file=sys.stderr, disable=not args.progress, mininterval=1.0
    )
    try:
        result = measure_collapse(model, loader, args.threshold, device, on_batch=bar.update)
    except DatasetError as exc:
        return _fail(str(exc))
    finally:
        bar.close()
    report = result.to_dict() | {
        "name": _label(args, about["arch"]),
        "model": about | {"config": cfg.to_dict()},
        "data": str(args.data),
    }
    out: Path = args.output
    write_report(report, out / REPORT)
    png = plot_reports([(report["name"], report)], out / PLOT)
    print(table(report))
    _log(f"wrote {out / REPORT}" + (f" and {png}" if png else " (no PNG: matplotlib is not installed)"))
    return 0
