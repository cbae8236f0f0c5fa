"""SIGTERM under gRPC load: health turns NOT_SERVING with readiness, new calls are UNAVAILABLE with the
reason, every call the server accepted is answered, and the process exits 0 within the grace period."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tg
from grpc_health.v1 import health_pb2, health_pb2_grpc
from serving import export_tiny, start_server, stop_server
from tritonclient.utils import InferenceServerException

pytestmark = pytest.mark.integration

MODEL = "tiny"
GRACE_S = 20


def test_sigterm_under_grpc_load_loses_no_accepted_call(tmp_path: Path) -> None:
    export_tiny(tmp_path / "repo", name=MODEL)
    server = start_server(tmp_path / "repo", tmp_path / "server.log", {"DEEPVIT_GRACE_PERIOD_S": str(GRACE_S)})
    x = np.random.default_rng(0).integers(0, 256, (8, 64, 64, 3), dtype=np.uint8)
    answered: list[int] = []
    endings: list[tuple[str, str]] = []  # how each client's calls ended
    lock = threading.Lock()
    started = threading.Event()

    def load() -> None:
        inp = tg.InferInput("image", list(x.shape), "UINT8")
        inp.set_data_from_numpy(x)
        with tg.InferenceServerClient(server.grpc) as client:
            while True:
                try:
                    got = client.infer(MODEL, [inp], client_timeout=30).as_numpy("logits")
                except InferenceServerException as exc:
                    with lock:
                        endings.append((str(exc.status()), str(exc.message())))
                    return
                assert got is not None
                with lock:
                    answered.append(len(got))
                started.set()

    clients = [threading.Thread(target=load) for _ in range(6)]
    try:
        for t in clients:
            t.start()
        assert started.wait(60)
        time.sleep(0.5)
        with grpc.insecure_channel(server.grpc) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            assert (
                health.Check(health_pb2.HealthCheckRequest(), timeout=10).status
                == health_pb2.HealthCheckResponse.SERVING
            )
            server.terminate()
            t0 = time.monotonic()
            while (
                health.Check(health_pb2.HealthCheckRequest(), timeout=10).status
                != health_pb2.HealthCheckResponse.NOT_SERVING
            ):
                assert time.monotonic() - t0 < 5, "health still SERVING 5 s after SIGTERM"
                time.sleep(0.02)
            with tg.InferenceServerClient(server.grpc) as probe:
                assert probe.is_server_live()
                assert not probe.is_server_ready()
        for t in clients:
            t.join(GRACE_S + 10)
        code = server.proc.wait(GRACE_S + 10)
    finally:
        stop_server(server)
    assert code == 0, server.logs()[-3000:]
    assert answered
    assert all(n == 8 for n in answered)
    # Each client went on until refused: every call before was answered, the refusal says why.
    assert len(endings) == len(clients)
    for status, message in endings:
        assert status == "StatusCode.UNAVAILABLE", (status, message)
        assert "shutting down" in message, message
    assert '"drain_done"' in server.logs()
