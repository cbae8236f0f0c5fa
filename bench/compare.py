"""``deepvit bench --compare``: several models (the same network in fp32 and int8, say) in one run.

Raw ONNX Runtime is measured model after model within each batch size, so that a shared machine's noise of
the moment hits them all; then each is served over HTTP (a real ``deepvit serve``, driven by ``hey``) in
turn. Every figure is also given as a ratio to the first model's: the ratios are what to quote.
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from deepvit.service.config import Settings
from deepvit.service.models.disk import scan_repository
from deepvit.service.runtime import ModelRuntime

from .run import _fmt, _timed_loop, bench_http, photographs


@dataclass
class Figure:
    model: str
    precision: str
    layer: str
    setting: str
    images_per_s: float
    p50_ms: float | None = None
    p99_ms: float | None = None
    errors: int = 0


def raw_figures(runtimes: dict[str, ModelRuntime], batch_sizes: Sequence[int], min_time_s: float) -> list[Figure]:
    out = []
    rng = np.random.default_rng(0)
    for b in batch_sizes:
        for name, rt in runtimes.items():
            crop = rt.meta.preprocess.crop_size
            x = rng.integers(0, 256, (b, crop, crop, 3), dtype=np.uint8)
            n, elapsed = _timed_loop(lambda x=x, rt=rt: rt.run(x), min_time_s)
            figure = Figure(name, rt.meta.precision, "onnxruntime", f"batch {b}", b * n / elapsed, elapsed / n * 1000)
            out.append(figure)
    return out


def render(figures: list[Figure], header: str) -> str:
    first = figures[0].model
    base = {f.setting: f.images_per_s for f in figures if f.model == first}
    lines = [
        header,
        "",
        f"| layer | setting | model | precision | images/s | × {first} | p50 ms | p99 ms | errors |",
        "|---|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for f in sorted(figures, key=lambda f: (f.layer != "onnxruntime", f.layer, _order(f.setting))):
        ratio = f.images_per_s / base[f.setting] if base.get(f.setting) else float("nan")
        lines.append(
            f"| {f.layer} | {f.setting} | {f.model} | {f.precision} | {_fmt(f.images_per_s)} | {ratio:.2f} | "
            f"{_fmt(f.p50_ms)} | {_fmt(f.p99_ms)} | {f.errors} |"
        )
    return "\n".join(lines)


def _order(setting: str) -> int:
    return int(setting.split()[-1])


def run_compare(
    repository: Path,
    models: Sequence[str],
    photos_dir: Path,
    output: Path | None,
    concurrencies: Sequence[int],
    batch_sizes: Sequence[int],
    duration_s: float,
    min_time_s: float,
) -> str:
    found = scan_repository(repository)
    missing = [m for m in models if m not in found]
    if missing:
        raise SystemExit(f"deepvit bench: {', '.join(missing)} not in {repository} (found {', '.join(found)})")
    photos = photographs(photos_dir)
    artifacts = {m: found[m][max(found[m])] for m in models}  # each model's latest version
    settings = Settings(model_repository=repository, providers=["cuda", "cpu"])
    runtimes = {m: ModelRuntime(artifacts[m], settings) for m in models}
    print(f"comparing {', '.join(models)} on {next(iter(runtimes.values())).provider}…", file=sys.stderr, flush=True)
    figures = raw_figures(runtimes, batch_sizes, min_time_s)
    precision = {m: rt.meta.precision for m, rt in runtimes.items()}
    runtimes.clear()  # free the sessions before the servers take the cores
    for m in models:
        log = (output or Path(".")) / f".bench-{m}-server.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        served, _ = bench_http(repository, m, artifacts[m], photos[0], concurrencies, duration_s, log, baseline=False)
        for row in served:
            figures.append(
                Figure(m, precision[m], row.layer, row.setting, row.images_per_s, row.p50_ms, row.p99_ms, row.errors)
            )
        log.unlink(missing_ok=True)
    header = (
        f"### {' vs '.join(models)} on {platform.machine()}, {os.cpu_count()} CPUs\n\n"
        f"{dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC · photo {photos[0].name} · raw ONNX Runtime interleaved "
        "model by model within each batch size; then each model served in turn"
    )
    table = render(figures, header)
    if output is not None:
        output.mkdir(parents=True, exist_ok=True)
        (output / f"{'-vs-'.join(models)}.md").write_text(f"<!-- written by deepvit bench --compare -->\n{table}\n")
    return table
