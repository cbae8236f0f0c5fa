"""``deepvit bench --predict``: the whole ``deepvit predict`` command on a folder of a few thousand photographs,
beside the HTTP service at concurrency 32 on the same model and the same files, and beside the folder's limit.

The folder is made from the photographs of ``--photos``: regions of each at several sizes (the long side
from 256 to 1024 px), as JPEG of several qualities, PNG and WebP, so that decoding costs what a mixed
collection's does. The limit is this machine's for that folder: cores / (mean decode + crop CPU per image over
the folder + single-threaded inference CPU per image at its best batch), as ``bench/limit.py`` measures it.

The command is timed from its start to its exit (Python's and Ray's start-up, listing, reading, writing
and the final tally included); its own summary gives the rate once Ray was up. On a shared machine the wall
clock says as much about the neighbours as about the command, so the run also reports the CPU time of the
command's processes per image beside the limit's, and the share of the machine other work took meanwhile.
The HTTP service is driven closed-loop by 32 clients over kept-alive connections, each sending the folder's
files in turn.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from PIL import Image

from .limit import MachineLimit, measure_limit
from .openloop import _Connection
from .report import key_value_table
from .server import free_port, serve, stop, wait_ready

HTTP_CONCURRENCY = 32
FORMATS = (("JPEG", ".jpg", 0.7), ("PNG", ".png", 0.15), ("WEBP", ".webp", 0.15))


def make_folder(photos: Sequence[Path], folder: Path, count: int, seed: int = 0) -> list[Path]:
    """``count`` images made from ``photos`` (regions, sizes and formats drawn with ``seed``), in subfolders
    of a hundred."""
    rng = random.Random(seed)
    sources = [Image.open(p).convert("RGB") for p in photos]
    made = []
    for i in range(count):
        src = sources[i % len(sources)]
        w, h = src.size
        rw, rh = round(w * rng.uniform(0.5, 1.0)), round(h * rng.uniform(0.5, 1.0))
        left, top = rng.randint(0, w - rw), rng.randint(0, h - rh)
        region = src.crop((left, top, left + rw, top + rh))
        long_side = rng.randint(256, 1024)
        scale = long_side / max(rw, rh)
        region = region.resize((max(1, round(rw * scale)), max(1, round(rh * scale))), Image.Resampling.BILINEAR)
        fmt, suffix, _ = rng.choices(FORMATS, weights=[f[2] for f in FORMATS])[0]
        path = folder / f"{i // 100:03d}" / f"{i:05d}{suffix}"
        path.parent.mkdir(parents=True, exist_ok=True)
        region.save(path, format=fmt, **({"quality": rng.randint(70, 95)} if fmt != "PNG" else {}))
        made.append(path)
    return made


async def _closed_loop(url: str, bodies: Sequence[bytes], concurrency: int, duration_s: float) -> tuple[int, int]:
    """``concurrency`` clients, each sending the next body as soon as its previous answer is in, for
    ``duration_s``; (answers with 200, others)."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    requests = [
        f"POST {parts.path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/octet-stream\r\n"
        f"Content-Length: {len(b)}\r\n\r\n".encode()
        + b
        for b in bodies
    ]
    turn = itertools.count()
    ok = failed = 0
    end = asyncio.get_running_loop().time() + duration_s

    async def client() -> None:
        nonlocal ok, failed
        conn = _Connection(*await asyncio.open_connection(host, port))
        try:
            while asyncio.get_running_loop().time() < end:
                status, _, _ = await conn.exchange(requests[next(turn) % len(requests)])
                ok, failed = (ok + 1, failed) if status == 200 else (ok, failed + 1)
        finally:
            conn.close()

    await asyncio.gather(*(client() for _ in range(concurrency)))
    return ok, failed


@dataclass(frozen=True)
class HttpRate:
    images_per_s: float
    errors: int
    engine: str = ""  # what the service chose: engine, instances, batch (GET /models)


def http_rate(repository: Path, model: str, files: Sequence[Path], duration_s: float, log: Path) -> HttpRate:
    port = free_port()
    proc = serve(repository, model, port, log)
    url = f"http://127.0.0.1:{port}"
    bodies = [f.read_bytes() for f in files]
    try:
        wait_ready(url, proc)
        asyncio.run(_closed_loop(url + "/classify", bodies, HTTP_CONCURRENCY, 2.0))  # not measured: warm-up
        started = time.perf_counter()
        ok, failed = asyncio.run(_closed_loop(url + "/classify", bodies, HTTP_CONCURRENCY, duration_s))
        return HttpRate(ok / (time.perf_counter() - started), failed, _served_engine(url))
    finally:
        stop(proc)


def _served_engine(url: str) -> str:
    """What the service computes with, as ``GET /models`` reports it."""
    with urllib.request.urlopen(url + "/models", timeout=10) as answer:
        (served,) = json.load(answer)["models"]
    batching = served["batching"]
    return (
        f"{served['engine']['name']}, {batching['instances']} instance{'s' if batching['instances'] != 1 else ''}"
        f"{' + one over every core' if batching['solo_session'] else ''}, batches up to {batching['max_batch_size']}"
    )


@dataclass(frozen=True)
class CommandRun:
    images: int
    wall_s: float
    summary: dict[str, float | int | str | bool | None]
    cpu_s: float  # CPU time of the command and every process it started (Ray's included)
    machine_busy_s: float  # CPU time of the whole machine meanwhile

    @property
    def images_per_s(self) -> float:
        return self.images / self.wall_s

    @property
    def others_share(self) -> float:
        """The share of the machine's cores that other work took while the command ran."""
        return max(0.0, self.machine_busy_s - self.cpu_s) / ((os.cpu_count() or 1) * self.wall_s)


_TICK = os.sysconf("SC_CLK_TCK")


def _machine_busy_s() -> float:
    fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / _TICK  # all but idle and iowait


def _tree_cpu(root: int, seen: dict[int, float]) -> None:
    """Record the CPU seconds so far of ``root`` and of every process under it (by /proc's parent links)."""
    parent: dict[int, int] = {}
    cpu: dict[int, float] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        pid = int(stat.parent.name)
        parent[pid] = int(fields[1])
        cpu[pid] = (int(fields[11]) + int(fields[12])) / _TICK  # utime, stime
    for pid, used in cpu.items():
        p = pid
        while p > 1 and p != root:
            p = parent.get(p, 0)
        if p == root:
            seen[pid] = max(seen.get(pid, 0.0), used)


def predict_command(folder: Path, artifact: Path, output: Path, log: Path) -> CommandRun:
    """``deepvit predict`` as a user runs it, timed from its start to its exit, with the CPU time of its
    processes (sampled every 0.2 s: a process's last moments before it exits are not counted)."""
    cmd = [sys.executable, "-m", "deepvit.cli", "predict", str(folder), "--artifact", str(artifact)]
    cmd += ["--output", str(output), "--no-progress", "--json"]
    seen: dict[int, float] = {}
    busy = _machine_busy_s()
    started = time.perf_counter()
    with log.open("wb") as err, tempfile.TemporaryFile() as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err)
        while True:
            _tree_cpu(proc.pid, seen)
            try:
                proc.wait(0.2)
                break
            except subprocess.TimeoutExpired:
                continue
        wall = time.perf_counter() - started
        busy = _machine_busy_s() - busy
        out.seek(0)
        stdout = out.read().decode()
    if proc.returncode != 0:
        raise SystemExit(f"deepvit bench: deepvit predict exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
    summary = json.loads(stdout.strip().splitlines()[-1])
    return CommandRun(int(summary["written"]), wall, summary, sum(seen.values()), busy)


def _median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else 0.0


def _started(run: CommandRun) -> float:
    return float(run.summary["images_per_s_once_started"] or 0.0)


def render(limit: MachineLimit, runs: Sequence[CommandRun], https: Sequence[HttpRate], images: int) -> str:
    """Medians over the rounds (the HTTP service and the command alternate, so that both see the same
    machine), each round's figures beside them."""
    whole = _median([r.images_per_s for r in runs])
    started = _median([_started(r) for r in runs])
    http = _median([h.images_per_s for h in https])
    cpu_s = _median([r.cpu_s for r in runs])

    def each(values: Sequence[float], fmt: str = "{:.1f}") -> str:
        return "rounds: " + ", ".join(fmt.format(v) for v in values)

    ratios = [_started(r) / h.images_per_s for r, h in zip(runs, https, strict=True)]
    last = runs[-1].summary
    engines: object = last.get("engines") or {}
    rows = [
        ("folder's limit", f"{limit.images_per_s:.1f} images/s"),
        ("deepvit predict, whole command", f"{whole:.1f} images/s ({each([r.images_per_s for r in runs])})"),
        (
            "deepvit predict, once Ray was up",
            f"{started:.1f} images/s ({each([_started(r) for r in runs])}; Ray up in {last['startup_seconds']} s)",
        ),
        (
            f"HTTP service, concurrency {HTTP_CONCURRENCY}",
            f"{http:.1f} images/s ({each([h.images_per_s for h in https])}; {sum(h.errors for h in https)} errors)",
        ),
        ("whole command / folder's limit", f"{whole / limit.images_per_s:.2f}"),
        (
            "CPU per image: the limit's / the whole command's",
            f"{limit.decode_ms + limit.infer_ms:.1f} ms / {1000 * cpu_s / images:.1f} ms = "
            f"{(limit.decode_ms + limit.infer_ms) * images / (1000 * cpu_s):.2f}",
        ),
        ("other work's share of the machine meanwhile", each([r.others_share for r in runs], "{:.0%}")),
        (
            "once Ray was up / HTTP service",
            f"{started / http:.2f}x ({each(ratios, '{:.2f}x')})",
        ),
        ("predict's cluster and engines", f"{last['cluster']}; rows by engine {engines}"),
        ("the service's engine", https[-1].engine),
    ]
    return f"{limit.describe()}\n\n{key_value_table(rows)}"


def draw(limit: MachineLimit, runs: Sequence[CommandRun], https: Sequence[HttpRate], title: str, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bars = {
        "deepvit predict\nwhole command": _median([r.images_per_s for r in runs]),
        "deepvit predict\nonce Ray was up": _median([_started(r) for r in runs]),
        f"HTTP service\nconcurrency {HTTP_CONCURRENCY}": _median([h.images_per_s for h in https]),
    }
    fig, ax = plt.subplots(figsize=(8, 3.6))
    ax.barh(list(bars), list(bars.values()), color=["tab:blue", "tab:cyan", "tab:orange"])
    ax.axvline(limit.images_per_s, color="grey", linestyle="--", label="folder's limit")
    ax.axvline(0.6 * limit.images_per_s, color="grey", linestyle=":", label="0.6 x limit")
    ax.set_xlabel(f"images/s (median of {len(runs)} rounds)")
    ax.invert_yaxis()
    ax.legend(loc="lower right")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_predict_bench(
    repository: Path,
    model: str,
    artifact: Path,
    photos: Sequence[Path],
    output: Path | None,
    images: int,
    duration_s: float,
    min_time_s: float,
    rounds: int = 3,
) -> tuple[str, str]:
    """(heading and subtitle, table); writes the chart beside ``output``'s table."""
    with tempfile.TemporaryDirectory(prefix="deepvit-bench-predict-") as tmp:
        work = Path(tmp)
        print(f"making {images} images from {len(photos)} photographs…", file=sys.stderr, flush=True)
        files = make_folder(photos, work / "photos", images)
        sample = [f.read_bytes() for f in files[:: max(1, len(files) // 300)]]
        print("measuring the folder's limit…", file=sys.stderr, flush=True)
        limit = measure_limit(artifact, sample, [1, 2, 4, 8, 16, 32], min_time_s)
        https, runs = [], []
        for i in range(1, rounds + 1):  # alternated, so that a slow spell of a shared machine falls on both
            print(
                f"round {i}/{rounds}: the HTTP service at concurrency {HTTP_CONCURRENCY}…", file=sys.stderr, flush=True
            )
            https.append(http_rate(repository, model, files, duration_s, work / f"server-{i}.log"))
            print(f"round {i}/{rounds}: deepvit predict on the folder…", file=sys.stderr, flush=True)
            runs.append(predict_command(work / "photos", artifact, work / f"out-{i}", work / f"predict-{i}.log"))
    kinds = ", ".join(f"{fmt} {share:.0%}" for fmt, _, share in FORMATS)
    subtitle = (
        f"{images} images made from {len(photos)} photographs (long side 256-1024 px; {kinds}); deepvit predict with "
        f"its defaults on a local Ray; the HTTP service with its defaults, {HTTP_CONCURRENCY} closed-loop clients "
        f"for {duration_s:g} s; {rounds} rounds of both, alternated"
    )
    table = render(limit, runs, https, images)
    if output is not None:
        output.mkdir(parents=True, exist_ok=True)
        title = f"{model}: deepvit predict and the HTTP service"
        chart = draw(limit, runs, https, title, output / f"{model}-predict.png")
        table += f"\n\n![chart]({chart.name})"
    return subtitle, table
