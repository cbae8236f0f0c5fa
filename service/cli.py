"""The serving-side subcommands of ``deepvit``; none of them imports torch."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def register(sub: Any) -> None:
    p = sub.add_parser("serve", help="serve a model repository over HTTP and gRPC (settings also from DEEPVIT_* env)")
    p.add_argument("--model-repository", type=Path, help="<repository>/<name>/<version>/model.onnx")
    p.add_argument("--host", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default 8000)")
    p.add_argument("--grpc-port", type=int, help="port of the gRPC Open Inference Protocol (default 8001; 0: off)")
    p.add_argument("--default-model", help="model that /classify uses when none is named")
    p.set_defaults(handler=_serve)

    p = sub.add_parser("inspect", help="print an artifact's metadata for a person (or --json)")
    p.add_argument("artifact", type=Path)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(handler=_inspect)

    p = sub.add_parser(
        "explain", help="classify one image with an artifact and show where it looked (as POST /explain, no server)"
    )
    p.add_argument("image", type=Path)
    p.add_argument("--artifact", type=Path, required=True, metavar="model.onnx", help="exported with --explain")
    p.add_argument("--output", type=Path, metavar="overlay.png", help="write the heat map over the centre crop")
    p.add_argument("--top-k", type=int, default=5, help="how many classes to print")
    p.add_argument("--json", action="store_true", help="print /explain's answer (without the PNG) as JSON")
    p.set_defaults(handler=_explain)


def _serve(args: argparse.Namespace) -> int:
    from pydantic import ValidationError
    from pydantic_settings import SettingsError

    from .config import Settings
    from .logs import configure_logging

    overrides = {
        "model_repository": args.model_repository,
        "host": args.host,
        "port": args.port,
        "grpc_port": args.grpc_port,
        "default_model": args.default_model,
    }
    try:
        settings = Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])).upper()}: {e['msg']}" for e in exc.errors())
        print(f"deepvit serve: invalid settings (DEEPVIT_* environment or flags): {problems}", file=sys.stderr)
        return 2
    except SettingsError as exc:
        print(f"deepvit serve: invalid settings (DEEPVIT_* environment): {exc}", file=sys.stderr)
        return 2
    from .models.disk import scan_repository

    if not scan_repository(settings.model_repository):
        print(
            f"deepvit serve: model repository {settings.model_repository} holds no <name>/<version>/model.onnx; "
            "export one first, e.g. deepvit export --arch deepvit_S --checkpoint CKPT "
            f"--output {settings.model_repository}/deepvit_S/1/model.onnx",
            file=sys.stderr,
        )
        return 2
    configure_logging(settings.log_format, settings.log_level)
    import logging
    import os

    from .config import unknown_environment

    for problem in unknown_environment(os.environ):
        logging.getLogger("deepvit.config").warning("%s; it is ignored", problem, extra={"event": "unknown_setting"})
    from .server import run

    return run(settings)


def _reduced_precision_lines(accuracy: dict[str, Any], quantization: dict[str, Any]) -> list[str]:
    """fp16 and int8: the gate on natural images; int8: how it was quantized and its speed beside fp32."""
    lines = []
    if accuracy:
        lines.append(
            f"accuracy     top-1 agreement {accuracy.get('top1_agreement', float('nan')):.2%} with float32, mean |dp| "
            f"{accuracy.get('mean_abs_prob_diff', float('nan')):.2g} over {accuracy.get('images', 0)} natural images "
            f"({'passed' if accuracy.get('passed') else 'FAILED'})"
        )
    if quantization:
        calibration = quantization.get("calibration") or {}
        how = f"calibrated on {calibration.get('images')} images" if calibration else "no calibration"
        lines.append(
            f"quantized    {quantization.get('method')} {quantization.get('quant_format')}, "
            f"{'/'.join(quantization.get('op_types', []))}, {how}"
        )
        for s in quantization.get("speed", []):
            lines.append(
                f"int8 speed   batch {s['batch_size']}: {s['fp32_ms']:.2f} ms fp32 -> {s['int8_ms']:.2f} ms int8 per "
                f"image ({s['speedup']:.2f}x) where it was exported"
            )
    return lines


def _inspect(args: argparse.Namespace) -> int:
    from deepvit.artifact import ArtifactError
    from deepvit.artifact.session import read_metadata

    try:
        meta = read_metadata(args.artifact)
    except ArtifactError as exc:
        print(f"deepvit inspect: error: {exc}", file=sys.stderr)
        return 2
    info = meta.to_public_dict()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    pre = info["preprocessing"]
    parity = info["parity"]
    lines = [
        f"model        {meta.name} ({meta.arch}), {meta.num_classes} classes, {meta.precision}",
        f"weights      {meta.weights}" + ("  ** UNTRAINED: random initial weights **" if meta.untrained else ""),
        f"checkpoint   sha256 {meta.checkpoint_sha256 or '-'}",
        f"input        uint8 [N, {pre['crop_size']}, {pre['crop_size']}, 3] RGB",
        f"preprocess   shorter side -> {pre['resize_shorter']} ({pre['interpolation']}), "
        f"centre crop {pre['crop_size']}, mean {pre['mean']}, std {pre['std']}",
        f"labels       {', '.join(meta.labels[:3])}, … ({len(meta.labels)})",
        f"outputs      logits [N, {meta.num_classes}]"
        + (
            f"; attention [N, {meta.attention.grid**2}] (rollout over {meta.attention.grid}x{meta.attention.grid} "
            "patches: POST /explain)"
            if meta.attention is not None
            else " (no attention output: export with --explain for POST /explain)"
        ),
        "parity       "
        + (
            f"max |dlogit| {parity.get('max_abs_logit_diff', float('nan')):.3g}, top-1 agreement "
            f"{parity.get('top1_agreement', float('nan')):.2%} ({'passed' if parity.get('passed') else 'FAILED'})"
            if parity
            else "-"
        ),
        *_reduced_precision_lines(meta.accuracy, meta.quantization),
        f"exported     {meta.exported_at or '-'} with "
        + ", ".join(f"{k} {v}" for k, v in sorted(meta.versions.items())),
    ]
    print("\n".join(lines))
    return 0


def _explain(args: argparse.Namespace) -> int:
    from deepvit.artifact import ArtifactError, ImageError
    from deepvit.artifact.heatmap import overlay_png
    from deepvit.artifact.pixels import load_file, transform
    from deepvit.artifact.predictions import top_k
    from deepvit.artifact.session import metadata_of, open_session

    def fail(message: str) -> int:
        print(f"deepvit explain: error: {message}", file=sys.stderr)
        return 2

    try:
        session = open_session(args.artifact)
        meta = metadata_of(session, str(args.artifact))
    except ArtifactError as exc:
        return fail(exc.message)
    if meta.attention is None:
        return fail(
            f"{args.artifact} was exported without the attention output; re-export it with deepvit export "
            "--explain (the same arguments plus --explain)"
        )
    if not 1 <= args.top_k <= meta.num_classes:
        return fail(f"--top-k {args.top_k} must be between 1 and the model's {meta.num_classes} classes")
    try:
        crop = transform(load_file(args.image), meta.preprocess)  # exactly what /explain computes for an upload
    except (ImageError, OSError) as exc:
        return fail(
            f"{args.image}: {exc.message}" if isinstance(exc, ImageError) else f"cannot read {args.image}: {exc}"
        )
    logits, attention = session.run(None, {session.get_inputs()[0].name: crop[None]})
    grid = meta.attention.grid
    try:
        png = overlay_png(crop, attention[0], grid)  # checks the map is one of the grid
    except ArtifactError as exc:
        return fail(f"{args.artifact}: {exc.message}")
    predictions = top_k(logits[0], args.top_k, meta.labels)
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_bytes(png)
    if args.json:
        answer = {
            "model": {"name": meta.name},
            "predictions": predictions,
            "attention": {"grid": grid, "values": [float(v) for v in attention[0]]},
        }
        print(json.dumps(answer, indent=2))
        return 0
    if meta.untrained:
        print("** UNTRAINED model (random initial weights): its answers and attention mean nothing **")
    for p in predictions:
        print(f"{p['score']:8.2%}  {p['label']} ({p['class_id']})")
    print(f"attention over the {grid}x{grid} patches (% of the cls token's attention flow):")
    for row in attention[0].reshape(grid, grid):
        print("  " + " ".join(f"{100 * v:5.1f}" for v in row))
    if args.output is not None:
        print(f"overlay written to {args.output}")
    return 0
