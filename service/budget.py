"""One memory budget: what the process may hold is one sum, and the sum must fit its memory limit.

An OOM kill loses every request in flight, so the parts that grow with traffic are bounded, and their bounds
are added to what the process holds anyway and checked against the limit before any of it is needed:

- ``process``: the interpreter and its libraries, measured (resident memory) at start-up;
- ``sessions``: each model version's sessions (weights, ONNX Runtime's arenas after the warm-up's largest
  batch, every instance and the solo session), measured as the resident memory its load and warm-up added;
- ``decode``: what image decoding may hold at once (``DEEPVIT_MAX_DECODE_MEMORY_BYTES``);
- ``uploads``: twice what request bodies may hold (``DEEPVIT_MAX_UPLOAD_BYTES``, :mod:`.bodies`), since a raw
  body is joined from its chunks and is held twice at that moment.

The limit is ``DEEPVIT_MEMORY_LIMIT_BYTES``, or the container's (its cgroup's ``memory.max``, or
``memory.limit_in_bytes`` under cgroup v1); with neither the sum is reported, not enforced. Start-up fails when
the fixed parts do not fit; a model version whose sessions do not fit beside what is loaded fails its load,
with the parts named, and what served keeps serving. The upload bound's default follows from the limit.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from .config import Settings

log = logging.getLogger("deepvit.memory")

_MIB = 1 << 20
UNLIMITED = 1 << 60  # cgroup v1 writes "no limit" as a number near 2**63
DEFAULT_UPLOAD_BYTES = 256 * _MIB  # where no memory limit is known
MAX_DEFAULT_UPLOAD_BYTES = 512 * _MIB
UPLOAD_SHARE = 8  # by default, uploads may hold an eighth of the memory limit (twice that at worst: see above)


class MemoryBudgetError(Exception):
    """The parts do not fit the limit: the message names them."""


def container_memory_limit(cgroup: Path = Path("/sys/fs/cgroup")) -> int | None:
    """The memory limit of this process's container: cgroup v2's ``memory.max``, else cgroup v1's
    ``memory.limit_in_bytes``; None where there is none (or no cgroup file system)."""
    for path in (cgroup / "memory.max", cgroup / "memory" / "memory.limit_in_bytes"):
        try:
            text = path.read_text().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < UNLIMITED:
            return int(text)
        return None  # "max", or v1's no-limit number
    return None


def resident_bytes() -> int:
    """The process's resident memory now (Linux: ``/proc/self/statm``; elsewhere 0)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return 0
    return pages * os.sysconf("SC_PAGE_SIZE")


def upload_bound(settings: Settings, limit: int | None) -> int:
    """``DEEPVIT_MAX_UPLOAD_BYTES``, or its default: an eighth of the memory limit, at least the largest
    body and at most 512 MiB (256 MiB where no limit is known)."""
    if settings.max_upload_bytes:
        return settings.max_upload_bytes
    if limit is None:
        return max(settings.max_body_bytes, DEFAULT_UPLOAD_BYTES)
    return max(settings.max_body_bytes, min(MAX_DEFAULT_UPLOAD_BYTES, limit // UPLOAD_SHARE))


def _mib(n: int) -> str:
    return f"{n / _MIB:,.0f} MiB"


@dataclass
class MemoryBudget:
    limit: int | None  # bytes; None: unknown, reported only
    process: int
    decode: int
    upload_bound: int
    sessions: dict[tuple[str, int], int] = field(default_factory=dict)  # (model, version) -> bytes

    @classmethod
    def for_settings(cls, settings: Settings, limit: int | None = None, process: int | None = None) -> MemoryBudget:
        """The budget at start-up: the limit set or the container's, the process as it is now."""
        limit = settings.memory_limit_bytes or limit or container_memory_limit()
        return cls(
            limit=limit,
            process=resident_bytes() if process is None else process,
            decode=settings.max_decode_memory_bytes,
            upload_bound=upload_bound(settings, limit),
        )

    @property
    def uploads(self) -> int:
        return 2 * self.upload_bound

    def parts(self, sessions: dict[tuple[str, int], int] | None = None) -> dict[str, int]:
        held = self.sessions if sessions is None else sessions
        return {
            "process": self.process,
            "sessions": sum(held.values()),
            "decode": self.decode,
            "uploads": self.uploads,
        }

    def describe(self, sessions: dict[tuple[str, int], int] | None = None) -> str:
        held = self.sessions if sessions is None else sessions
        p = self.parts(held)
        each = ", ".join(f"{n} v{v} {_mib(b)}" for (n, v), b in sorted(held.items()))
        text = (
            f"process {_mib(p['process'])} + model sessions {_mib(p['sessions'])}{f' ({each})' if each else ''} "
            f"+ decoding {_mib(p['decode'])} (DEEPVIT_MAX_DECODE_MEMORY_BYTES) + uploads 2 x "
            f"{_mib(self.upload_bound)} (DEEPVIT_MAX_UPLOAD_BYTES) = {_mib(sum(p.values()))}"
        )
        return text + (f" of a {_mib(self.limit)} limit" if self.limit else " (no memory limit known)")

    def check_start(self) -> None:
        """The fixed parts must fit, with room to spare for a model: else start-up fails, naming them."""
        if self.limit is not None and sum(self.parts().values()) > self.limit:
            raise MemoryBudgetError(
                f"the memory budget does not fit the memory limit before any model is loaded: {self.describe()}; "
                "raise the container's memory limit (or DEEPVIT_MEMORY_LIMIT_BYTES), or lower the bounds named"
            )
        self._log()

    def add_version(self, name: str, version: int, held: int) -> None:
        """A version's sessions hold ``held`` bytes: counted, or ``MemoryBudgetError`` when the sum would
        not fit (its load then fails; what serves keeps serving)."""
        sessions = {k: v for k, v in self.sessions.items() if k != (name, version)}
        sessions[(name, version)] = held
        if self.limit is not None and sum(self.parts(sessions).values()) > self.limit:
            raise MemoryBudgetError(
                f"model {name} version {version} does not fit the memory limit beside what is loaded: "
                f"{self.describe(sessions)}; raise the container's memory limit, serve fewer versions or "
                "instances (DEEPVIT_INSTANCES), or lower the bounds named"
            )
        self.sessions = sessions
        self._log()

    def _log(self) -> None:
        fields = {f"memory_{part}_bytes": n for part, n in self.parts().items()}
        log.info("memory budget: %s", self.describe(), extra={"event": "memory_budget", **fields})

    def remove_version(self, name: str, version: int) -> None:
        self.sessions.pop((name, version), None)
