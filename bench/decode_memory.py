"""``deepvit bench --decode-memory``: what images whose headers lie about their size do to a server's memory.

A small WebP or JPEG whose header claims thousands of pixels a side (under the per-image pixel limit) makes a
decoder allocate the whole canvas before it finds the data missing; a server that lets that happen, or keeps
the high-water mark afterwards, grows with every such upload. One real ``deepvit serve`` process: first
``--requests``/10 ordinary photographs (the baseline RSS), then ``--requests`` lying images from a few
concurrent clients (each a real photograph re-encoded, its header's width and height rewritten, some cut
short), then the ordinary photographs again. The report: answers by status, RSS before, at its peak and
after, and the growth from before to after.
"""

from __future__ import annotations

import collections
import http.client
import io
import random
import struct
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from .report import key_value_table
from .server import free_port, rss_mib, serve, stop, wait_ready


def claim_size(encoded: bytes, width: int, height: int) -> bytes:
    """The image with its header's width and height rewritten: a WebP's VP8 key frame, or a JPEG's frame
    header (SOF0/SOF2). The pixel data stays what it was, far too little for the size claimed."""
    data = bytearray(encoded)
    vp8 = data.find(b"\x9d\x01\x2a")  # the VP8 key frame's start code, then 14-bit width and height
    if data[:4] == b"RIFF" and vp8 > 0:
        data[vp8 + 3 : vp8 + 7] = struct.pack("<HH", width, height)
        return bytes(data)
    for marker in (b"\xff\xc0", b"\xff\xc2"):
        sof = data.find(marker)
        if sof > 0:  # length (2), precision (1), then height and width, big-endian
            data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
            return bytes(data)
    raise ValueError("neither a VP8 WebP nor a baseline or progressive JPEG")


def lying_images(photo: bytes, count: int, max_side: int, seed: int = 0) -> list[tuple[str, bytes]]:
    """``count`` (content type, body) pairs: the photograph as WebP or JPEG at a small size, its header
    claiming between a quarter of ``max_side`` and ``max_side`` a side, a third of them also cut short."""
    rng = random.Random(seed)
    small = Image.open(io.BytesIO(photo)).convert("RGB").resize((128, 128))
    encoded = {}
    for fmt in ("WEBP", "JPEG"):
        buf = io.BytesIO()
        small.save(buf, format=fmt, quality=80)
        encoded[fmt] = buf.getvalue()
    out = []
    for i in range(count):
        fmt = "WEBP" if i % 2 == 0 else "JPEG"
        width, height = (rng.randint(max_side // 4, max_side) for _ in range(2))
        body = claim_size(encoded[fmt], width, height)
        if rng.random() < 1 / 3:
            body = body[: rng.randint(len(body) // 2, len(body) - 1)]
        out.append((f"image/{fmt.lower()}", body))
    return out


@dataclass
class DecodeMemoryRun:
    statuses: collections.Counter[int]  # of the lying images, one per request (0: no answer)
    rss_before_mib: float
    rss_peak_mib: float
    rss_after_mib: float
    max_side: int

    def render(self) -> str:
        growth = (self.rss_after_mib - self.rss_before_mib) / self.rss_before_mib
        share = ", ".join(f"{code or 'no answer'}: {n:,}" for code, n in sorted(self.statuses.items()))
        rows = [
            (
                "lying images sent",
                f"{sum(self.statuses.values()):,} (headers claiming up to {self.max_side:,} px a side)",
            ),
            ("answers by status", share),
            ("RSS before (after ordinary photographs)", f"{self.rss_before_mib:,.0f} MiB"),
            ("RSS at its peak", f"{self.rss_peak_mib:,.0f} MiB"),
            ("RSS after (ordinary photographs again)", f"{self.rss_after_mib:,.0f} MiB ({growth:+.1%})"),
        ]
        return key_value_table(rows)


def _post_all(port: int, bodies: list[tuple[str, bytes]], clients: int) -> collections.Counter[int]:
    statuses: collections.Counter[int] = collections.Counter()
    lock = threading.Lock()
    chunks = [bodies[i::clients] for i in range(clients)]

    def client(chunk: list[tuple[str, bytes]]) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        for content_type, body in chunk:
            try:
                conn.request("POST", "/classify", body=body, headers={"Content-Type": content_type})
                r = conn.getresponse()
                r.read()
                status, closing = r.status, r.getheader("connection", "").lower() == "close"
            except (OSError, http.client.HTTPException):
                status, closing = 0, True  # no answer: counted as status 0
            if closing:
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            with lock:
                statuses[status] += 1
        conn.close()

    threads = [threading.Thread(target=client, args=(c,)) for c in chunks]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return statuses


def run_decode_memory(
    repository: Path, model: str, photo: Path, requests: int = 3000, clients: int = 4, max_side: int = 6000
) -> DecodeMemoryRun:
    port = free_port()
    proc = serve(repository, model, port, log=None)
    data = photo.read_bytes()
    ordinary = [("image/jpeg", data)] * max(20, requests // 10)
    try:
        wait_ready(f"http://127.0.0.1:{port}", proc)
        _post_all(port, ordinary, clients)
        before = rss_mib(proc.pid)
        peak = before
        done = threading.Event()

        def sample() -> None:
            nonlocal peak
            while not done.wait(0.2):
                peak = max(peak, rss_mib(proc.pid))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        statuses = _post_all(port, lying_images(data, requests, max_side), clients)
        _post_all(port, ordinary, clients)
        time.sleep(0.5)
        done.set()
        sampler.join()
        after = rss_mib(proc.pid)
    finally:
        stop(proc)
    return DecodeMemoryRun(statuses, before, max(peak, after), after, max_side)
