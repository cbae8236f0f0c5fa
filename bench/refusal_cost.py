"""``deepvit bench --refusal-cost``: the CPU one overload refusal costs the event loop, by where it happens.

Above capacity most requests are refused, and each refusal takes event-loop time from the requests being
served. This runs the app in this process under a real uvicorn (in a thread of its own, with the service's
HTTP protocol) with admission held over its bound, and sends ``requests`` identical ``POST /classify``
requests (a photograph each) with ``hey`` over kept-alive connections, twice: refused by the HTTP protocol
from the request's head (``service/refusals.py``, what ``deepvit serve`` does), and refused by the ASGI
middleware before routing (what it did before). The figure is the server thread's CPU time (user + system,
from ``/proc``) over the requests answered, side by side in one run.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path

from .report import key_value_table


@dataclass
class RefusalCost:
    requests: int
    below_app_us: float  # CPU per refusal, refused by the HTTP protocol
    in_app_us: float  # CPU per refusal, refused by the middleware
    statuses: dict[str, dict[str, int]]

    def render(self) -> str:
        rows = [
            ("requests per path (hey, 16 kept-alive connections)", f"{self.requests:,} (hey: a multiple of 16)"),
            ("refused by the HTTP protocol, from the head (now)", f"{self.below_app_us:,.0f} µs of CPU each"),
            ("refused by the ASGI middleware, before routing (before)", f"{self.in_app_us:,.0f} µs of CPU each"),
            ("in the middleware / below the app", f"{self.in_app_us / self.below_app_us:.2f}"),
            ("answers", "; ".join(f"{k}: {v}" for k, v in self.statuses.items())),
        ]
        return key_value_table(rows)


def _thread_cpu_s(native_id: int) -> float:
    fields = Path(f"/proc/self/task/{native_id}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _measure(repository: Path, photo: Path, requests: int, below_app: bool) -> tuple[float, dict[str, int]]:
    import uvicorn

    from deepvit.service.app import create_app
    from deepvit.service.config import Settings
    from deepvit.service.protocol import http_protocol
    from deepvit.service.refusals import Refusals

    hey = shutil.which("hey")
    if hey is None:
        raise SystemExit("deepvit bench: --refusal-cost needs hey (Debian: apt-get install hey)")
    settings = Settings(model_repository=repository, providers=["cpu"], log_level="warning", grpc_port=0)
    app = create_app(settings)
    ctx = app.state.ctx
    admission = ctx.pipeline.admission
    admission.pending = admission.max_pending_images  # over its bound for the whole run
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(1024)
    refuse = Refusals(ctx) if below_app else None
    config = uvicorn.Config(
        app, http=http_protocol(20.0, lambda: None, refuse), log_config=None, access_log=False, lifespan="off"
    )
    server = uvicorn.Server(config)
    native: list[int] = []

    def run() -> None:
        native.append(threading.get_native_id())
        server.run(sockets=[sock])

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}/classify"
    cmd = [hey, "-n", str(requests), "-c", "16", "-m", "POST", "-T", "image/jpeg", "-D", str(photo), url]
    try:
        subprocess.run([*cmd[:2], "200", *cmd[3:]], capture_output=True, check=True, timeout=120)  # warm
        before = _thread_cpu_s(native[0])
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=600).stdout
        cpu = _thread_cpu_s(native[0]) - before
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()
        ctx.decode_pool.shutdown()
    statuses: dict[str, int] = {}
    for line in out.split("Status code distribution:")[-1].splitlines():
        parts = line.strip().strip("[").split("]")
        if len(parts) == 2 and parts[0].isdigit():
            statuses[parts[0]] = int(parts[1].split()[0])
    return cpu / max(1, sum(statuses.values())) * 1e6, statuses


def run_refusal_cost(repository: Path, photo: Path, requests: int = 20_000) -> RefusalCost:
    below, below_statuses = _measure(repository, photo, requests, below_app=True)
    in_app, in_app_statuses = _measure(repository, photo, requests, below_app=False)
    return RefusalCost(requests, below, in_app, {"HTTP protocol": below_statuses, "middleware": in_app_statuses})
