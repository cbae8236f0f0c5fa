"""Keeping the served versions in step with the files of the model repository, by polling
(``DEEPVIT_REPOSITORY_POLL_S``) and on request (the Open Inference Protocol's repository extension: index,
load, unload).

Per model, the wanted versions are those the version policy selects among the files on disk. A wanted version
that is new, or whose file changed (modification time or size), is loaded and warmed before it takes traffic
(``ModelManager.load_version``); the versions it supersedes are unloaded only once every wanted version serves,
so a version that fails to load (corrupt file, wrong metadata) leaves what serves serving. A version whose file
is gone is unloaded. A failure is logged, counted in ``deepvit_model_load_failures`` and listed with its reason
by ``index``; the same file is not tried again until it changes or an explicit load asks for it.

While polling, a new or changed file is loaded only once two scans in a row found it the same, so a file still
being copied is not read half-written (writing to a temporary name and renaming it into place is better still),
and a version is unloaded only once two scans in a row missed it, so a directory replaced by a rename costs no
request. A repository root that cannot be read changes nothing.
An explicit unload holds the model: polling leaves it unloaded until an explicit load.

When the server starts draining it calls ``stop``: polling ends and no further version is loaded; a build under
way stops at its next warm-up shape (its thread cannot be interrupted mid-call), so no build holds up the exit
for more than one batch.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Collection
from dataclasses import dataclass
from typing import Literal

from ..config import Settings
from ..errors import BadRequestError, NotFoundError, UnavailableError
from ..runtime import LoadCancelledError
from .disk import Found, plan_loads, plan_unloads, scan_signatures, select_versions
from .manager import ModelManager

log = logging.getLogger("deepvit.repository")

IndexState = Literal["READY", "LOADING", "UNLOADING", "UNAVAILABLE"]


@dataclass(frozen=True)
class IndexEntry:
    name: str
    version: int
    state: IndexState
    reason: str = ""


def _draining() -> UnavailableError:
    return UnavailableError("the server is shutting down; retry on another replica", reason="draining")


class RepositorySync:
    def __init__(self, manager: ModelManager) -> None:
        self.manager = manager
        self.settings: Settings = manager.settings
        self.policy = manager.settings.version_policy
        self.held: set[str] = set()  # unloaded by request: polling leaves these alone
        self._previous_scan: dict[str, Found] = {}
        self._root_missing = False
        self.stopped = False  # the server is draining: load nothing more
        self._lock = asyncio.Lock()  # one change of the served set at a time (poll, load, unload)

    def _public(self, reason: str) -> str:
        """A reason with paths relative to the repository: callers need not learn the server's file system."""
        return reason.replace(f"{self.settings.model_repository.resolve()}/", "").replace(
            f"{self.settings.model_repository}/", ""
        )

    # -- what is on disk ------------------------------------------------------------------------
    async def scan(self) -> dict[str, Found]:
        return await asyncio.to_thread(scan_signatures, self.settings.model_repository)  # NFS can be slow

    # -- bringing one model in step -------------------------------------------------------------
    async def _sync_model(
        self, name: str, found: Found, *, settled: Collection[int] | None, retry_failed: bool
    ) -> list[str]:
        """Load what is wanted and new or changed, then unload what is superseded or gone. Returns the
        failures of this pass, one line per version."""
        m = self.manager
        on_disk = {v: sig for v, (_, sig) in found.items()}
        served = {v: mv.signature for v, mv in m.versions(name).items()}
        failed = {v: f.signature for (n, v), f in m.failures().items() if n == name}
        problems = []
        for v in plan_loads(on_disk, served, failed, self.policy, settled=settled, retry_failed=retry_failed):
            if self.stopped:
                break
            path, _ = found[v]
            try:
                await m.load_version(name, v, path)
            except LoadCancelledError:
                break  # draining: the file is not at fault
            except Exception as exc:
                failure = m.failure(name, v)
                reason = failure.reason if failure is not None else str(exc)
                problems.append(f"version {v}: {self._public(reason)}")
                log.error(
                    "model %s version %d failed to load; the versions serving keep serving: %s",
                    name,
                    v,
                    reason,
                    extra={"model": name, "version": v, "event": "model_load_failed"},
                )
        current = m.versions(name)
        for mv in [current[v] for v in plan_unloads(on_disk, list(current), self.policy)]:
            why = "its file is gone" if mv.version not in on_disk else f"the version policy {self.policy} moved on"
            log.info("unloading %s version %d: %s", name, mv.version, why, extra={"model": name, "version": mv.version})
            await m.unload_version(mv)
        # A failed file that is gone, or superseded (neither wanted nor serving: what is gone serves no more),
        # is not "not ready" any more.
        serving = set(m.versions(name))
        self._forget_failures(name, keep=set(select_versions(list(on_disk), self.policy)) | serving)
        return problems

    def _failed_models(self) -> set[str]:
        return {n for n, _ in self.manager.failures()}

    def _forget_failures(self, name: str, keep: Collection[int] = ()) -> None:
        """Stop reporting the failures of ``name``'s versions outside ``keep`` (in the index and as 0 in
        deepvit_model_ready); should such a file be wanted again, it gets one more try."""
        for n, v in self.manager.failures():
            if n == name and v not in keep:
                self.manager.forget_failure(n, v)

    def stop(self) -> None:
        """Draining has begun: polling ends, and a poll or load under way starts no further build."""
        self.stopped = True
        self.manager.stop_loading()

    async def poll_once(self) -> None:
        if self.stopped:
            return
        root = self.settings.model_repository
        if not await asyncio.to_thread(root.is_dir):  # an unmounted volume is not "every model removed"
            if not self._root_missing:
                log.error("model repository %s is not readable; serving what is loaded", root)
            self._root_missing = True
            return
        self._root_missing = False
        async with self._lock:
            scan = await self.scan()
            previous, self._previous_scan = self._previous_scan, scan
            # Models that failed count too: their failures (and 0 readiness) go once their folder is gone.
            for name in sorted(set(scan) | set(self.manager.names()) | self._failed_models()):
                if self.stopped:
                    break
                if name in self.held:
                    continue
                found, before = dict(scan.get(name, {})), previous.get(name, {})
                settled = {v for v, (_, sig) in found.items() if v in before and before[v][1] == sig}
                for v, entry in before.items():
                    # Gone since the last scan only (a directory being renamed into place?): one more scan first.
                    found.setdefault(v, entry)
                await self._sync_model(name, found, settled=settled, retry_failed=False)

    async def poll_forever(self, interval_s: float) -> None:
        log.info(
            "watching %s every %gs for new, changed and removed versions",
            self.settings.model_repository,
            interval_s,
            extra={"event": "repository_polling"},
        )
        while not self.stopped:
            await asyncio.sleep(interval_s)
            try:
                await self.poll_once()
            except Exception:
                log.exception("polling the model repository failed; trying again in %gs", interval_s)

    # -- the repository extension ---------------------------------------------------------------
    def _require_started(self) -> None:
        """Load and unload wait for the start-up load (which runs outside the lock) to finish."""
        if not self.manager.loaded:
            raise UnavailableError("models are still loading at start-up; retry shortly", reason="not_ready")

    async def load(self, name: str) -> None:
        """Load (or reload what changed of) a model's wanted versions now, failed files included."""
        self._require_started()
        async with self._lock:
            if self.stopped:
                raise _draining()
            root = self.settings.model_repository
            if not await asyncio.to_thread(root.is_dir):  # unmounted: not "the model is gone"
                raise UnavailableError(
                    "the model repository is not readable now; nothing was changed", reason="not_ready"
                )
            found = (await self.scan()).get(name, {})
            if not found:  # nothing changes: what serves keeps serving (polling or an unload removes it)
                raise NotFoundError(f"model {name!r} is not in the repository (no {name}/<version>/model.onnx)")
            self.held.discard(name)
            problems = await self._sync_model(name, found, settled=None, retry_failed=True)
        if problems:
            serving = sorted(self.manager.versions(name))
            still = f"; serving versions {', '.join(map(str, serving))}" if serving else "; nothing of it serves"
            raise BadRequestError(f"model {name!r} failed to load: {'; '.join(problems)}{still}")
        if not self.manager.versions(name):
            if self.stopped:  # draining began during the load
                raise _draining()
            raise BadRequestError(f"no version of {name!r} on disk is selected by the version policy {self.policy}")

    async def unload(self, name: str) -> None:
        """Unload every version of a model (each drained first) and keep it unloaded until a load."""
        self._require_started()
        async with self._lock:
            self._forget_failures(name)  # unloaded on purpose: none of its versions should serve
            served = list(self.manager.versions(name).values())
            if not served and name not in (await self.scan()):
                raise NotFoundError(f"unknown model {name!r}: it is neither served nor in the repository")
            self.held.add(name)
            for mv in served:
                log.info("unloading %s version %d by request", name, mv.version, extra={"model": name})
                await self.manager.unload_version(mv)

    async def index(self) -> list[IndexEntry]:
        """Every version on disk or in memory, with its state and, when it does not serve, why."""
        m = self.manager
        scan = await self.scan()
        keys = {(n, v) for n, vs in scan.items() for v in vs}
        keys |= {(mv.name, mv.version) for mv in m.all_versions()} | m.in_transition()
        wanted = {n: set(select_versions(list(vs), self.policy)) for n, vs in scan.items()}
        return [self._entry(name, v, wanted.get(name, set())) for name, v in sorted(keys)]

    def _entry(self, name: str, v: int, wanted: set[int]) -> IndexEntry:
        m = self.manager
        failure = m.failure(name, v)
        if v in m.versions(name):
            if m.is_loading(name, v):
                return IndexEntry(name, v, "READY", "a changed file is loading")
            if failure is not None:
                reason = f"the changed file failed to load, the previous one serves: {self._public(failure.reason)}"
                return IndexEntry(name, v, "READY", reason)
            return IndexEntry(name, v, "READY")
        if m.is_loading(name, v):
            return IndexEntry(name, v, "LOADING")
        if m.is_unloading(name, v):
            return IndexEntry(name, v, "UNLOADING")
        if failure is not None:
            return IndexEntry(name, v, "UNAVAILABLE", self._public(failure.reason))
        if name in self.held:
            return IndexEntry(name, v, "UNAVAILABLE", "unloaded by request")
        if v not in wanted:
            return IndexEntry(name, v, "UNAVAILABLE", f"not selected by the version policy {self.policy}")
        if self.settings.repository_poll_s > 0:
            return IndexEntry(name, v, "UNAVAILABLE", "new on disk: loads at the next poll")
        return IndexEntry(name, v, "UNAVAILABLE", "new on disk: polling is off, so load it by request")
