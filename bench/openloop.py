"""An open-loop HTTP load generator: requests arrive at the times of a Poisson process of the offered rate,
whatever the server answers, over a pool of kept-alive connections.

Why not ``hey -q``: it rate-limits each worker with a ticker of its own, and workers started together tick
together, so that many workers at a low rate each offer bursts of every worker at once (2,000 requests every
2.2 s), with the machine idle in between; a server measured under such bursts shows what the bursts cost, not
what steady overload does. Here each arrival is due at its own time; one that finds every connection busy
opens another (up to ``max_connections``), and one that finds none is recorded as not sent, so that the
generator's own shortfall is never mistaken for the server's. Latency counts from the moment the request's
first byte is written; how late the generator wrote it is reported apart (``lag``).

Run as ``python -m deepvit.bench.openloop URL --rate R --duration S --body FILE --content-type T --out CSV``:
one CSV row per arrival, ``offset,latency,status,retry_after,lag,error`` (seconds; status 0 with the error for
a request that failed, ``-1`` for one not sent).
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

# Idle connections older than this are not reused: below uvicorn's keep-alive timeout (5 s by default).
IDLE_S = 4.0
# How long the requests still in flight when the arrivals end may take to be answered.
ANSWER_WAIT_S = 60.0


@dataclass
class Record:
    offset: float  # when it was due, from the start
    latency: float  # first byte written to the answer read
    status: int  # -1: not sent (every connection busy); 0: failed
    retry_after: bool
    lag: float  # how late the generator wrote it
    error: str = ""  # why a request failed (status 0)


class _Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    async def exchange(self, request: bytes) -> tuple[int, bool, bool]:
        """Write the request, read the answer (Content-Length bodies); (status, whether Retry-After came,
        whether the server closes the connection after it)."""
        self.writer.write(request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
        await self.reader.readexactly(int(headers.get("content-length", "0")))
        return status, "retry-after" in headers, headers.get("connection", "").lower() == "close"

    def close(self) -> None:
        self.writer.close()


async def run(
    url: str,
    rate: float,
    duration_s: float,
    body: bytes,
    content_type: str,
    max_connections: int = 4096,
    seed: int = 0,
) -> list[Record]:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    target = parts.path + (f"?{parts.query}" if parts.query else "")
    request = (
        f"POST {target} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    idle: list[tuple[_Connection, float]] = []  # with the time each was last used
    opened = 0
    records: list[Record] = []
    tasks: set[asyncio.Task[None]] = set()
    rng = random.Random(seed)
    loop = asyncio.get_running_loop()
    start = loop.time()

    def pooled() -> _Connection | None:
        """The most recently used idle connection; those idle longer than the server keeps them are closed
        (as HTTP clients do), or a request would race the server's close and fail without an answer."""
        nonlocal opened
        while idle:
            conn, used = idle.pop()
            if loop.time() - used < IDLE_S:
                return conn
            conn.close()
            opened -= 1
        return None

    async def one(due: float) -> None:
        nonlocal opened
        conn = pooled()
        if conn is None:
            if opened >= max_connections:
                records.append(Record(due - start, 0.0, -1, False, 0.0))
                return
            opened += 1
            try:
                conn = _Connection(*await asyncio.open_connection(host, port))
            except (OSError, asyncio.CancelledError) as exc:
                opened -= 1
                why = "no connection" if isinstance(exc, asyncio.CancelledError) else f"connect: {exc}"
                records.append(Record(due - start, 0.0, 0, False, loop.time() - due, why))
                if isinstance(exc, asyncio.CancelledError):
                    raise
                return
        sent = loop.time()
        try:
            status, retry_after, closing = await conn.exchange(request)
        except (OSError, asyncio.IncompleteReadError, ValueError, IndexError, asyncio.CancelledError) as exc:
            conn.close()
            opened -= 1
            cancelled = isinstance(exc, asyncio.CancelledError)
            why = f"{type(exc).__name__}: {exc}"
            if cancelled:
                why = f"no answer within {ANSWER_WAIT_S:g} s of the last arrival"
            records.append(Record(due - start, loop.time() - sent, 0, False, sent - due, why))
            if cancelled:
                raise
            return
        records.append(Record(due - start, loop.time() - sent, status, retry_after, sent - due))
        if closing:  # an answer, then the server closes (a 413, a drain's 503): the next arrival reconnects
            conn.close()
            opened -= 1
        else:
            idle.append((conn, loop.time()))

    due = start
    end = start + duration_s
    while True:
        due += rng.expovariate(rate)
        if due >= end:
            break
        delay = due - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        task = loop.create_task(one(due))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.wait(tasks, timeout=ANSWER_WAIT_S)
    for task in list(tasks):  # still unanswered: recorded as such, their connections closed
        task.cancel()
    if tasks:
        await asyncio.wait(tasks)
    for conn, _ in idle:
        conn.close()
    return records


def write_csv(records: list[Record], path: Path) -> None:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["offset", "latency", "status", "retry_after", "lag", "error"])
        for r in sorted(records, key=lambda r: r.offset):
            w.writerow([f"{r.offset:.6f}", f"{r.latency:.6f}", r.status, int(r.retry_after), f"{r.lag:.6f}", r.error])


def read_csv(path: Path) -> list[Record]:
    with path.open(newline="") as f:
        return [
            Record(
                float(r["offset"]),
                float(r["latency"]),
                int(r["status"]),
                r["retry_after"] == "1",
                float(r["lag"]),
                r["error"],
            )
            for r in csv.DictReader(f)
        ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("url")
    p.add_argument("--rate", type=float, required=True, help="requests per second offered (Poisson arrivals)")
    p.add_argument("--duration", type=float, required=True, help="seconds of arrivals")
    p.add_argument("--body", type=Path, required=True, help="file sent as each request's body")
    p.add_argument("--content-type", default="application/octet-stream")
    p.add_argument("--max-connections", type=int, default=4096)
    p.add_argument("--out", type=Path, required=True, help="CSV of one row per arrival")
    args = p.parse_args(argv)
    body = args.body.read_bytes()
    main = run(args.url, args.rate, args.duration, body, args.content_type, args.max_connections)
    try:
        import uvloop  # uvicorn's event loop, where installed: a cheaper client
    except ImportError:
        records = asyncio.run(main)
    else:
        records = uvloop.run(main)
    write_csv(records, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
