"""``deepvit bench``: one run, one machine, one model, three layers side by side.

1. raw ONNX Runtime: uint8 batches of 1..64, images/s;
2. the in-process pipeline: decode + preprocess (thread pool, as the service) + batched inference;
3. the service over HTTP: a real ``deepvit serve`` process driven by ``hey`` (an established load generator)
   at several concurrencies with real JPEG photographs: images/s and p50/p95/p99 latency;
4. the same process over gRPC, the same photograph as an encoded ``BYTES`` input with the top 5 asked for,
   at the same concurrencies (``bench/grpc_load.py``: Triton's own client);
5. the baseline a user would otherwise pick (``bench/baseline.py``: plain FastAPI, one ONNX Runtime call per
   request), driven by ``hey`` like ours, interleaved with it by concurrency;
6. the baseline a user who knows OpenVINO would write (``bench/baseline_openvino.py``: OpenVINO's own runtime
   with its throughput hint and default precision, one call per request), the same way;

beside every engine's single-threaded time per image by batch size and the machine's limit on the fastest
engine the artifact's gate allows (``bench/limit.py``), and a chart of throughput and p99 against concurrency.
Ratios between the layers are the figures to quote: the machine may be shared and noisy.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import os
import platform
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from deepvit.artifact.pixels import ImageLimits, preprocess
from deepvit.service.config import Settings
from deepvit.service.models.disk import scan_repository
from deepvit.service.runtime import GPU_PROVIDERS, ModelRuntime

from .chart import draw
from .grpc_load import drive
from .limit import MachineLimit, measure_limits
from .report import percentile_ms
from .server import free_port, serve, start, stop, wait_ready


@dataclass
class Row:
    layer: str
    setting: str
    images_per_s: float
    p50_ms: float | None = None
    p95_ms: float | None = None
    p99_ms: float | None = None
    errors: int = 0


def _timed_loop(fn: object, min_time_s: float, min_iters: int = 3) -> tuple[int, float]:
    assert callable(fn)
    fn()  # not timed: first-call effects
    n, started = 0, time.perf_counter()
    while n < min_iters or time.perf_counter() - started < min_time_s:
        fn()
        n += 1
    return n, time.perf_counter() - started


def bench_runtime(rt: ModelRuntime, batch_sizes: Sequence[int], min_time_s: float) -> list[Row]:
    crop = rt.meta.preprocess.crop_size
    rows = []
    rng = np.random.default_rng(0)
    for b in batch_sizes:
        x = rng.integers(0, 256, (b, crop, crop, 3), dtype=np.uint8)
        n, elapsed = _timed_loop(lambda x=x: rt.run(x), min_time_s)
        per_batch = elapsed / n
        rows.append(Row("onnxruntime", f"batch {b}", b * n / elapsed, p50_ms=per_batch * 1000))
    return rows


def bench_pipeline(rt: ModelRuntime, photo: bytes, batch: int, threads: int, min_time_s: float) -> Row:
    """Decode + preprocess on a thread pool, overlapped with inference of the previous batch, as the
    service overlaps them: the best this process can do without HTTP."""
    settings = Settings()
    spec = rt.meta.preprocess
    limits = ImageLimits(settings.max_image_pixels, settings.max_aspect_ratio)
    pool = ThreadPoolExecutor(max_workers=threads)

    def decode_batch() -> list[Future[np.ndarray]]:
        return [pool.submit(preprocess, photo, spec, limits) for _ in range(batch)]

    pending = decode_batch()

    def one_batch() -> None:
        nonlocal pending
        images = [f.result() for f in pending]
        pending = decode_batch()  # the next batch decodes while this one runs
        rt.run(np.stack(images))

    n, elapsed = _timed_loop(one_batch, min_time_s)
    pool.shutdown(cancel_futures=True)
    return Row("in-process pipeline", f"decode+preprocess overlapped with infer, batch {batch}", batch * n / elapsed)


def run_hey(hey: str, url: str, photo: Path, concurrency: int, duration_s: float) -> Row:
    # A fixed duration (-z) rather than a request count: at high concurrency a count leaves each worker a
    # handful of requests, and the ramp-up and ramp-down would dominate.
    cmd = [hey, "-z", f"{duration_s:g}s", "-c", str(concurrency), "-m", "POST", "-T", "image/jpeg"]
    cmd += ["-D", str(photo), "-t", "60", "-o", "csv", url]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=True).stdout
    times, ends, errors = [], [], 0
    for rec in csv.DictReader(io.StringIO(out)):
        if rec["status-code"] != "200":
            errors += 1
            continue
        t = float(rec["response-time"])
        times.append(t)
        ends.append(float(rec["offset"]) + t)
    wall = max(ends) if ends else float("nan")
    return Row(
        "HTTP service",
        f"hey, concurrency {concurrency}",
        len(times) / wall,
        percentile_ms(times, 50),
        percentile_ms(times, 95),
        percentile_ms(times, 99),
        errors,
    )


def run_grpc(target: str, model: str, photo: Path, concurrency: int, duration_s: float) -> Row:
    load = drive(target, model, photo.read_bytes(), concurrency, duration_s)
    return Row(
        "gRPC service",
        f"tritonclient.grpc.aio, concurrency {concurrency}",
        len(load.times) / load.wall_s if load.times else float("nan"),
        percentile_ms(load.times, 50),
        percentile_ms(load.times, 95),
        percentile_ms(load.times, 99),
        load.errors,
    )


def bench_http(
    repository: Path,
    model: str,
    artifact: Path,
    photo: Path,
    concurrencies: Sequence[int],
    duration_s: float,
    log: Path,
    baseline: bool = True,
) -> tuple[list[Row], str]:
    """The service over HTTP (hey on /classify) and the same process over gRPC, and (with ``baseline``) the
    naive baseline servers over HTTP (ONNX Runtime's, OpenVINO's): same model, same photo, interleaved by
    concurrency so that a shared machine's drift favours none of them. Also returns how the server batched
    the model and which engine computes it (its warm-up's choices, from ``GET /models``)."""
    hey = shutil.which("hey")
    if hey is None:
        raise SystemExit("deepvit bench: the HTTP layer needs hey (Debian: apt-get install hey)")
    port, grpc_port = free_port(), free_port()
    proc = serve(repository, model, port, log, {"DEEPVIT_GRPC_PORT": str(grpc_port)})
    naive: dict[str, tuple[str, subprocess.Popen[bytes]]] = {}  # layer -> (url, process)
    if baseline:
        for layer, module, suffix in NAIVE_SERVERS:
            naive_port = free_port()
            cmd = [sys.executable, "-m", module, str(artifact), "--port", str(naive_port)]
            naive[layer] = (f"http://127.0.0.1:{naive_port}", start(cmd, dict(os.environ), log.with_suffix(suffix)))
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc)
        batching = _batching(url, model)
        for naive_url, naive_proc in naive.values():
            wait_ready(naive_url, naive_proc)
        http, grpc, naives = [], [], []
        target = f"127.0.0.1:{grpc_port}"
        for c in concurrencies:
            run_hey(hey, url + "/classify", photo, c, 1)  # not measured: connections and queues warm up
            http.append(run_hey(hey, url + "/classify", photo, c, duration_s))
            run_grpc(target, model, photo, c, 1)
            grpc.append(run_grpc(target, model, photo, c, duration_s))
            for layer, (naive_url, _) in naive.items():
                run_hey(hey, naive_url + "/classify", photo, c, 1)
                r = run_hey(hey, naive_url + "/classify", photo, c, duration_s)
                naives.append(Row(layer, r.setting, r.images_per_s, r.p50_ms, r.p95_ms, r.p99_ms, r.errors))
        return http + grpc + naives, batching
    finally:
        stop(proc)
        for _, naive_proc in naive.values():
            stop(naive_proc)
        for _, _, suffix in NAIVE_SERVERS:
            log.with_suffix(suffix).unlink(missing_ok=True)


# The naive servers a user would otherwise write: (layer, module, log suffix).
NAIVE_SERVERS = (
    ("naive baseline", "deepvit.bench.baseline", ".baseline.log"),
    ("naive OpenVINO", "deepvit.bench.baseline_openvino", ".baseline-openvino.log"),
)


def _batching(url: str, model: str) -> str:
    """How the server batches ``model`` and which engine computes it, as its ``GET /models`` says."""
    with urllib.request.urlopen(url + "/models", timeout=10) as r:
        found = [m for m in json.load(r)["models"] if m["name"] == model]
    b = found[0]["batching"]
    solo = " and a solo session over every core" if b.get("solo_session") else ""
    e = found[0].get("engine") or {}
    engine = f"engine {e['name']} ({e['precision']}, chosen by {e['chosen_by']}), " if e else ""
    return (
        f"{engine}batches of at most {b['max_batch_size']} (chosen by {b['chosen_by']}), {b['instances']} instance(s) "
        f"(chosen by {b['instances_chosen_by']}){solo}"
    )


def _fmt(v: float | None, digits: int = 1) -> str:
    return "-" if v is None else f"{v:,.{digits}f}"


def render(rows: list[Row], header: str) -> str:
    lines = [
        header,
        "",
        "| layer | setting | images/s | p50 ms | p95 ms | p99 ms | errors |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.layer} | {r.setting} | {_fmt(r.images_per_s)} | {_fmt(r.p50_ms)} | {_fmt(r.p95_ms)} | "
            f"{_fmt(r.p99_ms)} | {r.errors} |"
        )
    return "\n".join(lines)


def _overhead_at_c1(rows: list[Row], decode_ms: float) -> str:
    """The service's cost over the work itself, at concurrency 1: its p50 less raw ONNX Runtime's at batch 1
    (default threads) and one decode; the naive baseline's beside it. Empty where either was not measured."""

    def p50(layer: str, setting: str) -> float | None:
        return next((r.p50_ms for r in rows if r.layer == layer and r.setting == setting), None)

    raw, ours = p50("onnxruntime", "batch 1"), p50("HTTP service", "hey, concurrency 1")
    if raw is None or ours is None:
        return ""
    work = raw + decode_ms
    naive = p50("naive baseline", "hey, concurrency 1")
    beside = f"; the naive baseline's {naive - work:+.1f} ms" if naive is not None else ""
    return (
        f"\n\nconcurrency 1: HTTP p50 {ours:.1f} ms = raw ONNX Runtime at batch 1 ({raw:.1f} ms) + one decode "
        f"({decode_ms:.1f} ms) {ours - work:+.1f} ms{beside}"
    )


def engine_rows(limits: Sequence[MachineLimit]) -> list[Row]:
    """Raw engines × precisions × batch sizes: each engine's single-threaded images/s by batch size (its
    milliseconds per image in the p50 column)."""
    rows = []
    for lim in limits:
        refused = "" if lim.allowed else ", its gate refuses it"
        layer = f"engine {lim.engine} ({lim.precision}), 1 thread{refused}"
        rows += [Row(layer, f"batch {b}", 1000.0 / ms, p50_ms=ms) for b, ms in lim.infer_ms_by_batch.items()]
    return rows


def _limits(limits: Sequence[MachineLimit]) -> str:
    return ", ".join(
        f"{m.engine} ({m.precision}) {m.images_per_s:.1f} img/s{'' if m.allowed else ' (gate refuses)'}" for m in limits
    )


def served_model(repository: Path, model: str | None) -> tuple[str, int, Path]:
    """The model a benchmark serves (``model``, or the repository's first), its latest version and that
    version's artifact."""
    found = scan_repository(repository)
    if not found:
        raise SystemExit(f"deepvit bench: no model in {repository}")
    name = model or sorted(found)[0]
    if name not in found:
        raise SystemExit(f"deepvit bench: model {name!r} is not in {repository} (found {', '.join(found)})")
    version = max(found[name])
    return name, version, found[name][version]


def photographs(folder: Path) -> list[Path]:
    """The ``*.jpg`` photographs a benchmark sends, in name order (the first is the one a single-photo run
    sends)."""
    photos = sorted(folder.glob("*.jpg"))
    if not photos:
        raise SystemExit(f"deepvit bench: no *.jpg photographs in {folder}")
    return photos


def run_bench(
    repository: Path,
    model: str | None,
    photos_dir: Path,
    output: Path | None,
    concurrencies: Sequence[int] = (1, 8, 32, 64),
    batch_sizes: Sequence[int] = (1, 2, 4, 8, 16, 32, 64),
    duration_s: float = 10.0,
    min_time_s: float = 3.0,
) -> str:
    name, version, artifact = served_model(repository, model)
    photos = photographs(photos_dir)
    print(f"benchmarking {name} v{version}: every engine, single-threaded…", file=sys.stderr, flush=True)
    limits = measure_limits(artifact, photos[0].read_bytes(), batch_sizes, min_time_s)
    limit = limits[0]  # the fastest engine the artifact's gate allows
    settings = Settings(model_repository=repository, providers=["cuda", "cpu"])
    rt = ModelRuntime(artifact, settings)
    if rt.provider not in GPU_PROVIDERS.values() and rt.engine.name != limit.engine:
        rt = ModelRuntime(artifact, settings.model_copy(update={"engine": limit.engine}))
    print(f"benchmarking {name} v{version} on {rt.engine.name} ({rt.precision})…", file=sys.stderr, flush=True)
    rows = bench_runtime(rt, batch_sizes, min_time_s)
    rows.append(bench_pipeline(rt, photos[0].read_bytes(), settings.max_batch_size, os.cpu_count() or 2, min_time_s))
    rows += engine_rows(limits)
    m = rt.meta
    described = f"{m.arch}, {m.preprocess.crop_size} px, {m.precision}, {m.weights}"
    raw_engine = f"{rt.engine.name} ({rt.precision})"
    del rt  # free the session before the servers take the cores
    log = (output or Path(".")) / f".bench-{name}-server.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    served, batching = bench_http(repository, name, artifact, photos[0], concurrencies, duration_s, log)
    rows += served
    log.unlink(missing_ok=True)
    pipeline = next(r for r in rows if r.layer == "in-process pipeline").images_per_s
    http = {r.setting: r.images_per_s for r in rows if r.layer == "HTTP service"}
    ratios = ", ".join(f"{k.split()[-1]}: {v / pipeline:.0%}" for k, v in http.items())
    grpc = [r.images_per_s for r in rows if r.layer == "gRPC service"]
    versus = ", ".join(f"{k.split()[-1]}: {g / v:.2f}x" for (k, v), g in zip(http.items(), grpc, strict=True))
    naive = [r.images_per_s for r in rows if r.layer == "naive baseline"]
    over_naive = ", ".join(f"{k.split()[-1]}: {v / b:.2f}x" for (k, v), b in zip(http.items(), naive, strict=True))
    naive_ov = [r.images_per_s for r in rows if r.layer == "naive OpenVINO"]
    over_ov = ", ".join(f"{k.split()[-1]}: {v / b:.2f}x" for (k, v), b in zip(http.items(), naive_ov, strict=True))
    of_limit = ", ".join(f"{k.split()[-1]}: {v / limit.images_per_s:.2f}" for k, v in http.items())
    # No server serves more than the limit: where the baseline comes close, this bounds any lead over it.
    headroom = ", ".join(f"{k.split()[-1]}: {limit.images_per_s / b:.2f}x" for k, b in zip(http, naive, strict=True))
    header_overhead = _overhead_at_c1(rows, limit.decode_ms)
    header = (
        f"### {name} v{version} ({described}) on {platform.machine()}, {os.cpu_count()} CPUs\n\n"
        f"{dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC · photo {photos[0].name} · "
        f"served with {batching}, max_queue_delay {settings.max_queue_delay_ms:g} ms\n\n"
        f"HTTP throughput / in-process pipeline, by concurrency: {ratios}\n\n"
        f"gRPC throughput / HTTP throughput, by concurrency: {versus}\n\n"
        f"HTTP throughput / naive baseline's (one ONNX Runtime call per request), by concurrency: {over_naive}; "
        f"the most any server could lead it by here (machine limit / baseline's throughput): {headroom}\n\n"
        f"HTTP throughput / naive OpenVINO server's (its throughput hint, one call per request), by concurrency: "
        f"{over_ov}\n\n"
        f"{limit.describe()}; HTTP throughput / machine limit, by concurrency: {of_limit}\n\n"
        f"limits by engine (single-threaded, each at its best batch): {_limits(limits)}; the onnxruntime rows "
        f"below computed on {raw_engine}, over every core"
        f"{header_overhead}"
    )
    table = render(rows, header)
    if output is not None:
        output.mkdir(parents=True, exist_ok=True)
        chart = draw(rows, limit.images_per_s, f"{name} v{version} ({described})", output / f"{name}.png")
        (output / f"{name}.md").write_text(f"<!-- written by deepvit bench -->\n{table}\n\n![chart]({chart.name})\n")
    return table
