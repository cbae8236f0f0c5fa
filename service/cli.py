"""The serving-side subcommands of ``deepvit``; none of them imports torch."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def register(sub: Any) -> None:
    p = sub.add_parser("inspect", help="print an artifact's metadata for a person (or --json)")
    p.add_argument("artifact", type=Path)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(handler=_inspect)


def _inspect(args: argparse.Namespace) -> int:
    from .artifact import read_metadata
    from .errors import ArtifactError

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
        "parity       "
        + (
            f"max |dlogit| {parity.get('max_abs_logit_diff', float('nan')):.3g}, top-1 agreement "
            f"{parity.get('top1_agreement', float('nan')):.2%} ({'passed' if parity.get('passed') else 'FAILED'})"
            if parity
            else "-"
        ),
        f"exported     {meta.exported_at or '-'} with "
        + ", ".join(f"{k} {v}" for k, v in sorted(meta.versions.items())),
    ]
    print("\n".join(lines))
    return 0
