"""Helpers of the deployment suite: paths, the metric contract, PromQL name extraction, a Dockerfile
reader, and a server process on loopback that stops by itself."""

from __future__ import annotations

import io
import json
import re
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
TOOLS_VENV = ROOT / ".venv-tools"

# docs/architecture.md, Metrics: the metrics every dashboard and alert may name (names are a contract).
CONTRACT_METRICS = {
    "deepvit_http_requests_total": "counter",
    "deepvit_request_duration_seconds": "histogram",
    "deepvit_preprocess_seconds": "histogram",
    "deepvit_queue_wait_seconds": "histogram",
    "deepvit_inference_seconds": "histogram",
    "deepvit_batch_size": "histogram",
    "deepvit_queue_depth": "gauge",
    "deepvit_inflight_requests": "gauge",
    "deepvit_images_total": "counter",
    "deepvit_rejected_requests_total": "counter",
    "deepvit_model_ready": "gauge",
    "deepvit_model_info": "gauge",
}
# Series that Prometheus makes itself about a scrape, not the service.
PROMETHEUS_SERIES = {"up"}
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")

_PROMQL_FUNCTIONS_AND_WORDS = {
    "sum", "avg", "max", "min", "count", "rate", "irate", "increase", "histogram_quantile", "by", "without",
    "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "clamp_min", "clamp_max",
    "avg_over_time", "max_over_time", "min_over_time", "label_values", "topk", "bottomk", "abs", "bool",
    "offset", "le", "vector", "scalar", "time", "absent",
}  # fmt: skip


def series_names(expr: str) -> set[str]:
    """Metric names an expression selects (label matchers, strings and template variables removed)."""
    text = re.sub(r"label_values\((.*),\s*\w+\s*\)", r"\1", expr)  # Grafana: label_values(series, label)
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', text)  # string literals
    text = re.sub(r"\{[^{}]*\}", "", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # range selectors
    text = re.sub(r"\$\w+|\$\{\w+\}|<<\.\w+>>", "", text)  # Grafana variables, adapter templates
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    names = set(re.findall(r"\b[a-zA-Z_:][a-zA-Z0-9_:]*\b", text))
    return {n for n in names if n not in _PROMQL_FUNCTIONS_AND_WORDS and not re.fullmatch(r"\d.*|e\d+", n)}


def base_metric(name: str) -> str:
    """The family a sample belongs to: histogram suffixes removed where the family is a histogram."""
    for suffix in HISTOGRAM_SUFFIXES:
        stem = name.removesuffix(suffix)
        if stem != name and CONTRACT_METRICS.get(stem) == "histogram":
            return stem
    return name


# ---------------------------------------------------------------------------------------------------
# Dockerfiles


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [arg for kw, arg in self.instructions if kw == keyword]

    def last(self, keyword: str) -> str | None:
        found = self.all(keyword)
        return found[-1] if found else None

    def env(self) -> dict[str, str]:
        """ENV of this stage, ``$VAR`` references to earlier values and the base's PATH expanded."""
        env: dict[str, str] = {"PATH": "/usr/local/bin:/usr/bin:/bin"}
        for arg in self.all("ENV"):
            for key, value in re.findall(r'(\w+)=("(?:[^"\\]|\\.)*"|\S+)', arg):
                value = value[1:-1] if value.startswith('"') else value
                env[key] = re.sub(r"\$(\w+)|\$\{(\w+)\}", lambda m: env.get(m[1] or m[2], ""), value)
        return env


def read_dockerfile(path: Path) -> list[Stage]:
    """Stages of a Dockerfile: continuation lines joined, comments dropped, instructions in order."""
    logical: list[str] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1].rstrip() + " "
            continue
        logical.append((pending + line).strip())
        pending = ""
    stages: list[Stage] = []
    for line in logical:
        keyword, _, arg = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            parts = arg.split()
            name = parts[2] if len(parts) >= 3 and parts[1].upper() == "AS" else str(len(stages))
            stages.append(Stage(name=name, base=parts[0]))
        elif stages:
            stages[-1].instructions.append((keyword, arg.strip()))
    return stages


def dockerignore_excludes(rel: str, patterns: list[str]) -> bool:
    """Docker's .dockerignore rules: the last matching pattern wins, `!` re-includes, a pattern that
    matches a directory covers what is under it, `**` spans directories."""
    excluded = False
    parts = rel.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for raw in patterns:
        negate = raw.startswith("!")
        pattern = raw[1:] if negate else raw
        pattern = pattern.strip("/")
        regex = re.escape(pattern).replace(r"\*\*/", "(?:.*/)?").replace(r"\*\*", ".*")
        regex = regex.replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
        if any(re.fullmatch(regex, c) for c in candidates):
            excluded = not negate
    return excluded


def exec_form(arg: str) -> list[str]:
    """The JSON array of an exec-form instruction (ENTRYPOINT, CMD, HEALTHCHECK ... CMD)."""
    value = json.loads(arg)
    assert isinstance(value, list), arg
    assert all(isinstance(v, str) for v in value), arg
    return value


# ---------------------------------------------------------------------------------------------------
# Processes on loopback


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return int(r.status), r.read()
    except urllib.error.HTTPError as e:
        body = e.read()
        e.close()
        return int(e.code), body
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return 0, b""


def http_post(url: str, body: bytes, content_type: str, timeout: float = 30.0) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=body, method="POST", headers={"content-type": content_type})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return int(r.status), r.read()
    except urllib.error.HTTPError as e:
        data = e.read()
        e.close()
        return int(e.code), data


def png_bytes(size: tuple[int, int] = (96, 80), color: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


@dataclass
class ServerProcess:
    proc: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, timeout: float = 40.0) -> int:
        """SIGTERM, wait for the drain; SIGKILL if it overruns. Returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        return int(self.proc.returncode)


def start_server(
    command: list[str],
    repository: Path,
    log: Path,
    *,
    env: dict[str, str] | None = None,
    user: int | None = None,
    group: int | None = None,
    cwd: Path | None = None,
    ready_timeout: float = 90.0,
) -> ServerProcess:
    """``command --model-repository R --host 127.0.0.1 --port P`` (unless the command already names
    them), waits until /readyz answers 200; the log goes to ``log``."""
    port = free_port()
    argv = list(command)
    if "--model-repository" not in argv:
        argv += ["--model-repository", str(repository)]
    if "--host" not in argv:
        argv += ["--host", "127.0.0.1"]
    if "--port" not in argv:
        argv += ["--port", str(port)]
    else:
        port = int(argv[argv.index("--port") + 1])
    if "--grpc-port" not in argv:
        argv += ["--grpc-port", str(free_port())]  # not the default 8001, which another server may hold
    with log.open("wb") as sink:
        proc = subprocess.Popen(
            argv,
            stdout=sink,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=cwd,
            user=user,
            group=group,
            extra_groups=[] if user is not None else None,
        )
    server = ServerProcess(proc, port, log)
    deadline = time.monotonic() + ready_timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the server exited with {proc.returncode}:\n{server.log_tail()}")
        status, _ = http_get(f"{server.url}/readyz", timeout=2)
        if status == 200:
            return server
        time.sleep(0.2)
    server.stop()
    raise AssertionError(f"the server was not ready within {ready_timeout:.0f} s:\n{server.log_tail()}")


def prom_query(base: str, query: str, timeout: float = 10.0) -> list[dict[str, Any]]:
    """An instant PromQL query through Prometheus' HTTP API; raises on a query error."""
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": query})
    status, body = http_get(url, timeout=timeout)
    payload = json.loads(body or b"{}")
    assert (status, payload.get("status")) == (200, "success"), f"{query!r}: {status} {payload}"
    result: list[dict[str, Any]] = payload["data"]["result"]
    return result
