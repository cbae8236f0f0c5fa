"""Helpers for tests that run a real ``deepvit serve`` process on loopback."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def export_artifact(output: Path, *args: str) -> Path:
    """``deepvit export`` in a subprocess (as a user runs it); returns the artifact path."""
    cmd = [sys.executable, "-m", "deepvit.cli", "export", *args, "--output", str(output)]
    subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True, timeout=600)
    return output


def export_tiny(repo: Path, name: str = "tiny", version: int = 1, ema: bool = True, precision: str = "fp32") -> Path:
    """The official tiny_cnn checkpoint (real weights from the authors' code) as ``repo/name/version``."""
    args = [
        "--model-config",
        str(DATA / "tiny_cnn.json"),
        "--checkpoint",
        str(DATA / "conformance" / "official_tiny_cnn.pth.tar"),
        "--name",
        name,
        "--precision",
        precision,
    ]
    return export_artifact(repo / name / str(version) / "model.onnx", *args, *(["--ema"] if ema else []))


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    url: str
    log_path: Path
    grpc: str = ""  # host:port of the gRPC Open Inference Protocol

    def client(self, **kw: object) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30, **kw)  # type: ignore[arg-type]

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")

    def terminate(self) -> None:
        self.proc.send_signal(signal.SIGTERM)


def start_server(repo: Path, log_path: Path, env: dict[str, str] | None = None, wait_ready: bool = True) -> Server:
    port, grpc_port = free_port(), free_port()
    full_env = {
        **os.environ,
        "DEEPVIT_PROVIDERS": "cpu",
        "DEEPVIT_LOG_FORMAT": "json",
        "DEEPVIT_GRACE_PERIOD_S": "20",
        "DEEPVIT_GRPC_PORT": str(grpc_port),  # not the default 8001: servers of parallel tests would collide
        **(env or {}),
    }
    cmd = [sys.executable, "-m", "deepvit.cli", "serve", "--model-repository", str(repo), "--port", str(port)]
    with open(log_path, "wb") as log:  # the child keeps its own descriptor
        proc = subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=log, stderr=subprocess.STDOUT)
    server = Server(proc, f"http://127.0.0.1:{port}", log_path, f"127.0.0.1:{full_env['DEEPVIT_GRPC_PORT']}")
    wait_for(server, "/livez" if not wait_ready else "/readyz")
    return server


def wait_for(server: Server, path: str, timeout_s: float = 120) -> None:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if server.proc.poll() is not None:
            raise RuntimeError(f"server exited with {server.proc.returncode}:\n{server.logs()[-3000:]}")
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(server.url + path, timeout=2).status_code == 200:
                return
        time.sleep(0.05)
    raise TimeoutError(f"{path} not 200 after {timeout_s}s:\n{server.logs()[-3000:]}")


def stop_server(server: Server, timeout_s: float = 30) -> int:
    if server.proc.poll() is None:
        server.terminate()
        try:
            server.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            server.proc.kill()
            server.proc.wait(5)
    return server.proc.returncode


@contextlib.contextmanager
def running_server(repo: Path, log_path: Path, env: dict[str, str] | None = None) -> Iterator[Server]:
    server = start_server(repo, log_path, env)
    try:
        yield server
    finally:
        stop_server(server)


def metric_samples(text: str, name: str) -> dict[str, float]:
    """``{labels-string: value}`` for one metric family's samples in Prometheus text."""
    out = {}
    for line in text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key[len(name) :]] = float(value)
    return out
