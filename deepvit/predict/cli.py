"""``deepvit predict``: the subcommand, its arguments and its closing lines (exit 0 only when every input
has its row)."""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from typing import Any

BATCH_EXTRA_HINT = "deepvit predict needs Ray Data: pip install 'deepvit-serve[batch]' (or: make dev)"


def register(sub: Any) -> None:
    from .engine import CHOICES
    from .job import DEFAULT_MAX_FILE_BYTES, PredictConfig

    defaults = PredictConfig("", "", "")
    p = sub.add_parser(
        "predict",
        help="classify a folder, a listing or a bucket on Ray Data: one Parquet row per file, as /classify answers",
        description="Classify every image of SRC with an artifact, as POST /classify would, into Parquet files "
        "under --output (one row per file: its top-k, or its error). Rerun with the same --output to resume.",
    )
    p.add_argument("src", metavar="SRC", help="a folder (searched recursively), a file listing paths, or s3:// gs://")
    p.add_argument("--artifact", required=True, metavar="MODEL.onnx", help="an artifact of deepvit export (or a URI)")
    p.add_argument("--output", required=True, metavar="OUT", help="folder or s3:// gs:// prefix for the Parquet files")
    p.add_argument("--top-k", type=int, default=defaults.top_k, help="predictions per file (default 5)")
    p.add_argument("--batch-size", type=int, default=defaults.batch_size, help="images per inference call")
    p.add_argument(
        "--rows-per-file",
        type=int,
        default=defaults.rows_per_file,
        help="rows per Parquet file at least (a crash loses the rows not yet in a file)",
    )
    p.add_argument(
        "--address",
        help="join this Ray cluster (host:port, or 'auto'; default: RAY_ADDRESS, as a Ray job sets it) instead of "
        "starting a local one",
    )
    p.add_argument("--actors", type=int, help="inference actors (default: the cluster's CPUs / --threads-per-actor)")
    p.add_argument("--threads-per-actor", type=int, default=defaults.threads_per_actor, help="ONNX Runtime threads")
    p.add_argument(
        "--engine",
        choices=CHOICES,
        default=defaults.engine,
        help="what computes: auto (default) measures the engines this host offers and the artifact's gates allow "
        "on each actor, as the service's warm-up does, and keeps the fastest",
    )
    p.add_argument(
        "--max-file-bytes",
        type=int,
        default=DEFAULT_MAX_FILE_BYTES,
        help="larger files get an error row without being read (default 64 MiB)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars (logs)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")
    p.set_defaults(handler=_predict)


def _log(msg: str) -> None:
    print(f"deepvit predict: {msg}", file=sys.stderr, flush=True)


def _predict(args: argparse.Namespace) -> int:
    if importlib.util.find_spec("ray") is None or importlib.util.find_spec("pyarrow") is None:
        _log(BATCH_EXTRA_HINT)
        return 2
    from deepvit.artifact import ArtifactError

    from .inputs import InputError
    from .job import PredictConfig, check_engine, load_artifact, run
    from .output import OutputError

    for name in ("top_k", "batch_size", "rows_per_file", "threads_per_actor", "max_file_bytes"):
        if getattr(args, name) < 1:
            _log(f"error: --{name.replace('_', '-')} must be at least 1")
            return 2
    if args.actors is not None and args.actors < 1:
        _log("error: --actors must be at least 1")
        return 2
    cfg = PredictConfig(
        src=args.src,
        artifact=args.artifact,
        output=args.output,
        top_k=args.top_k,
        batch_size=args.batch_size,
        rows_per_file=args.rows_per_file,
        address=args.address,
        actors=args.actors,
        threads_per_actor=args.threads_per_actor,
        engine=args.engine,
        max_file_bytes=args.max_file_bytes,
        progress=not args.no_progress,
    )
    try:
        artifact = load_artifact(cfg.artifact)
        classes = artifact.meta.num_classes
        if not 1 <= cfg.top_k <= classes:
            raise InputError(f"--top-k {cfg.top_k} must be between 1 and the model's {classes} classes")
        check_engine(cfg, artifact)
        summary = run(cfg, artifact, _log)
    except (ArtifactError, InputError, OutputError) as exc:
        _log(f"error: {exc}")
        return 2
    m = artifact.model
    _log(
        f"{summary.inputs} inputs, {summary.inputs - len(summary.missing)} with their row in {cfg.output} "
        f"({summary.errors} with an error and no predictions; {summary.done_before} done by an earlier run); "
        f"model {m.name}{f' v{m.version}' if m.version is not None else ''} (sha256 {m.sha256[:12]})"
    )
    if summary.written:
        _log(
            f"{summary.written} rows in {summary.seconds:.1f} s: {summary.images_per_s():.1f} images/s for the whole "
            f"command, {summary.images_per_s_started():.1f} images/s once Ray was up ({summary.startup_s:.1f} s to "
            f"start it); {summary.cluster}"
        )
    if summary.engines:
        _log("computed by " + ", ".join(f"{name} ({rows} rows)" for name, rows in summary.engines.items()))
    if summary.skipped:
        files = "1 file" if summary.skipped == 1 else f"{summary.skipped} files"
        _log(f"{files} not named as images left out (list them in a file to include them)")
    if summary.failure:
        _log(f"error: the run stopped: {summary.failure}; rerun with the same --output to go on")
    for what, paths in (("have no row", summary.missing), ("have more than one row", summary.duplicated)):
        if paths:
            _log(f"error: {len(paths)} inputs {what}, e.g. {', '.join(paths[:3])}")
    if args.json:
        print(json.dumps(summary.to_dict()))
    return 0 if summary.complete else 1
