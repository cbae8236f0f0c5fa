"""``deepvit bench --overload``: the day the traffic is three times what the server can take.

One real ``deepvit serve`` process. First its capacity: ``hey`` closed-loop at concurrency 8. Then load
offered at ``factor`` times that rate for ``duration`` seconds, open loop: :mod:`.openloop` (in a process of
its own) sends each request at its arrival time in a Poisson process of that rate over kept-alive
connections, whatever the server answers. (``hey -q`` is no open-loop generator at this scale: its workers
tick together, so that it offers bursts of every worker at once with the machine idle in between, and what
it measured was the bursts.) Meanwhile a prober times ``/livez`` every 100 ms and the server's RSS is sampled
every second. The report: goodput (answers per second, and against capacity), how refusals were answered
(503, with ``Retry-After`` or not, p99 latency), p99 of accepted requests, probe latency, RSS growth from
second 10 to the end, the latency of one request right after the load, and how closely the generator kept to
its schedule (its lag, and requests it could not send or that failed without an answer).
"""

from __future__ import annotations

import collections
import csv
import io
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from .openloop import Record, read_csv
from .report import key_value_table, percentile_ms
from .server import free_port, loop_cpu_s, rss_mib, serve, stop, wait_ready


@dataclass
class Overload:
    capacity_rps: float
    offered_rps: float
    duration_s: float
    statuses: collections.Counter[str]
    goodput_rps: float
    accepted_p99_ms: float
    refused_p99_ms: float
    probe_p99_ms: float
    probe_max_ms: float
    probe_failures: int
    rss_start_mib: float
    rss_end_mib: float
    after_ms: float
    deadline_s: float
    refused_with_retry_after: int
    generator_lag_p99_ms: float
    failed: collections.Counter[str]  # requests without an answer, by why
    loop_ms_per_request: float  # the event loop's CPU per request at capacity (closed loop)
    loop_ms_per_refusal: float  # under overload, what is left of its CPU after the accepted ones, per refusal

    def render(self) -> str:
        total = sum(self.statuses.values())
        share = ", ".join(f"{code}: {n / total:.1%}" for code, n in sorted(self.statuses.items()))
        growth = (self.rss_end_mib - self.rss_start_mib) / self.rss_start_mib if self.rss_start_mib else 0.0
        rows = [
            ("capacity (closed loop, c=8)", f"{self.capacity_rps:,.1f} req/s"),
            (
                "offered (open loop, Poisson arrivals)",
                f"{self.offered_rps:,.1f} req/s for {self.duration_s:g} s: {total:,} requests, sent p99 "
                f"{self.generator_lag_p99_ms:,.1f} ms after their arrival time",
            ),
            ("answers by status", share),
            (
                "without an answer",
                ", ".join(f"{n:,} {why}" for why, n in self.failed.most_common()) or "none",
            ),
            ("goodput", f"{self.goodput_rps:,.1f} req/s = {self.goodput_rps / self.capacity_rps:.0%} of capacity"),
            ("p99 of accepted requests", f"{self.accepted_p99_ms:,.0f} ms (deadline {self.deadline_s:g} s)"),
            (
                "p99 of refusals (503)",
                f"{self.refused_p99_ms:,.1f} ms; {self.refused_with_retry_after:,} of "
                f"{self.statuses.get('503', 0):,} with Retry-After",
            ),
            (
                "/livez p99 / max",
                f"{self.probe_p99_ms:,.1f} / {self.probe_max_ms:,.1f} ms, {self.probe_failures} failed",
            ),
            (
                "event loop CPU per request at capacity / per refusal",
                f"{self.loop_ms_per_request:.3f} / {self.loop_ms_per_refusal:.3f} ms (its thread's CPU time; a "
                "refusal's is what the overload's leaves after the accepted requests at capacity's cost)",
            ),
            ("RSS, second 10 → end", f"{self.rss_start_mib:,.0f} → {self.rss_end_mib:,.0f} MiB ({growth:+.1%})"),
            ("one request after the load", f"{self.after_ms:,.1f} ms"),
        ]
        return key_value_table(rows)


def _hey(args: list[str], url: str, photo: Path) -> list[dict[str, str]]:
    hey = shutil.which("hey")
    if hey is None:
        raise SystemExit("deepvit bench: the overload run needs hey (Debian: apt-get install hey)")
    # At the lowest priority: on the server's own machine the load generator takes only what the server
    # leaves, as a client on another machine would take nothing of it.
    nice = [shutil.which("nice") or "nice", "-n", "19"] if shutil.which("nice") else []
    cmd = [*nice, hey, *args, "-m", "POST", "-T", "image/jpeg", "-D", str(photo), "-t", "30", "-o", "csv", url]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=True).stdout
    return list(csv.DictReader(io.StringIO(out)))


def _open_loop(url: str, rate: float, duration_s: float, photo: Path) -> list[Record]:
    """:mod:`.openloop` in a process of its own (so that the prober's timings here do not share its
    interpreter), at normal priority: it must keep to its schedule, and it costs little."""
    with tempfile.TemporaryDirectory(prefix="deepvit-openloop-") as tmp:
        out = Path(tmp) / "records.csv"
        cmd = [sys.executable, "-m", "deepvit.bench.openloop", url, "--rate", f"{rate:.3f}"]
        cmd += [
            "--duration",
            f"{duration_s:g}",
            "--body",
            str(photo),
            "--content-type",
            "image/jpeg",
            "--out",
            str(out),
        ]
        subprocess.run(cmd, check=True, timeout=duration_s + 120)
        return read_csv(out)


def run_overload(
    repository: Path,
    model: str,
    photo: Path,
    factor: float = 3.0,
    duration_s: float = 60.0,
    deadline_s: float = 2.0,
    log: Path | None = None,
    server_tree: Path | None = None,
) -> Overload:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {"DEEPVIT_REQUEST_TIMEOUT_S": f"{deadline_s:g}", "DEEPVIT_MAX_QUEUE_SIZE": "64"}
    proc = serve(repository, model, port, log, env, cwd=server_tree)
    try:
        wait_ready(url, proc)
        _hey(["-z", "2s", "-c", "8"], url + "/classify", photo)  # warms connections and the estimate
        loop_before = loop_cpu_s(proc.pid)
        closed = _hey(["-z", "10s", "-c", "8"], url + "/classify", photo)
        loop_per_request = (loop_cpu_s(proc.pid) - loop_before) / max(1, len(closed))
        ok = [r for r in closed if r["status-code"] == "200"]
        capacity = len(ok) / max(float(r["offset"]) + float(r["response-time"]) for r in ok)
        offered = factor * capacity

        probes: list[float] = []
        failures = 0
        rss: list[tuple[float, float]] = []
        done = threading.Event()

        def probe() -> None:
            nonlocal failures
            while not done.is_set():
                t0 = time.perf_counter()
                try:
                    with urllib.request.urlopen(url + "/livez", timeout=3) as r:
                        r.read()
                    probes.append(time.perf_counter() - t0)
                except OSError:
                    failures += 1
                time.sleep(0.1)

        def sample_rss() -> None:
            t0 = time.monotonic()
            while not done.is_set():
                rss.append((time.monotonic() - t0, rss_mib(proc.pid)))
                done.wait(1.0)

        threads = [threading.Thread(target=probe, daemon=True), threading.Thread(target=sample_rss, daemon=True)]
        for t in threads:
            t.start()
        loop_before = loop_cpu_s(proc.pid)
        records = _open_loop(url + "/classify", offered, duration_s, photo)
        loop_overload = loop_cpu_s(proc.pid) - loop_before
        done.set()
        for t in threads:
            t.join(5)
        time.sleep(1)
        t0 = time.perf_counter()
        with urllib.request.urlopen(
            urllib.request.Request(
                url + "/classify", data=photo.read_bytes(), headers={"Content-Type": "image/jpeg"}, method="POST"
            ),
            timeout=10,
        ) as r:
            r.read()
        after = (time.perf_counter() - t0) * 1000
    finally:
        stop(proc)
    answered = [r for r in records if r.status > 0]
    statuses = collections.Counter(str(r.status) for r in answered)
    accepted = [r.latency for r in answered if r.status == 200]
    refused = [r for r in answered if r.status == 503]
    failed = collections.Counter(
        "not sent: every connection busy" if r.status < 0 else r.error for r in records if r.status <= 0
    )
    late = [v for t, v in rss if t >= 10] or [v for _, v in rss]
    return Overload(
        capacity_rps=capacity,
        offered_rps=offered,
        duration_s=duration_s,
        statuses=statuses,
        goodput_rps=len(accepted) / duration_s,
        accepted_p99_ms=percentile_ms(accepted, 99),
        refused_p99_ms=percentile_ms([r.latency for r in refused], 99),
        probe_p99_ms=percentile_ms(probes, 99),
        probe_max_ms=max(probes) * 1000 if probes else float("nan"),
        probe_failures=failures,
        rss_start_mib=late[0] if late else float("nan"),
        rss_end_mib=late[-1] if late else float("nan"),
        after_ms=after,
        deadline_s=deadline_s,
        refused_with_retry_after=sum(r.retry_after for r in refused),
        generator_lag_p99_ms=percentile_ms([r.lag for r in records if r.status >= 0], 99),
        failed=failed,
        loop_ms_per_request=loop_per_request * 1000,
        loop_ms_per_refusal=max(0.0, loop_overload - len(accepted) * loop_per_request) / max(1, len(refused)) * 1000,
    )
