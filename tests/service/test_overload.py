"""What keeps the server steady above its capacity: admission over the whole pipeline (decoding included)
refuses at once what it could not answer in time, a client trickling its body in is cut off and not counted in
flight, and a header that lies about an image's size cannot make decoding hold more memory than its budget.
Driven by fakes and in process where the logic is; one real server for the slow client."""

from __future__ import annotations

import asyncio
import io
import socket
import struct
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from inprocess import InProcessApp, grey_png
from PIL import Image
from serving import export_tiny, metric_samples, running_server

from deepvit.artifact import ImageTooLargeError
from deepvit.artifact.errors import DecodeBusyError
from deepvit.artifact.pixels import DecodeMemory
from deepvit.service.admission import Admission
from deepvit.service.errors import UnavailableError


class FakeClock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


# -- admission -------------------------------------------------------------------------------------
def test_admission_refuses_what_it_could_not_answer_within_the_wait_allowed() -> None:
    clock = FakeClock()
    a = Admission(max_wait_s=1.0, max_pending_images=100, clock=clock)
    a.admit(1)
    clock.t += 0.1
    a.release(1, completed=True)  # measured: 0.1 s per image
    assert a.per_image_s == pytest.approx(0.1)
    for _ in range(10):  # the tenth would be answered after 10 x 0.1 s: just in time
        a.admit(1)
    with pytest.raises(UnavailableError) as refused:
        a.admit(1)
    assert refused.value.reason == "overloaded"
    assert refused.value.retry_after_s == 1
    assert "estimated wait is 1.10s" in refused.value.message
    assert a.pending == 10  # a refusal holds nothing
    for _ in range(10):
        clock.t += 0.1
        a.release(1, completed=True)
    assert a.pending == 0
    a.admit(1)  # room again


def test_admission_caps_pending_images_before_anything_is_measured() -> None:
    a = Admission(max_wait_s=1.0, max_pending_images=3, clock=FakeClock())
    a.admit(2)
    a.admit(1)
    with pytest.raises(UnavailableError, match="3 images are in the pipeline"):
        a.admit(1)
    a.release(3, completed=False)  # failed requests measure nothing
    assert a.per_image_s is None
    a.admit(3)


def test_admission_measures_the_busy_pipeline_not_idle_time() -> None:
    clock = FakeClock()
    a = Admission(max_wait_s=10.0, max_pending_images=100, clock=clock)
    a.admit(1)
    clock.t += 0.05
    a.release(1, completed=True)
    clock.t += 60  # idle: no request in the pipeline
    a.admit(2)
    clock.t += 0.1
    a.release(2, completed=True)  # 0.05 s per image again, not a minute
    assert a.per_image_s == pytest.approx(0.05)


def test_an_overloaded_pipeline_refuses_before_reading_or_decoding(tiny_app: InProcessApp) -> None:
    ctx = tiny_app.ctx
    read: list[bytes] = []

    async def body() -> AsyncIterator[bytes]:
        read.append(b"x")  # the server asked for the body
        yield grey_png()

    def decoded() -> float:
        return sum(s.value for s in ctx.metrics.preprocess.collect()[0].samples if s.name.endswith("_count"))

    async def run() -> tuple[httpx.Response, httpx.Response, str]:
        async with tiny_app.serving() as (client, _):
            admission = ctx.pipeline.admission
            admission.per_image_s = 1.0  # as measured on a server that takes a second per image
            admission.pending = 50  # with 50 images ahead of it
            before = decoded()
            refused = await client.post("/classify", content=body(), headers={"content-type": "image/png"})
            assert decoded() == before
            metrics = (await client.get("/metrics")).text
            admission.pending = 0
            served = await client.post("/classify", content=grey_png(), headers={"content-type": "image/png"})
            return refused, served, metrics

    refused, served, metrics = asyncio.run(run())
    assert refused.status_code == 503, refused.text
    assert "overloaded" in refused.json()["error"]
    assert int(refused.headers["retry-after"]) >= 1
    assert read == []  # not a byte of the body was read
    assert metric_samples(metrics, "deepvit_rejected_requests_total")['{reason="overloaded"}'] == 1
    assert metric_samples(metrics, "deepvit_pending_images") == {"": 50}
    assert served.status_code == 200, served.text
    assert ctx.pipeline.admission.pending == 0  # every path gives its images back


def test_a_request_gives_its_images_back_whatever_happened(tiny_app: InProcessApp) -> None:
    async def run() -> list[int]:
        async with tiny_app.serving() as (client, _):
            statuses = []
            for content, media in ((b"not an image", "image/png"), (grey_png(), "image/png")):
                r = await client.post("/classify", content=content, headers={"content-type": media})
                statuses.append(r.status_code)
            r = await client.post("/classify?top_k=999", content=grey_png(), headers={"content-type": "image/png"})
            statuses.append(r.status_code)
            return statuses

    assert asyncio.run(run()) == [400, 200, 400]
    assert tiny_app.ctx.pipeline.admission.pending == 0


# -- decoding memory -------------------------------------------------------------------------------
def lying_webp(width: int = 6000, height: int = 6000) -> bytes:
    """A small lossy WebP (12 KB) whose frame header claims ``width`` x ``height``: libwebp allocates the
    whole canvas (144 MB for 6000 x 6000) before it finds the data missing."""
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (128, 128, 3), dtype=np.uint8)).save(buf, format="WEBP", quality=80)
    data = bytearray(buf.getvalue())
    at = data.index(b"\x9d\x01\x2a")  # the VP8 key frame's start code, then 14-bit width and height
    data[at + 3 : at + 7] = struct.pack("<HH", width, height)
    return bytes(data)


def test_decode_memory_holds_at_most_its_budget() -> None:
    memory = DecodeMemory(limit_bytes=100 * DecodeMemory.BYTES_PER_PIXEL)
    with pytest.raises(ImageTooLargeError, match="more than the"), memory.hold(101, wait_s=1):
        pass
    entered = threading.Event()
    order: list[str] = []

    def second() -> None:
        entered.set()
        with memory.hold(60, wait_s=5):
            order.append("second")

    with memory.hold(60, wait_s=1):
        t = threading.Thread(target=second)
        t.start()
        entered.wait()
        time.sleep(0.1)
        order.append("first done")  # the second waits: 120 would be over the budget
        with pytest.raises(DecodeBusyError), memory.hold(60, wait_s=0.05):
            pass
    t.join(5)
    assert order == ["first done", "second"]
    assert memory.used == 0


def test_an_image_whose_header_lies_is_decoded_within_the_budget_or_refused(tiny_app: InProcessApp) -> None:
    lie = lying_webp()
    assert len(lie) < 20_000
    assert Image.open(io.BytesIO(lie)).size == (6000, 6000)
    held: list[int] = []
    memory = tiny_app.ctx.pipeline.decode_memory
    hold = memory.hold

    def recording_hold(pixels: int, wait_s: float):  # type: ignore[no-untyped-def]
        held.append(pixels * memory.BYTES_PER_PIXEL)
        return hold(pixels, wait_s)

    memory.hold = recording_hold  # type: ignore[method-assign]

    async def run() -> httpx.Response:
        async with tiny_app.serving() as (client, _):
            return await client.post("/classify", content=lie, headers={"content-type": "image/webp"})

    r = asyncio.run(run())
    assert r.status_code == 400, r.text  # the data is missing: a clear error, not a 500
    assert "could not be decoded" in r.json()["error"]
    assert held == [6000 * 6000 * DecodeMemory.BYTES_PER_PIXEL]  # reserved from the header, before decoding
    assert held[0] <= memory.limit
    assert memory.used == 0

    memory.limit = held[0] - 1  # a budget it does not fit in: refused from the header alone
    r = asyncio.run(run())
    assert r.status_code == 413, r.text
    assert "MiB" in r.json()["error"]


# -- slow clients ----------------------------------------------------------------------------------
@pytest.mark.integration
def test_a_client_trickling_its_body_is_cut_off_and_not_counted_in_flight(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    export_tiny(repo)
    with running_server(repo, tmp_path / "server.log", {"DEEPVIT_BODY_TIMEOUT_S": "1.5"}) as server:
        host, port = server.url.removeprefix("http://").split(":")
        sock = socket.create_connection((host, int(port)), timeout=10)
        sock.sendall(b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 5000\r\n\r\n")
        started = time.monotonic()
        in_flight = []
        answer = b""
        sock.settimeout(0.3)
        while time.monotonic() - started < 8 and b"\r\n\r\n" not in answer:
            try:
                sock.sendall(b"x")  # one byte every 0.3 s
            except OSError:
                break
            text = httpx.get(server.url + "/metrics", timeout=5).text
            in_flight.append(metric_samples(text, "deepvit_inflight_requests")[""])
            try:
                answer += sock.recv(65536)
            except TimeoutError:
                continue
        elapsed = time.monotonic() - started
        sock.close()
        assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
        assert b"connection: close" in answer.lower()
        assert 1.4 < elapsed < 4
        assert in_flight
        assert set(in_flight) == {0.0}
        rejected = metric_samples(httpx.get(server.url + "/metrics").text, "deepvit_rejected_requests_total")
        assert rejected['{reason="body_timeout"}'] == 1
        r = httpx.post(server.url + "/classify", content=grey_png(), headers={"content-type": "image/png"})
        assert r.status_code == 200, r.text


@pytest.mark.integration
def test_a_client_trickling_its_head_or_sending_nothing_is_cut_off(tmp_path: Path) -> None:
    """Slowloris: a request line and headers trickling in one byte at a time, and a connection that sends
    nothing at all, are answered 408 and closed after DEEPVIT_HEADER_TIMEOUT_S; neither counts in flight."""
    repo = tmp_path / "repo"
    export_tiny(repo)
    with running_server(repo, tmp_path / "server.log", {"DEEPVIT_HEADER_TIMEOUT_S": "1.5"}) as server:
        host, port = server.url.removeprefix("http://").split(":")
        trickling = socket.create_connection((host, int(port)), timeout=10)
        silent = socket.create_connection((host, int(port)), timeout=10)
        head = b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 5000\r\n\r\n"
        started = time.monotonic()
        in_flight = []
        answer = b""
        trickling.settimeout(0.3)
        for byte in head:
            try:
                trickling.sendall(bytes([byte]))  # one byte every 0.3 s
            except OSError:
                break
            in_flight.append(metric_samples(httpx.get(server.url + "/metrics").text, "deepvit_inflight_requests")[""])
            try:
                answer += trickling.recv(65536)
            except TimeoutError:
                continue
            if b"\r\n\r\n" in answer or time.monotonic() - started > 8:
                break
        elapsed = time.monotonic() - started
        trickling.close()
        assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
        assert b"connection: close" in answer.lower()
        assert b"head did not arrive within 1.5s" in answer
        assert 1.4 < elapsed < 4
        assert set(in_flight) == {0.0}
        silent.settimeout(5)
        assert silent.recv(65536).startswith(b"HTTP/1.1 408")  # nothing sent: cut off too
        assert silent.recv(65536) == b""  # and closed
        silent.close()
        rejected = metric_samples(httpx.get(server.url + "/metrics").text, "deepvit_rejected_requests_total")
        assert rejected['{reason="header_timeout"}'] == 2
        # A kept-alive client whose requests arrive whole is not affected.
        with httpx.Client(base_url=server.url) as client:
            for _ in range(2):
                r = client.post("/classify", content=grey_png(), headers={"content-type": "image/png"})
                assert r.status_code == 200, r.text
                time.sleep(1.0)  # idle between requests: the keep-alive timeout's business, not the head's


def test_a_new_request_sees_the_arrived_requests_ahead_of_it() -> None:
    """The HTTP protocol's check counts the requests whose bodies are in but not yet admitted (above
    capacity most of them are refused later, at a higher cost); admission itself counts what it holds."""
    clock = FakeClock()
    a = Admission(max_wait_s=1.0, max_pending_images=100, clock=clock, per_image_s=0.1)
    a.arrived = 10  # ten on their way to admission: a new one would wait 1.1 s
    with pytest.raises(UnavailableError, match="10 images ahead"):
        a.check_arrivals()
    a.check()  # nothing admitted yet
    a.admit(1)  # admission counts what it holds, not the arrivals
    assert a.pending == 1
    a.arrived = 0
    a.check_arrivals()
