"""The process's resources under load: decoding memory given back to the operating system (glibc only;
elsewhere these do nothing), the worker threads' priority below the event loop's, and the start-up heap kept
out of the garbage collector's full passes.

glibc serves a large allocation by ``mmap`` and returns it on free, but raises that threshold after each such
free (up to 32 MiB), after which the next large decodes come from the heap and the process keeps its
high-water mark: RSS grew by 40% over 6,000 fuzzed images. Fixing the threshold keeps every image buffer
(Pillow allocates in blocks of up to 16 MiB) an ``mmap`` of its own, and ``malloc_trim`` after a large decode
returns what fragmentation left in the heaps.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
from typing import Any

log = logging.getLogger("deepvit.memory")

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
MMAP_THRESHOLD_BYTES = 1 << 20  # allocations from 1 MiB are mappings of their own, unmapped on free
TRIM_AFTER_BYTES = 16 << 20  # a decode that held this much is followed by malloc_trim

_libc: Any = None


def _glibc() -> Any:
    global _libc
    if _libc is None:
        name = ctypes.util.find_library("c")
        try:
            lib = ctypes.CDLL(name) if name else None
        except OSError:
            lib = None
        _libc = lib if lib is not None and hasattr(lib, "malloc_trim") and hasattr(lib, "mallopt") else False
    return _libc or None


def configure_allocator() -> bool:
    """Fix glibc's mmap threshold for the process; True when it was set."""
    libc = _glibc()
    if libc is None:
        return False
    ok = bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
    log.debug("mallopt(M_MMAP_THRESHOLD, %d): %s", MMAP_THRESHOLD_BYTES, ok)
    return ok


def trim_after(held_bytes: int) -> None:
    """After a decode or a request body that held ``held_bytes``: trim the heaps when it was large."""
    if held_bytes >= TRIM_AFTER_BYTES:
        libc = _glibc()
        if libc is not None:
            libc.malloc_trim(0)


def lower_thread_priority(niceness: int) -> None:
    """Run the calling thread at a lower priority (Linux: a thread's nice value is its own).

    The decode and inference threads use every core they are given; the event loop's thread must still get
    one at once to answer probes and refuse what it cannot take, or under overload the liveness probe times
    out and Kubernetes restarts the pod when it is busiest. Raising a thread's nice needs no privilege. It is a
    trade (``DEEPVIT_WORKER_NICENESS``, off by default): fewer failed probes under overload, far less
    throughput where other processes share the cores."""
    if niceness <= 0:
        return
    import contextlib
    import os
    import threading

    with contextlib.suppress(AttributeError, OSError):  # not Linux, or not allowed: the default priority
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), niceness)


def freeze_startup_objects() -> None:
    """Move every object alive now (the app and the libraries it imported) out of the cyclic garbage
    collector's reach, once the app is built: a full collection then walks only what serving allocates.
    Under overload, full collections of the unfrozen heap paused the event loop for tens of milliseconds,
    which every probe and refusal of the moment waited for."""
    import gc

    gc.collect()
    gc.freeze()
