"""The model-side subcommands of ``deepvit``: export and verify (torch needed; imported when run)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .checkpoint import WeightsKind
    from .export import WeightsSource

TRAIN_EXTRA_HINT = (
    "this command needs PyTorch, which the serving install leaves out: "
    "pip install 'deepvit-serve[train]' (or: make dev)"
)


def _require_torch() -> None:
    try:
        import torch  # noqa: F401
    except ImportError:
        raise SystemExit(f"deepvit: {TRAIN_EXTRA_HINT}") from None


def _add_model_choice(p: argparse.ArgumentParser, required: bool) -> None:
    g = p.add_mutually_exclusive_group(required=required)
    g.add_argument("--arch", help="an official variant, e.g. deepvit_S, deepvit_L, deepvit_patch16_224_re_attn_16b")
    g.add_argument("--model-config", type=Path, metavar="FILE.json", help="a config in the official field names")


def register(sub: Any) -> None:
    p = sub.add_parser("export", help="checkpoint -> self-describing model.onnx, gated on parity with PyTorch")
    _add_model_choice(p, required=True)
    w = p.add_mutually_exclusive_group(required=True)
    w.add_argument("--checkpoint", type=Path, help="official .pth.tar, a state dict, or a deepvit train checkpoint")
    w.add_argument("--random-init", action="store_true", help="untrained weights (recorded as such)")
    p.add_argument("--ema", action="store_true", help="use the checkpoint's EMA weights (state_dict_ema)")
    p.add_argument("--labels", type=Path, help="class names, one per line (default: ImageNet-1k for 1000 classes)")
    p.add_argument(
        "--precision",
        choices=["fp32", "fp16", "int8"],
        default="fp32",
        help="fp16 and int8 are gated on natural images: top-1 agreement with float32 >= 99%%",
    )
    p.add_argument(
        "--calibration",
        type=Path,
        metavar="DIR",
        help="int8: images (an image folder will do) to calibrate static QDQ quantization on; without it, "
        "dynamic quantization. Any precision: also gated on",
    )
    p.add_argument(
        "--gate-images",
        type=Path,
        metavar="DIR",
        help="photographs the accuracy gate of fp16 and int8 takes views of (default: the project's, in a checkout)",
    )
    p.add_argument(
        "--int8-recipe",
        choices=["ort", "nncf"],
        default="ort",
        help="int8: ONNX Runtime's quantizer (dynamic, or static with --calibration), or NNCF's post-training "
        "quantization (needs --calibration and the nncf package), gated and timed on the OpenVINO engine",
    )
    p.add_argument(
        "--engine-gates",
        choices=["auto", "all", "none"],
        default="auto",
        help="fp32: also gate each reduced-precision engine (bf16 on the CPU's matrix engine through OpenVINO) on "
        "natural images; auto: the engines this host computes natively, all: emulated ones too (slow)",
    )
    p.add_argument(
        "--explain",
        action="store_true",
        help="add the 'attention' output (attention rollout over the patch grid) that POST /explain serves",
    )
    p.add_argument("--name", help="model name recorded in the artifact (default: the arch or config file name)")
    p.add_argument("--seed", type=int, default=0, help="seed for --random-init")
    p.add_argument("--output", type=Path, required=True, metavar="PATH/model.onnx")
    p.set_defaults(handler=_export, model_side=True)

    p = sub.add_parser("verify", help="re-run the parity check of an artifact against its checkpoint")
    p.add_argument("artifact", type=Path)
    _add_model_choice(p, required=False)
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--ema", action="store_true")
    p.add_argument(
        "--provider",
        choices=["cpu", "cuda"],
        default="cpu",
        help="the provider to measure on (cuda: the one that will serve; an error where CUDA is not used)",
    )
    p.add_argument("--gate-images", type=Path, metavar="DIR", help="fp16 and int8: photographs for the accuracy gate")
    p.add_argument("--calibration", type=Path, metavar="DIR", help="fp16 and int8: further images for the gate")
    p.add_argument(
        "--engine-gates",
        choices=["auto", "all", "none"],
        default="auto",
        help="fp32: re-run the gate of each reduced-precision engine (as export); one the artifact records as "
        "passed must pass again",
    )
    p.set_defaults(handler=_verify, model_side=True)

    from .training import cli as training_cli  # train, evaluate

    training_cli.register(sub)

    from .analysis import cli as analysis_cli  # analyze

    analysis_cli.register(sub)


def run_handler(handler: Any, args: argparse.Namespace) -> int:
    """Turn the model side's domain errors into one clear line and a non-zero exit."""
    _require_torch()
    from .checkpoint import CheckpointError
    from .config import ConfigError
    from .labels import LabelsError
    from .parity import ParityError

    try:
        return int(handler(args))
    except (CheckpointError, ConfigError, LabelsError, ParityError) as exc:
        print(f"deepvit {args.command}: error: {exc}", file=sys.stderr)
        return 2


def _log(msg: str) -> None:
    print(f"deepvit: {msg}", file=sys.stderr, flush=True)


def _config(args: argparse.Namespace) -> tuple[str, Any]:
    from .config import DeepViTConfig, get_config

    if args.model_config is not None:
        return "custom", DeepViTConfig.from_json(args.model_config)
    return args.arch, get_config(args.arch)


def _export(args: argparse.Namespace) -> int:
    import torch

    from .checkpoint import (
        ClassCountMismatchError,
        class_names_of,
        head_classes,
        load_weights,
        read_checkpoint,
        sha256_of,
        weights_of,
    )
    from .export import ArtifactInfo, export_artifact
    from .labels import default_labels, read_labels
    from .net import DeepViT

    arch, cfg = _config(args)
    name = args.name or (args.arch if args.arch else args.model_config.stem)
    labels = read_labels(args.labels) if args.labels else None
    sd = None
    if args.checkpoint is not None:
        _log(f"reading checkpoint {args.checkpoint}…")
        weights: WeightsKind = "ema" if args.ema else "state_dict"
        ckpt = read_checkpoint(args.checkpoint)
        sd = weights_of(ckpt, weights)
        ckpt_classes = head_classes(sd)
        if labels is None and (labels := class_names_of(ckpt, ckpt_classes)) is not None:
            _log(f"labels: the {len(labels)} class names saved in the checkpoint by deepvit train")
        if labels is not None and ckpt_classes is not None and ckpt_classes != len(labels):
            raise ClassCountMismatchError(
                f"the checkpoint's head has {ckpt_classes} classes but {args.labels} has {len(labels)} "
                "names; give a labels file with one line per class"
            )
        if ckpt_classes is not None:
            cfg = cfg.replace(num_classes=ckpt_classes)
    elif args.ema:
        raise SystemExit("deepvit export: --ema needs --checkpoint")
    if labels is not None:
        if len(labels) != cfg.num_classes and sd is None and args.model_config is not None:
            raise ClassCountMismatchError(
                f"{args.labels} has {len(labels)} names but the config says num_classes={cfg.num_classes}"
            )
        cfg = cfg.replace(num_classes=len(labels))
    labels = labels or default_labels(cfg.num_classes)
    _log(f"building {arch} ({cfg.depth} blocks, dim {cfg.embed_dim}, {cfg.num_classes} classes)…")
    torch.manual_seed(args.seed)
    model = DeepViT(cfg).eval()
    sha = None
    source: WeightsSource
    if sd is not None:
        load_weights(model, sd, arch)
        sha = sha256_of(args.checkpoint)
        source = "ema" if args.ema else "state_dict"
    else:
        source = "random_init"
        _log("WARNING: random initial weights (--random-init): this model is untrained and its answers mean nothing")
    if args.calibration is not None and args.precision == "fp32":
        _log("note: --calibration adds to the gates of fp16, int8 and the bf16 engine; float32 is gated on parity")
    info = ArtifactInfo(name, arch, cfg, labels, source, sha, args.precision, explain=args.explain)
    export_artifact(
        model,
        info,
        args.output,
        gate_photos=args.gate_images,
        calibration=args.calibration,
        engine_gates=args.engine_gates,
        int8_recipe=args.int8_recipe,
        log=_log,
    )
    return 0


def _verify(args: argparse.Namespace) -> int:
    import json

    from deepvit.artifact import ArtifactError
    from deepvit.artifact.session import read_metadata

    from .checkpoint import load_checkpoint
    from .config import DeepViTConfig
    from .export import ImageClassifier
    from .net import DeepViT
    from .parity import check_parity

    try:
        meta = read_metadata(args.artifact)
    except ArtifactError as exc:  # missing, not ONNX, or not made by deepvit export
        raise SystemExit(f"deepvit verify: {exc.message}") from None
    if not meta.config:
        raise SystemExit(f"deepvit verify: {args.artifact} records no model config; re-export it with deepvit export")
    if args.arch or args.model_config:
        arch, cfg = _config(args)
        cfg = cfg.replace(num_classes=meta.num_classes)
    else:
        arch, cfg = meta.arch, DeepViTConfig.from_dict(meta.config)
    model = DeepViT(cfg).eval()
    sha = load_checkpoint(model, args.checkpoint, "ema" if args.ema else "state_dict", arch)
    recorded = meta.checkpoint_sha256
    if recorded and recorded != sha:
        _log(f"WARNING: checkpoint sha256 {sha[:12]}… differs from the one recorded at export ({recorded[:12]}…)")
    from deepvit.artifact.engines import ENGINES, OPENVINO
    from deepvit.artifact.session import open_session, providers_for

    from .accuracy import check_accuracy, check_engines, folder_images, gate_images
    from .parity import ParityError

    providers = providers_for(args.provider)
    if args.provider == "cuda":
        used = open_session(args.artifact, providers, optimize=False).get_providers()[0]
        if used != "CUDAExecutionProvider":
            raise ParityError(f"--provider cuda: ONNX Runtime runs {args.artifact} on {used}, not CUDA")
    reference = ImageClassifier(model, explain=meta.attention is not None).eval()
    out: dict[str, object] = {"precision": meta.precision}
    passed = True
    if meta.precision != "int8":  # an int8 graph is not the float model numerically; its gate is accuracy
        report = check_parity(reference, str(args.artifact), meta.precision, cfg.img_size, providers=providers)
        out.update(report.to_dict())
        passed = report.passed
        _log(f"parity {'ok' if report.passed else 'FAILED'}: {report.summary()}")
    if meta.precision != "fp32":
        spec = meta.preprocess
        calibration = folder_images(args.calibration, spec) if args.calibration else None
        images = gate_images(spec, args.gate_images, calibration)
        engine = ENGINES.get(str(meta.accuracy.get("engine", ""))) if args.provider == "cpu" else None
        engine = engine if engine is not None and engine.provider == OPENVINO else None  # where export gated it
        accuracy = check_accuracy(reference, str(args.artifact), meta.precision, images, providers, engine=engine)
        out["accuracy"] = accuracy.to_dict()
        passed = passed and accuracy.passed
        _log(f"accuracy {'ok' if accuracy.passed else 'FAILED'}: {accuracy.summary()}")
    if meta.precision == "fp32" and args.engine_gates != "none" and args.provider == "cpu":
        calibration = folder_images(args.calibration, meta.preprocess) if args.calibration else None
        images = gate_images(meta.preprocess, args.gate_images, calibration)
        engines = check_engines(reference, str(args.artifact), images, args.engine_gates, _log)
        out["engine_gates"] = engines
        for name, gate in engines.items():  # what the artifact says passed must pass again
            if meta.engine_gates.get(name, {}).get("passed") and not gate["passed"]:
                passed = False
                _log(f"{name}: the artifact records its gate as passed, and it fails now")
    print(json.dumps({**out, "passed": passed}, indent=2))
    return 0 if passed else 1
