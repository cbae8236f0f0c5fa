"""``deepvit bench --slow-clients`` and ``--upload-flood``: hostile uploads against one real ``deepvit serve``.

``--slow-clients``: ``slow`` connections send a request head at once and then their body one byte a second
(half raw JPEG bodies declaring 1,000,000 bytes, half multipart bodies), and as many more trickle their head
one byte a second; for ``seconds`` a normal client meanwhile POSTs one photograph every 0.5 s. The report:
the normal client's answers (all 200, and how long the slowest took), and when and how each slow connection
was cut off (the body deadline, the head deadline).

``--upload-flood``: ``uploads`` connections each POST a ``size``-byte body at once (the photograph padded with
zeros: a valid JPEG, so what is accepted is decoded and answered). The report: the answers by status (each a
JSON 200, 400, 408, 413 or 503 with ``Retry-After``), the server's RSS before, at its peak and a few seconds
after, and the latency of one normal request afterwards.

Both generators are asyncio streams in this process, sending large bodies in 64 KiB pieces (one shared body:
the clients' own memory stays small) and reading whole answers.
"""

from __future__ import annotations

import asyncio
import collections
import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from deepvit.service.config import Settings

from .report import key_value_table, percentile_ms
from .server import ready_server, rss_mib

_PIECE = 64 * 1024


@dataclass
class Answer:
    status: int  # 0: the connection closed without an answer
    retry_after: bool
    json_body: bool
    seconds: float  # from the connection's opening to the answer or the close


async def _request(
    host: str, port: int, head: bytes, body: bytes | memoryview, byte_every_s: float = 0.0, head_every_s: float = 0.0
) -> Answer:
    """One request on a connection of its own: the head (all at once, or a byte every ``head_every_s``), then
    the body (all at once in pieces, or a byte every ``byte_every_s``), then the answer."""
    t0 = time.monotonic()
    reader, writer = await asyncio.open_connection(host, port)

    async def send() -> None:
        if head_every_s:
            for i in range(len(head)):
                writer.write(head[i : i + 1])
                await writer.drain()
                await asyncio.sleep(head_every_s)
        else:
            writer.write(head)
        view = memoryview(body)
        step = 1 if byte_every_s else _PIECE
        for at in range(0, len(view), step):
            writer.write(view[at : at + step])
            await writer.drain()
            if byte_every_s:
                await asyncio.sleep(byte_every_s)

    sender = asyncio.create_task(send())
    try:
        status_line = await reader.readline()
        headers: dict[str, str] = {}
        while (line := await reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        content = await reader.readexactly(int(headers.get("content-length", "0")))
    except (ConnectionError, asyncio.IncompleteReadError):
        status_line, headers, content = b"", {}, b""
    finally:
        sender.cancel()
        writer.close()
    parts = status_line.split()
    status = int(parts[1]) if len(parts) > 1 else 0
    try:
        parsed = json.loads(content) if content else None
    except ValueError:
        parsed = None
    is_json = isinstance(parsed, dict) and (status == 200 or "error" in parsed)
    return Answer(status, "retry-after" in headers, is_json, time.monotonic() - t0)


def _head(path: str, content_type: str, length: int) -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: bench\r\nContent-Type: {content_type}\r\nContent-Length: {length}\r\n\r\n"
    ).encode()


@dataclass
class SlowClients:
    seconds: float
    slow: int
    normal: list[Answer]
    slow_bodies: list[Answer]
    slow_heads: list[Answer]
    body_timeout_s: float
    header_timeout_s: float

    def render(self) -> str:
        ok = [a for a in self.normal if a.status == 200]
        statuses = collections.Counter(a.status for a in self.normal)

        def cut(answers: list[Answer]) -> str:
            how = collections.Counter(a.status or "closed" for a in answers)
            times = [a.seconds for a in answers]
            return (
                f"{', '.join(f'{n} × {s}' for s, n in how.most_common())}; cut off after "
                f"{min(times):.1f}–{max(times):.1f} s"
            )

        rows = [
            ("slow connections", f"{self.slow} trickling a body, {self.slow} trickling their head, 1 byte/s each"),
            (
                "normal client (one photograph every 0.5 s)",
                f"{len(self.normal)} requests: {', '.join(f'{n} × {s}' for s, n in statuses.most_common())}",
            ),
            (
                "normal client latency p50 / max",
                f"{percentile_ms([a.seconds for a in ok], 50):,.0f} / "
                f"{max((a.seconds for a in ok), default=float('nan')) * 1000:,.0f} ms",
            ),
            (f"slow bodies (deadline {self.body_timeout_s:g} s)", cut(self.slow_bodies)),
            (f"slow heads (deadline {self.header_timeout_s:g} s)", cut(self.slow_heads)),
        ]
        return key_value_table(rows)


def run_slow_clients(
    repository: Path, model: str, photo: Path, slow: int = 100, seconds: float = 30.0, log: Path | None = None
) -> SlowClients:
    with ready_server(repository, model, log) as (_, port):
        body = photo.read_bytes()

        async def scenario() -> tuple[list[Answer], list[Answer], list[Answer]]:
            host = "127.0.0.1"
            half = slow // 2
            boundary = "slowslowslow"
            multipart_body = (
                (
                    f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.jpg"\r\n'
                    "Content-Type: image/jpeg\r\n\r\n"
                ).encode()
                + body
                + f"\r\n--{boundary}--\r\n".encode()
            )
            bodies = [
                _request(host, port, _head("/classify", "image/jpeg", 1_000_000), b"\xff" * 1_000_000, 1.0)
                for _ in range(half)
            ] + [
                _request(
                    host,
                    port,
                    _head("/classify", f"multipart/form-data; boundary={boundary}", len(multipart_body)),
                    multipart_body,
                    1.0,
                )
                for _ in range(slow - half)
            ]
            heads = [
                _request(host, port, _head("/classify", "image/jpeg", len(body)), body, head_every_s=1.0)
                for _ in range(slow)
            ]
            slow_tasks = [asyncio.create_task(c) for c in bodies + heads]
            normal: list[Answer] = []
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                tick = time.monotonic()
                normal.append(await _request(host, port, _head("/classify", "image/jpeg", len(body)), body))
                await asyncio.sleep(max(0.0, 0.5 - (time.monotonic() - tick)))
            done = await asyncio.gather(*slow_tasks)
            return normal, list(done[: len(bodies)]), list(done[len(bodies) :])

        normal, slow_bodies, slow_heads = asyncio.run(scenario())
    settings = Settings()  # as the server reads them: its defaults and this environment's DEEPVIT_ variables
    return SlowClients(
        seconds, slow, normal, slow_bodies, slow_heads, settings.body_timeout_s, settings.header_timeout_s
    )


@dataclass
class UploadFlood:
    uploads: int
    size: int
    answers: list[Answer]
    rss_before_mib: float
    rss_peak_mib: float
    rss_after_mib: float
    after_ms: float

    def render(self) -> str:
        by = collections.Counter(a.status for a in self.answers)
        well_formed = sum(
            a.json_body and (a.status != 503 or a.retry_after)
            for a in self.answers
            if a.status in (200, 400, 408, 413, 503)
        )
        rows = [
            ("uploads at once", f"{self.uploads} × {self.size / 1e6:g} MB"),
            ("answers by status", ", ".join(f"{n} × {s or 'no answer'}" for s, n in by.most_common())),
            ("JSON answers (200/400/408/413, or 503 with Retry-After)", f"{well_formed} of {len(self.answers)}"),
            (
                "RSS before → peak → after",
                f"{self.rss_before_mib:,.0f} → {self.rss_peak_mib:,.0f} → {self.rss_after_mib:,.0f} MiB "
                f"(peak growth {self.rss_peak_mib - self.rss_before_mib:,.0f} MiB; after "
                f"{(self.rss_after_mib - self.rss_before_mib) / self.rss_before_mib:+.1%} of before)",
            ),
            ("one request afterwards", f"{self.after_ms:,.1f} ms"),
        ]
        return key_value_table(rows)


def run_upload_flood(
    repository: Path, model: str, photo: Path, uploads: int = 160, size: int = 19_000_000, log: Path | None = None
) -> UploadFlood:
    with ready_server(repository, model, log) as (proc, port):
        picture = photo.read_bytes()
        body = picture + b"\x00" * (size - len(picture))  # a JPEG with trailing bytes: decodable
        host = "127.0.0.1"

        async def one() -> Answer:
            return await _request(host, port, _head("/classify", "image/jpeg", len(picture)), picture)

        asyncio.run(one())  # warm
        before = rss_mib(proc.pid)
        peak = [before]
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                peak.append(rss_mib(proc.pid))
                done.wait(0.05)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()

        async def flood() -> list[Answer]:
            head = _head("/classify", "image/jpeg", len(body))
            return list(await asyncio.gather(*(_request(host, port, head, body) for _ in range(uploads))))

        answers = asyncio.run(flood())
        time.sleep(3)  # what the server gives back once the flood is over
        done.set()
        sampler.join(5)
        after = rss_mib(proc.pid)
        t0 = time.perf_counter()
        normal = asyncio.run(one())
        after_ms = (time.perf_counter() - t0) * 1000
        if normal.status != 200:
            raise SystemExit(f"deepvit bench: a normal request after the flood was answered {normal.status}")
    return UploadFlood(uploads, size, answers, before, max(peak), after, after_ms)
