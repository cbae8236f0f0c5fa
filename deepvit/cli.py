"""``deepvit``: one command, subcommands from both halves.

Serving subcommands (serve, inspect, bench) never import torch; model subcommands (export, verify, ...)
import it when they run and say which extra to install when it is missing.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from collections.abc import Sequence


def build_parser() -> argparse.ArgumentParser:
    from deepvit.model import cli as model_cli
    from deepvit.service import cli as service_cli

    parser = argparse.ArgumentParser(prog="deepvit", description=__doc__.splitlines()[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    service_cli.register(sub)
    if importlib.util.find_spec("deepvit.bench") is not None:  # a checkout: bench/ is tooling, not installed
        from deepvit.bench import cli as bench_cli

        bench_cli.register(sub)
    model_cli.register(sub)
    from deepvit.predict import cli as predict_cli  # Ray Data is imported when it runs (the batch extra)

    predict_cli.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "model_side", False):
        from deepvit.model import cli as model_cli

        return model_cli.run_handler(args.handler, args)
    return int(args.handler(args))


if __name__ == "__main__":
    sys.exit(main())
