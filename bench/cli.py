"""``deepvit bench``."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def register(sub: Any) -> None:
    p = sub.add_parser("bench", help="benchmark table: ONNX Runtime, in-process pipeline, HTTP under hey, gRPC")
    p.add_argument("--model-repository", type=Path, default=Path("models"))
    p.add_argument("--model", help="model name (default: the first in the repository)")
    p.add_argument("--photos", type=Path, default=Path("tests/data/photos"), help="folder of *.jpg photographs")
    p.add_argument("--output", type=Path, default=Path("bench/results"), help="writes <output>/<model>.md")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    p.add_argument("--duration", type=float, default=10.0, help="seconds of load per concurrency level")
    p.add_argument("--min-time", type=float, default=3.0, help="seconds per in-process measurement")
    p.add_argument(
        "--predict",
        action="store_true",
        help="instead: the whole deepvit predict command on a folder of photographs, beside the HTTP service at "
        "concurrency 32 and the folder's limit (see bench/predict.py)",
    )
    p.add_argument("--images", type=int, default=3000, help="images in the folder (--predict)")
    p.add_argument(
        "--overload",
        action="store_true",
        help="instead: open-loop load at --factor times the measured capacity (see bench/overload.py)",
    )
    p.add_argument(
        "--compare",
        nargs="+",
        metavar="MODEL",
        help="instead: these models side by side in one run (e.g. fp32 and int8 exports; see bench/compare.py)",
    )
    p.add_argument("--factor", type=float, default=3.0, help="offered load / capacity (--overload)")
    p.add_argument("--overload-seconds", type=float, default=60.0, help="length of the overload (--overload)")
    p.add_argument("--deadline", type=float, default=2.0, help="DEEPVIT_REQUEST_TIMEOUT_S of the server (--overload)")
    p.add_argument(
        "--attention-cost",
        nargs=2,
        type=Path,
        metavar=("PLAIN.onnx", "EXPLAIN.onnx"),
        help="instead: time one model exported without and with --explain (see bench/attention_cost.py)",
    )
    p.add_argument(
        "--rounds",
        type=int,
        help="interleaved rounds: timings of --attention-cost (default 20); the service and the command, "
        "alternated, of --predict (default 3)",
    )
    p.add_argument(
        "--decode-memory",
        action="store_true",
        help="instead: RSS under images whose headers lie about their size (see bench/decode_memory.py)",
    )
    p.add_argument(
        "--requests",
        type=int,
        default=3000,
        help="lying images sent (--decode-memory); requests per path (--refusal-cost)",
    )
    p.add_argument(
        "--jpeg-draft",
        action="store_true",
        help="instead: DEEPVIT_JPEG_DRAFT's decoding time and fidelity on each photograph (see bench/jpeg_draft.py)",
    )
    p.add_argument(
        "--slow-clients",
        action="store_true",
        help="instead: slow bodies and slow heads beside a normal client (see bench/hostile.py)",
    )
    p.add_argument(
        "--upload-flood",
        action="store_true",
        help="instead: many large uploads at once, the server's memory and answers (see bench/hostile.py)",
    )
    p.add_argument("--slow", type=int, default=100, help="slow bodies, and as many slow heads (--slow-clients)")
    p.add_argument(
        "--slow-seconds", type=float, default=30.0, help="length of the normal client's run (--slow-clients)"
    )
    p.add_argument("--uploads", type=int, default=160, help="uploads at once (--upload-flood)")
    p.add_argument("--upload-bytes", type=int, default=19_000_000, help="size of each upload (--upload-flood)")
    p.add_argument(
        "--refusal-cost",
        action="store_true",
        help="instead: the event loop's CPU per overload refusal, below the app and in it (see bench/refusal_cost.py)",
    )
    p.add_argument(
        "--server-tree",
        type=Path,
        help="run the server from this source tree (another checkout, for a before and after; --overload)",
    )
    p.set_defaults(handler=_bench)


def _bench(args: argparse.Namespace) -> int:
    if args.overload:
        return _overload(args)
    if args.decode_memory:
        return _decode_memory(args)
    if args.slow_clients or args.upload_flood:
        return _hostile(args)
    if args.refusal_cost:
        return _refusal_cost(args)
    if args.jpeg_draft:
        return _jpeg_draft(args)
    if args.attention_cost:
        return _attention_cost(args)
    if args.compare:
        from .compare import run_compare

        print(
            run_compare(
                args.model_repository,
                args.compare,
                args.photos,
                args.output,
                args.concurrency,
                args.batch_sizes,
                args.duration,
                args.min_time,
            )
        )
        return 0
    if args.predict:
        return _predict(args)
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


def _served_model(args: argparse.Namespace) -> tuple[str, Path]:
    """The model a run serves (``--model``, or the repository's first) and its latest version's artifact."""
    from .run import served_model

    name, _, artifact = served_model(args.model_repository, args.model)
    return name, artifact


def _photos(args: argparse.Namespace) -> list[Path]:
    """The photographs of ``--photos``; a run that sends one sends the first."""
    from .run import photographs

    return photographs(args.photos)


def _predict(args: argparse.Namespace) -> int:
    from .predict import run_predict_bench

    name, artifact = _served_model(args)
    subtitle, table = run_predict_bench(
        args.model_repository,
        name,
        artifact,
        _photos(args),
        args.output,
        args.images,
        args.duration,
        args.min_time,
        args.rounds or 3,
    )
    heading = f"{name}: deepvit predict on a folder, the HTTP service, the folder's limit"
    return _publish(args, "predict", f"{name}-predict.md", heading, subtitle, table)


def _publish(args: argparse.Namespace, kind: str, file_name: str, heading: str, subtitle: str, table: str) -> int:
    """Print a run's table under its heading and a line of when, where and how, and write it to
    ``--output``/``file_name``."""
    import datetime as dt
    import os
    import platform

    stamp = f"{dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC · {platform.machine()}, {os.cpu_count()} CPUs"
    text = f"### {heading}\n\n{stamp} · {subtitle}\n\n{table}"
    if args.output is not None:
        args.output.mkdir(parents=True, exist_ok=True)
        (args.output / file_name).write_text(f"<!-- written by deepvit bench --{kind} -->\n{text}\n")
    print(text)
    return 0


def _overload(args: argparse.Namespace) -> int:
    from .overload import run_overload

    (name, _), photo = _served_model(args), _photos(args)[0]
    result = run_overload(
        args.model_repository,
        name,
        photo,
        args.factor,
        args.overload_seconds,
        args.deadline,
        log=None,
        server_tree=args.server_tree,
    )
    heading = f"{name}: {args.factor:g}x capacity for {args.overload_seconds:g} s, open loop"
    subtitle = (
        f"photo {photo.name} ({photo.stat().st_size / 1024:.0f} KB) · DEEPVIT_REQUEST_TIMEOUT_S={args.deadline:g}, "
        "DEEPVIT_MAX_QUEUE_SIZE=64; the load generator runs on the same machine"
    )
    suffix = "" if args.factor == 3 else f"-{args.factor:g}x"
    return _publish(args, "overload", f"{name}-overload{suffix}.md", heading, subtitle, result.render())


def _decode_memory(args: argparse.Namespace) -> int:
    from .decode_memory import run_decode_memory

    (name, _), photo = _served_model(args), _photos(args)[0]
    result = run_decode_memory(args.model_repository, name, photo, args.requests)
    heading = f"{name}: images whose headers lie about their size"
    subtitle = f"made from {photo.name}, the server's default settings"
    return _publish(args, "decode-memory", f"{name}-decode-memory.md", heading, subtitle, result.render())


def _hostile(args: argparse.Namespace) -> int:
    from .hostile import run_slow_clients, run_upload_flood

    (name, _), photo = _served_model(args), _photos(args)[0]
    if args.slow_clients:
        slow = run_slow_clients(args.model_repository, name, photo, args.slow, args.slow_seconds)
        heading = f"{name}: {args.slow} slow bodies and {args.slow} slow heads beside a normal client"
        subtitle = f"photo {photo.name}, the server's default settings; the clients run on the same machine"
        return _publish(args, "slow-clients", f"{name}-slow-clients.md", heading, subtitle, slow.render())
    flood = run_upload_flood(args.model_repository, name, photo, args.uploads, args.upload_bytes)
    heading = f"{name}: {args.uploads} uploads of {args.upload_bytes / 1e6:g} MB at once"
    subtitle = f"made from {photo.name}, the server's default settings; the clients run on the same machine"
    return _publish(args, "upload-flood", f"{name}-upload-flood.md", heading, subtitle, flood.render())


def _refusal_cost(args: argparse.Namespace) -> int:
    from .refusal_cost import run_refusal_cost

    photo = _photos(args)[0]
    result = run_refusal_cost(args.model_repository, photo, args.requests)
    heading = "the event loop's CPU per overload refusal: below the app against in it"
    subtitle = f"photo {photo.name}, admission held over its bound; hey on the same machine"
    return _publish(args, "refusal-cost", "refusal-cost.md", heading, subtitle, result.render())


def _jpeg_draft(args: argparse.Namespace) -> int:
    from .jpeg_draft import measure, render

    name, artifact = _served_model(args)
    rounds = 7
    rows = measure(artifact, _photos(args), rounds)
    heading = f"{name}: JPEG decoding at reduced scale (DEEPVIT_JPEG_DRAFT) against the reference transform"
    subtitle = f"CPU time per image, one thread, median of {rounds}"
    return _publish(args, "jpeg-draft", f"{name}-jpeg-draft.md", heading, subtitle, render(rows))


def _attention_cost(args: argparse.Namespace) -> int:
    from deepvit.artifact.session import read_metadata

    from .attention_cost import measure, render

    plain, explain = args.attention_cost
    meta = read_metadata(plain)
    rounds = args.rounds or 20
    rows = measure(plain, explain, [b for b in args.batch_sizes if b <= 8] or [1], rounds)
    heading = f"{meta.name}: the cost of the attention output"
    subtitle = f"ONNX Runtime on the CPU, one intra-op thread · median of {rounds} interleaved rounds"
    return _publish(args, "attention-cost", f"{meta.name}-attention-cost.md", heading, subtitle, render(rows))
