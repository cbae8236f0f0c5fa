"""Hostile uploads: a body that never arrives holds no admission capacity, the bytes held for bodies are
bounded process-wide (refused before a byte is read), and every front end reaches the model through the one
``Call.run``, admitted once with its image count. In process, driven by events; the refusal below the app
against a real uvicorn on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
import uvicorn
from inprocess import InProcessApp, grey_png, v2_bytes_request
from serving import metric_samples

from deepvit.service.bodies import BodyBudget
from deepvit.service.errors import UnavailableError
from deepvit.service.grpc.proto import grpc_service_pb2 as pb
from deepvit.service.grpc.servicer import InferenceServicer
from deepvit.service.protocol import http_protocol
from deepvit.service.refusals import Refusal, Refusals, route_of

PNG = {"content-type": "image/png"}


def waiting_body(gate: asyncio.Event, data: bytes, started: asyncio.Event) -> AsyncIterator[bytes]:
    """A body whose first byte comes at once and the rest when ``gate`` opens (a client uploading slowly)."""

    async def chunks() -> AsyncIterator[bytes]:
        started.set()
        yield data[:1]
        await gate.wait()
        yield data[1:]

    return chunks()


# -- the budget itself -----------------------------------------------------------------------------
def test_the_budget_reserves_what_a_body_declares_and_refuses_over_its_bounds() -> None:
    budget = BodyBudget(max_bytes=1000, max_bodies=2)
    first = budget.begin(600)
    with pytest.raises(UnavailableError) as refused:
        budget.begin(500)
    assert refused.value.reason == "upload_budget"
    assert refused.value.retry_after_s == 1
    assert "need" in refused.value.message
    chunked = budget.begin(None)  # reserves as it arrives
    chunked.received(300)
    assert budget.held_bytes == 900
    with pytest.raises(UnavailableError, match="2 uploads are in progress"):
        budget.begin(0)  # a third body in transit
    with pytest.raises(UnavailableError):
        chunked.received(500)  # over the bytes
    first.arrived()  # no longer in transit, still held until answered
    assert (budget.in_transit, budget.held_bytes) == (1, 900)
    first.release()
    chunked.release()
    chunked.release()  # idempotent
    assert (budget.in_transit, budget.held_bytes) == (0, 0)


# -- in process ------------------------------------------------------------------------------------
def test_a_body_that_never_arrives_holds_no_admission_capacity(tiny_app: InProcessApp) -> None:
    ctx = tiny_app.ctx
    ctx.pipeline.admission.max_pending_images = 1  # one image in the pipeline is the most

    async def run() -> tuple[httpx.Response, httpx.Response, int]:
        async with tiny_app.serving() as (client, _):
            gate, started = asyncio.Event(), asyncio.Event()
            slow = asyncio.create_task(
                client.post("/classify", content=waiting_body(gate, grey_png(), started), headers=PNG)
            )
            await started.wait()
            pending_while_uploading = ctx.pipeline.admission.pending
            served = await client.post("/classify", content=grey_png(), headers=PNG)
            gate.set()
            return served, await slow, pending_while_uploading

    served, slow, pending = asyncio.run(run())
    assert pending == 0
    assert served.status_code == 200, served.text
    assert slow.status_code == 200, slow.text
    assert ctx.pipeline.admission.pending == 0
    assert ctx.bodies.held_bytes == 0


def test_the_upload_bound_refuses_before_reading_and_counts_chunked_bodies(tiny_app: InProcessApp) -> None:
    ctx = tiny_app.ctx
    ctx.bodies = BodyBudget(max_bytes=100_000, max_bodies=8)
    png = grey_png()

    async def run() -> dict[str, Any]:
        async with tiny_app.serving() as (client, _):
            gate, started = asyncio.Event(), asyncio.Event()
            big = b"\x00" * (100_000 - len(png) + 1)  # declared: held from its head on, leaves no room for png
            length = {**PNG, "content-length": str(len(big))}
            holder = asyncio.create_task(
                client.post("/classify", content=waiting_body(gate, big, started), headers=length)
            )
            await started.wait()
            read: list[int] = []

            async def never_read() -> AsyncIterator[bytes]:
                read.append(1)
                yield png

            declared = await client.post(
                "/classify", content=never_read(), headers={**PNG, "content-length": str(len(png))}
            )

            async def chunked() -> AsyncIterator[bytes]:
                for _ in range(4):
                    yield b"\x00" * 1000

            streamed = await client.post("/classify", content=chunked(), headers=PNG)  # no length: chunked
            metrics = (await client.get("/metrics")).text
            gate.set()
            held = await holder
            after = await client.post("/classify", content=png, headers=PNG)
            return {
                "declared": declared,
                "read": read,
                "streamed": streamed,
                "metrics": metrics,
                "held": held,
                "after": after,
            }

    r = asyncio.run(run())
    for refused in (r["declared"], r["streamed"]):
        assert refused.status_code == 503, refused.text
        assert "uploads" in refused.json()["error"]
        assert refused.headers["retry-after"] == "1"
    assert r["read"] == []  # refused from the head alone
    rejected = metric_samples(r["metrics"], "deepvit_rejected_requests_total")
    assert rejected['{reason="upload_budget"}'] == 2
    assert metric_samples(r["metrics"], "deepvit_upload_bytes") == {"": 100_000 - len(png) + 1}
    assert r["held"].status_code == 400  # zeros are no image: answered, and what it held given back
    assert r["after"].status_code == 200, r["after"].text
    assert (ctx.bodies.held_bytes, ctx.bodies.in_transit) == (0, 0)


class _GrpcContext:
    """What the servicer asks of grpc.aio's context."""

    def time_remaining(self) -> float | None:
        return None

    def peer(self) -> str:
        return "ipv4:127.0.0.1:1"

    async def abort(self, code: Any, details: str, trailers: Any = ()) -> None:
        raise AssertionError(f"aborted: {code} {details}")


def test_every_front_end_is_admitted_once_with_its_image_count(
    tiny_app: InProcessApp, monkeypatch: pytest.MonkeyPatch
) -> None:
    """/classify (multipart), v2 REST and v2 gRPC (encoded images) each reach the model through
    ``Call.run``: one admission of the request's two images, none before its body was in."""
    admission = tiny_app.ctx.pipeline.admission
    admitted: list[int] = []
    admit = admission.admit

    def recording(images: int) -> None:
        admitted.append(images)
        admit(images)

    monkeypatch.setattr(admission, "admit", recording)
    png = grey_png()

    async def run() -> list[int]:
        async with tiny_app.serving() as (client, _):
            statuses = []
            files = [("file", ("a.png", png, "image/png")), ("file", ("b.png", png, "image/png"))]
            statuses.append((await client.post("/classify", files=files)).status_code)
            statuses.append((await client.post("/v2/models/tiny/infer", json=v2_bytes_request(png, png))).status_code)
            msg = pb.ModelInferRequest(model_name="tiny")
            tensor = msg.inputs.add(name="image", datatype="BYTES", shape=[2])
            tensor.contents.bytes_contents.extend([png, png])
            servicer = InferenceServicer(tiny_app.ctx, "0")
            answer = await servicer._guarded("ModelInfer", servicer.model_infer, False)(msg, _GrpcContext())
            statuses.append(200 if answer.outputs else 500)
            return statuses

    assert asyncio.run(run()) == [200, 200, 200]
    assert admitted == [2, 2, 2]
    assert admission.pending == 0


def test_explain_is_admitted_once_with_its_image_count(
    explain_app: InProcessApp, monkeypatch: pytest.MonkeyPatch
) -> None:
    admission = explain_app.ctx.pipeline.admission
    admitted: list[int] = []
    admit = admission.admit
    monkeypatch.setattr(admission, "admit", lambda images: (admitted.append(images), admit(images))[1])
    png = grey_png()

    async def run() -> int:
        async with explain_app.serving() as (client, _):
            files = [("file", ("a.png", png, "image/png")), ("file", ("b.png", png, "image/png"))]
            return (await client.post("/explain", files=files)).status_code

    assert asyncio.run(run()) == 200
    assert admitted == [2]
    assert admission.pending == 0


def test_a_grpc_message_counts_in_the_upload_budget(tiny_app: InProcessApp) -> None:
    """gRPC's core receives a message whole; from then to its answer it counts with the HTTP bodies, and one
    that would take the sum over the bound is UNAVAILABLE with a retry delay."""
    import grpc

    aborted: list[tuple[Any, str, Any]] = []

    class Context(_GrpcContext):
        async def abort(self, code: Any, details: str, trailers: Any = ()) -> None:
            aborted.append((code, details, dict(trailers)))
            raise RuntimeError("aborted")

    png = grey_png()
    msg = pb.ModelInferRequest(model_name="tiny")
    msg.inputs.add(name="image", datatype="BYTES", shape=[1]).contents.bytes_contents.append(png)
    tiny_app.ctx.bodies = BodyBudget(max_bytes=msg.ByteSize() - 1, max_bodies=8)

    async def run() -> None:
        async with tiny_app.serving():
            servicer = InferenceServicer(tiny_app.ctx, "0")
            with pytest.raises(RuntimeError, match="aborted"):
                await servicer._guarded("ModelInfer", servicer.model_infer, False)(msg, Context())

    asyncio.run(run())
    ((code, details, trailers),) = aborted
    assert code == grpc.StatusCode.UNAVAILABLE
    assert "uploads" in details
    assert trailers == {"deepvit-reason": "upload_budget", "retry-after": "1"}
    assert tiny_app.ctx.bodies.held_bytes == 0


# -- below the app, on a real uvicorn ---------------------------------------------------------------
@contextlib.contextmanager
def uvicorn_serving(app: Any, refuse: Any, body_timeout_s: float = 30.0) -> Iterator[int]:
    """A real uvicorn with the service's HTTP protocol on a socket listening before it starts (a client
    connecting early waits in the backlog)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    protocol = http_protocol(20.0, lambda: None, refuse, body_timeout_s)
    config = uvicorn.Config(app, http=protocol, log_config=None, lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


class Gate:
    """What the protocol asks (``service.protocol.Refuse``): refuses POST /classify while ``refusing``, and
    counts the inference requests let through from their bodies' arrival to their answers."""

    def __init__(self, refusing: bool = True) -> None:
        self.refusing = refusing
        self.sent: list[int] = []
        self.arrived = 0

    def check(self, method: str, path: str) -> Refusal | None:
        if not self.refusing or (method, path) != ("POST", "/classify"):
            return None
        return Refusal(503, "the server is overloaded", [(b"retry-after", b"2")], lambda: self.sent.append(1))

    def body_in(self) -> None:
        self.arrived += 1

    def answered(self) -> None:
        self.arrived -= 1


def test_a_refusal_below_the_app_answers_json_503_and_keeps_the_connection() -> None:
    """What ``refuse`` answers never reaches the app: the protocol writes it from the head, drops the body,
    and the connection serves the next request; a request let through counts as arrived from its body's
    arrival to its answer."""
    app_calls: list[tuple[str, int]] = []
    gate = Gate()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        while (await receive()).get("more_body"):
            pass
        app_calls.append((scope["path"], gate.arrived))  # with the body in
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})

    with uvicorn_serving(app, gate) as port, httpx.Client(base_url=f"http://127.0.0.1:{port}") as client:
        for _ in range(2):  # a large body, dropped, twice on one connection
            r = client.post("/classify?top_k=1", content=b"x" * 200_000, headers=PNG)
            assert r.status_code == 503
            assert r.json() == {"error": "the server is overloaded"}
            assert r.headers["retry-after"] == "2"
            assert "connection" not in r.headers  # kept alive
        ok = client.post("/other", content=b"y")  # the same kept-alive connection
        assert ok.status_code == 200
        assert client.get("/classify").status_code == 200  # only what refuse names is refused
        gate.refusing = False
        assert client.post("/classify", content=b"z" * 1000, headers=PNG).status_code == 200
        assert gate.arrived == 0  # answered
    assert app_calls == [("/other", 0), ("/classify", 0), ("/classify", 1)]  # counted while in the app
    assert gate.sent == [1, 1]


def test_what_is_left_of_a_refused_body_gets_the_body_deadline() -> None:
    """A refused upload's client may go on sending (uvicorn drops it); one that trickles is closed at the
    body deadline rather than holding the connection for ever."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        raise AssertionError("the app is never called")

    refuse = Gate()
    refuse.check = lambda method, path: Refusal(503, "busy", [(b"retry-after", b"1")], lambda: None)  # type: ignore[method-assign]

    with (
        uvicorn_serving(app, refuse, body_timeout_s=0.5) as port,
        socket.create_connection(("127.0.0.1", port), timeout=10) as sock,
    ):
        sock.sendall(b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n" + b"x" * 10)
        answer = b""
        while b"busy" not in answer:
            answer += sock.recv(65536)
        assert answer.startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
        assert sock.recv(65536) == b""  # closed at the deadline (the socket's 10 s timeout would raise)


def test_refusals_follow_admission_and_count_like_the_app(tiny_app: InProcessApp) -> None:
    ctx = tiny_app.ctx
    clock = [0.0]
    refusals = Refusals(ctx, clock=lambda: clock[0])
    admission = ctx.pipeline.admission
    assert refusals.check("POST", "/classify") is None  # room: the app answers
    admission.pending = admission.max_pending_images  # full
    assert refusals.check("GET", "/classify") is None
    assert refusals.check("POST", "/readyz") is None
    sent: list[dict[str, Any]] = []

    async def send(message: Any) -> None:
        sent.append(message)

    async def refuse_all() -> None:
        for path in ("/classify", "/explain", "/v2/models/m/infer", "/v2/models/m/versions/2/infer"):
            answer = refusals.check("POST", path)
            assert answer is not None
            await answer({}, None, send)  # type: ignore[arg-type]

    asyncio.run(refuse_all())
    admission.pending = 0
    assert [m["status"] for m in sent if m["type"] == "http.response.start"] == [503] * 4
    body = next(m["body"] for m in sent if m["type"] == "http.response.body")
    assert b"overloaded" in body
    text = ctx.metrics.render().decode()
    assert metric_samples(text, "deepvit_rejected_requests_total")['{reason="overloaded"}'] == 4
    requests = metric_samples(text, "deepvit_http_requests_total")
    assert requests['{method="POST",route="/v2/models/{name}/versions/{version}/infer",status="503"}'] == 1
    assert route_of("/v2/models/m/infer") == "/v2/models/{name}/infer"
