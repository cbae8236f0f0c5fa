"""A ``deepvit serve`` process for a benchmark: a free port, the start, readiness, the stop (a drain) and its
resident memory. Every benchmark that drives a real server goes through here."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start(cmd: list[str], env: dict[str, str], log: Path | None, cwd: Path | None = None) -> subprocess.Popen[bytes]:
    """Any server process, its output into ``log`` (or nowhere)."""
    with open(log or os.devnull, "wb") as out:
        return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)


def serve(
    repository: Path,
    model: str,
    port: int,
    log: Path | None,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> subprocess.Popen[bytes]:
    """``deepvit serve`` over ``repository`` with ``model`` the default, logging warnings only; ``env`` adds
    or overrides settings."""
    # gRPC off unless asked for: its default port would clash with any other server on the machine.
    settings = {"DEEPVIT_LOG_LEVEL": "warning", "DEEPVIT_DEFAULT_MODEL": model, "DEEPVIT_GRPC_PORT": "0", **(env or {})}
    cmd = [sys.executable, "-m", "deepvit.cli", "serve", "--model-repository", str(repository), "--port", str(port)]
    return start(cmd, {**os.environ, **settings}, log, cwd)


@contextlib.contextmanager
def ready_server(
    repository: Path, model: str, log: Path | None = None, env: dict[str, str] | None = None
) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """``deepvit serve`` on a free port, ready; stopped (drained) at the end. Yields the process and port."""
    port = free_port()
    proc = serve(repository, model, port, log, env)
    try:
        wait_ready(f"http://127.0.0.1:{port}", proc)
        yield proc, port
    finally:
        stop(proc)


def wait_ready(url: str, proc: subprocess.Popen[bytes], timeout_s: float = 300) -> None:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise SystemExit(f"deepvit bench: the server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url + "/readyz", timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.2)
    raise SystemExit("deepvit bench: the server did not become ready")


def stop(proc: subprocess.Popen[Any]) -> None:
    """SIGTERM (the server drains), then a kill if it does not exit within a minute."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def loop_cpu_s(pid: int) -> float:
    """CPU seconds the process's main thread (uvicorn's event loop) has used: its HTTP parsing, routing,
    middleware and answers, without the decode and inference threads."""
    fields = Path(f"/proc/{pid}/task/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime
