"""``deepvit bench``."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def register(sub: Any) -> None:
    p = sub.add_parser("bench", help="benchmark table: ONNX Runtime, in-process pipeline, HTTP under hey")
    p.add_argument("--model-repository", type=Path, default=Path("models"))
    p.add_argument("--model", help="model name (default: the first in the repository)")
    p.add_argument("--photos", type=Path, default=Path("tests/data/photos"), help="folder of *.jpg photographs")
    p.add_argument("--output", type=Path, default=Path("bench/results"), help="writes <output>/<model>.md")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    p.add_argument("--duration", type=float, default=10.0, help="seconds of load per concurrency level")
    p.add_argument("--min-time", type=float, default=3.0, help="seconds per in-process measurement")
    p.set_defaults(handler=_bench)


def _bench(args: argparse.Namespace) -> int:
    from .run import run_bench

    table = run_bench(
        args.model_repository,
        args.model,
        args.photos,
        args.output,
        concurrencies=args.concurrency,
        batch_sizes=args.batch_sizes,
        duration_s=args.duration,
        min_time_s=args.min_time,
    )
    print(table)
    return 0
