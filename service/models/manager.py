"""The served model versions in memory: each has an ONNX Runtime session and its own batcher.

Loading and warm-up run off the event loop; a version takes traffic only once warmed.

Swaps cost no request: a request holds a lease (``lease_for``) on the version it was decoded for from submission
until its answer is in (not while its body uploads, so a slow client holds up no swap), and
unloading (an explicit unload, a newer version, a changed file) first takes the version out of the lookup,
then waits for the leases, lets the queued batches finish (``Batcher.close(drain=True)``, bounded by the request
timeout: what is left then gets 503) and only then
releases the session. A version replaced by a reload of the same number is swapped in one step.

A failed load is recorded once, here (its reason and the file's signature), and reported until the file is
gone, superseded or its model unloaded (``forget_failure``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from deepvit.artifact import ArtifactError
from deepvit.artifact.batching import Warmup
from deepvit.artifact.engines import candidates, host_engines

from ..batcher import Batcher
from ..budget import MemoryBudget, MemoryBudgetError, resident_bytes
from ..config import Settings
from ..engines import ChosenBy, EngineChoice, fixed_engine
from ..errors import BadRequestError, NotFoundError, UnavailableError
from ..memory import lower_thread_priority
from ..metrics import Metrics
from ..runtime import GPU_PROVIDERS, LoadCancelledError, ModelRuntime, Prediction
from .disk import Signature, artifact_signature, scan_repository, select_versions
from .io import ModelIO
from .observers import BatchMetrics, QueueDepth

log = logging.getLogger("deepvit.repository")


def _cores() -> int:
    """The cores this process may run on (a container's CPU set, not the host's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


State = Literal["loading", "ready", "unloading"]
Key = tuple[str, int]  # (model name, version)
Instances = tuple[int, "tuple[ModelRuntime, Warmup] | None"]  # how many, and the single-threaded one if several


@dataclass(eq=False)
class ModelVersion:
    name: str
    version: int
    path: Path
    runtime: ModelRuntime
    batcher: Batcher[np.ndarray, Prediction]
    state: State = "loading"
    warmup_s: float = 0.0
    batch_s: dict[int, float] = field(default_factory=dict)  # warm-up time of one batch, by size
    batch_size_chosen_by: Literal["setting", "measurement"] = "setting"
    instances_chosen_by: Literal["setting", "measurement"] = "setting"
    runtimes: list[ModelRuntime] = field(default_factory=list)  # the execution instances (runtime is the first)
    solo: ModelRuntime | None = None  # one session over every core, for a lone batch at low load
    inflight: int = field(default=0)  # requests holding a lease: unloading waits for them
    _unleased: asyncio.Event = field(default_factory=asyncio.Event)  # set whenever inflight drops to 0
    signature: Signature | None = None  # of the file this session was built from
    observer: BatchMetrics | None = None  # its batcher's metrics
    engine: EngineChoice | None = None  # what computes it, and why

    @property
    def labels(self) -> tuple[str, ...]:
        return self.runtime.meta.labels

    @functools.cached_property
    def io(self) -> ModelIO:
        """What it takes and gives, as a request sees it."""
        return ModelIO.of(self.runtime)

    @contextlib.contextmanager
    def leased(self) -> Iterator[ModelVersion]:
        self.inflight += 1
        try:
            yield self
        finally:
            self.inflight -= 1
            if self.inflight == 0:
                self._unleased.set()

    async def leases_released(self, timeout_s: float) -> bool:
        """Wait (at most ``timeout_s``) until no request holds a lease; True if none does."""
        if self.inflight:
            self._unleased.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._unleased.wait(), timeout_s)
        return self.inflight == 0


def _info_labels(mv: ModelVersion) -> tuple[str, str, str, str, str]:
    meta = mv.runtime.meta
    return mv.name, str(mv.version), mv.runtime.provider_label, mv.runtime.precision, meta.weights


@dataclass(frozen=True)
class LoadFailure:
    """Why a version's last load failed, and the file it failed on (not tried again as it is)."""

    reason: str
    signature: Signature | None


class ModelManager:
    """The served versions in memory. ``runtime_factory`` builds a version's runtime from its file (blocking,
    in a worker thread): ONNX Runtime's, or a test's fake."""

    def __init__(
        self,
        settings: Settings,
        metrics: Metrics,
        runtime_factory: Callable[[Path, Settings], ModelRuntime] = ModelRuntime,
        budget: MemoryBudget | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.budget = budget  # each version's sessions are measured into it at load (service/budget.py)
        self.loaded = False  # the start-up load has finished
        self._runtime_factory = runtime_factory
        self._versions: dict[str, dict[int, ModelVersion]] = {}
        self._failures: dict[Key, LoadFailure] = {}
        self._loading: set[Key] = set()
        self._unloading: dict[Key, ModelVersion] = {}
        self._queue_depths: dict[str, QueueDepth] = {}  # per model, shared by its versions' batchers
        self._stopping = threading.Event()  # read by builds in worker threads

    # -- what is in memory ----------------------------------------------------------------------
    def names(self) -> list[str]:
        """The models with at least one version serving, sorted."""
        return sorted(self._versions)

    def versions(self, name: str) -> dict[int, ModelVersion]:
        """The versions of ``name`` that serve (a copy: loads and unloads change the store, not it)."""
        return dict(self._versions.get(name, {}))

    def all_versions(self) -> list[ModelVersion]:
        return [mv for name in self.names() for _, mv in sorted(self._versions[name].items())]

    def failures(self) -> dict[Key, LoadFailure]:
        return dict(self._failures)

    def failure(self, name: str, version: int) -> LoadFailure | None:
        return self._failures.get((name, version))

    def is_loading(self, name: str, version: int) -> bool:
        return (name, version) in self._loading

    def is_unloading(self, name: str, version: int) -> bool:
        return (name, version) in self._unloading

    def any_loading(self) -> bool:
        return bool(self._loading)

    def in_transition(self) -> set[Key]:
        """Versions being loaded or unloaded now."""
        return self._loading | set(self._unloading)

    def stop_loading(self) -> None:
        """Draining has begun: a build under way stops at its next warm-up shape, none starts."""
        self._stopping.set()

    # -- loading --------------------------------------------------------------------------------
    def _build(self, name: str, version: int, path: Path) -> ModelVersion:
        """Blocking: session, warm-up. Runs in a worker thread."""
        s = self.settings
        if self._stopping.is_set():
            raise LoadCancelledError(f"{path} not loaded: the server is shutting down")
        threads = s.intra_op_threads
        if s.instances > 1 and not threads:  # the operator's instances share the cores
            threads = max(1, _cores() // s.instances)
        runtime = self._runtime_factory(path, s.model_copy(update={"intra_op_threads": threads}))
        runtime, warm, choice, plan = self._choose_engine(name, version, path, runtime, threads)
        s = s.model_copy(update={"engine": runtime.engine.name if choice.chosen_by != "gpu" else s.engine})
        max_batch = s.max_batch_size
        count = max(1, s.instances)
        runtimes = [runtime]
        solo: ModelRuntime | None = None
        batch_chosen_by: Literal["setting", "measurement"] = "setting"
        instances_chosen_by: Literal["setting", "measurement"] = "setting"
        if s.warmup:
            warm = warm or self._warm(name, version, runtime)
            if not s.instances:
                instances_chosen_by = "measurement"
                count, single = plan or self._measure_instances(name, version, path, runtime, warm, s)
                if single is not None:  # one single-threaded session per core, this one the first
                    # The session over every core stays, for a batch that finds every instance idle and
                    # nothing behind it: at low load one request gets the latency of all the cores.
                    solo = runtime
                    runtime, warm = single
                    runtimes = [runtime]
                    threads = 1
            if "max_batch_size" not in s.model_fields_set:  # the operator fixed none: the serving sessions'
                max_batch = warm.best_batch_size(budget_s=s.batch_budget_s)  # most efficient size
                batch_chosen_by = "measurement"
        while len(runtimes) < count:
            extra = self._runtime_factory(path, s.model_copy(update={"intra_op_threads": threads}))
            if s.warmup:  # the sizes it will serve, no larger: what a larger batch allocates stays allocated
                self._warm(name, version, extra, max_batch)
            runtimes.append(extra)
        if s.warmup:
            for rt in [*runtimes, *([solo] if solo is not None else [])]:
                rt.release_warmup_memory(max_batch)
        depth = self._queue_depths.setdefault(name, QueueDepth(self.metrics, name))
        observer = BatchMetrics(self.metrics, name, depth)
        batcher: Batcher[np.ndarray, Prediction] = Batcher(
            [rt.predict for rt in runtimes],
            max_batch_size=max_batch,
            max_delay_s=s.max_queue_delay_s,
            max_queue_size=s.max_queue_size,
            observer=observer,
            name=f"{name}-{version}",
            thread_initializer=functools.partial(lower_thread_priority, s.worker_niceness),  # service/memory.py
            solo=solo.predict if solo is not None else None,
        )
        mv = ModelVersion(
            name,
            version,
            path,
            runtimes[0],
            batcher,
            warmup_s=warm.seconds if warm else 0.0,
            batch_s=warm.batch_s if warm else {},
            batch_size_chosen_by=batch_chosen_by,
            instances_chosen_by=instances_chosen_by,
            runtimes=runtimes,
            solo=solo,
            observer=observer,
            engine=choice,
        )
        log.info(
            "%s version %d: %s",
            name,
            version,
            choice.describe(),
            extra={"model": name, "version": version, "event": "engine", "engine": choice.engine.name},
        )
        if warm is not None:
            table = ", ".join(f"{n}: {1000 * t / n:.2f}" for n, t in sorted(warm.batch_s.items()))
            log.info(
                "%s version %d: %d instance(s)%s, batches of at most %d images (%s); ms per image by batch size: %s",
                name,
                version,
                len(runtimes),
                f" and one session over all {_cores()} cores for a lone batch" if solo is not None else "",
                max_batch,
                "the most efficient size measured" if batch_chosen_by == "measurement" else "as set",
                table,
                extra={"model": name, "version": version, "event": "batching", "batch": max_batch},
            )
        return mv

    def _warm(self, name: str, version: int, runtime: ModelRuntime, max_batch: int | None = None) -> Warmup:
        try:
            return runtime.warmup(max_batch or self.settings.max_batch_size, cancelled=self._stopping.is_set)
        except LoadCancelledError as exc:
            # Logged here: the task that awaited this build may already be cancelled by the shutdown.
            log.info("%s", exc, extra={"model": name, "version": version, "event": "load_cancelled"})
            raise

    def _choose_engine(
        self, name: str, version: int, path: Path, runtime: ModelRuntime, threads: int
    ) -> tuple[ModelRuntime, Warmup | None, EngineChoice, Instances | None]:
        """The engine that computes this version (service/engines.py): on a GPU, the GPU's; else the one the
        operator set, or, by measurement, the candidate that serves the most images per second over the cores,
        each with its best instances (one wide session, or one single-threaded session per core) at its best
        batch. ``runtime`` is today's (the providers' list); the runtime that computes is returned with its
        warm-up and its instances where they were measured."""
        if runtime.provider in GPU_PROVIDERS.values():
            return runtime, None, EngineChoice(runtime.engine, runtime.precision, "gpu", "the GPU computes"), None
        found = candidates(runtime.meta, host_engines())
        fixed, why = fixed_engine(self.settings, found)
        if fixed is not None:
            if fixed != runtime.engine:
                runtime = self._runtime_factory(path, self._engine_settings(fixed.name, threads))
            chosen_by: ChosenBy = "setting" if why == "DEEPVIT_ENGINE" else "fallback"
            if chosen_by == "fallback":
                log.warning("%s version %d: %s", name, version, why, extra={"event": "engine_fallback"})
            return (
                runtime,
                None,
                EngineChoice(runtime.engine, runtime.precision, chosen_by, why, {}, found.refused),
                None,
            )
        if len(found.engines) < 2 or not self.settings.warmup:
            chosen_by = "only one" if len(found.engines) < 2 else "default"
            reason = "the only engine here" if len(found.engines) < 2 else "no warm-up (DEEPVIT_WARMUP) to measure by"
            choice = EngineChoice(runtime.engine, runtime.precision, chosen_by, reason, {}, found.refused)
            return runtime, None, choice, None
        budget = self.settings.batch_budget_s
        measured: dict[str, tuple[ModelRuntime, Warmup, Instances | None]] = {}
        rates: dict[str, float] = {}
        for engine in found.engines:
            s = self._engine_settings(engine.name, threads)
            rt = runtime if engine == runtime.engine else self._runtime_factory(path, s)
            warm = self._warm(name, version, rt)
            plan = None if self.settings.instances else self._measure_instances(name, version, path, rt, warm, s)
            measured[engine.name] = (rt, warm, plan)
            count, single = plan or (1, None)
            rates[engine.name] = count / (single or (rt, warm))[1].best_time_per_image(budget)
        best = max(rates, key=lambda k: rates[k])
        runtime, warm, plan = measured[best]
        reason = "the most images per second of the engines the host offers and the gate allows, each at its best"
        return (
            runtime,
            warm,
            EngineChoice(runtime.engine, runtime.precision, "measurement", reason, rates, found.refused),
            plan,
        )

    def _engine_settings(self, engine: str, threads: int) -> Settings:
        return self.settings.model_copy(update={"intra_op_threads": threads, "engine": engine})

    def _measure_instances(
        self, name: str, version: int, path: Path, runtime: ModelRuntime, warm: Warmup, s: Settings
    ) -> tuple[int, tuple[ModelRuntime, Warmup] | None]:
        """On a CPU of several cores: one session using them all, or one single-threaded session per core?
        The second wins when attention's small matrices scale badly over threads. Warm a single-threaded
        session and take one instance per core when, each at its most efficient batch, that gives at least as
        many images per second: the warm-up measures each session alone, and serving favours the narrow ones
        further (a decode thread that preempts one of a wide session's threads stalls the others). The wide
        session is not lost for it: it becomes the solo session, which a request alone in the pipeline gets
        (service/batcher.py). Returns the count and, when it is more than one, the single-threaded session
        with its warm-up."""
        cores = _cores()
        if runtime.provider in GPU_PROVIDERS.values() or cores < 2 or self.settings.intra_op_threads:
            return 1, None
        single = self._runtime_factory(path, s.model_copy(update={"intra_op_threads": 1}))
        single_warm = self._warm(name, version, single)
        budget = self.settings.batch_budget_s
        if cores / single_warm.best_time_per_image(budget) >= 1 / warm.best_time_per_image(budget):
            return cores, (single, single_warm)
        return 1, None

    async def load_version(self, name: str, version: int, path: Path) -> ModelVersion:
        """Build and warm a version, then put it into service; one already serving under the same number
        keeps serving until then and is unloaded (drained) afterwards. A failure is recorded and raised."""
        log.info(
            "loading %s version %d from %s",
            name,
            version,
            path,
            extra={"model": name, "version": version, "event": "model_loading"},
        )
        self._loading.add((name, version))
        signature: Signature | None = None
        if version not in self._versions.get(name, {}):  # not serving until loaded and warmed (and 0 if it fails)
            self.metrics.model_ready.labels(name, str(version)).set(0)
        try:
            signature = artifact_signature(path)
            before = resident_bytes()
            mv = await asyncio.to_thread(self._build, name, version, path)
            if self.budget is not None:  # what its sessions hold, warmed: a version that does not fit fails
                self.budget.add_version(name, version, max(0, resident_bytes() - before))
        except LoadCancelledError:
            raise  # not the file's fault: nothing to record
        except Exception as exc:
            reason = str(exc) if isinstance(exc, ArtifactError | MemoryBudgetError) else f"{type(exc).__name__}: {exc}"
            self._failures[(name, version)] = LoadFailure(reason, signature)
            self.metrics.model_load_failures.labels(name, str(version)).inc()
            raise
        finally:
            self._loading.discard((name, version))
        mv.signature = signature
        mv.batcher.start()
        mv.state = "ready"
        self._failures.pop((name, version), None)
        replaced = self._versions.setdefault(name, {}).get(version)
        self._versions[name][version] = mv
        meta = mv.runtime.meta
        self.metrics.model_ready.labels(name, str(version)).set(1)
        self.metrics.model_info.labels(*_info_labels(mv)).set(1)
        self.metrics.max_batch_size.labels(name, str(version)).set(mv.batcher.max_batch_size)
        self.metrics.instances.labels(name, str(version)).set(mv.batcher.instances)
        self.metrics.images.labels(name)  # counted by the routes; at 0 from now on, so rate() sees the first
        log.info(
            "model %s version %d ready on %s (%s, %s weights%s), warm-up %.2fs",
            name,
            version,
            mv.runtime.provider,
            mv.runtime.precision,
            meta.weights,
            ": UNTRAINED, random initial weights, answers mean nothing" if meta.untrained else "",
            mv.warmup_s,
            extra={"model": name, "version": version, "event": "model_ready", "weights": meta.weights},
        )
        if meta.untrained:
            log.warning(
                "model %s version %d is UNTRAINED (exported with --random-init)",
                name,
                version,
                extra={"model": name, "version": version, "event": "untrained_model"},
            )
        if replaced is not None:
            await self.unload_version(replaced)
        return mv

    async def load_repository(self) -> None:
        """Start-up: every selected version must load, or the start fails with the reason."""
        found = scan_repository(self.settings.model_repository)
        if not found:
            raise ArtifactError(
                f"model repository {self.settings.model_repository} holds no <name>/<version>/model.onnx; "
                "export one with: deepvit export --arch deepvit_S --checkpoint CKPT "
                f"--output {self.settings.model_repository}/deepvit_S/1/model.onnx"
            )
        d = self.settings.default_model
        if d is not None and d not in found:
            raise ArtifactError(f"DEEPVIT_DEFAULT_MODEL={d} is not in the repository (found: {', '.join(found)})")
        for name, versions in found.items():
            for v in select_versions(list(versions), self.settings.version_policy):
                await self.load_version(name, v, versions[v])
        self.loaded = True

    async def unload_version(self, mv: ModelVersion) -> None:
        """Stop new traffic at once, wait for the requests holding a lease and the queued batches to finish,
        then release the session."""
        key = (mv.name, mv.version)
        mv.state = "unloading"
        self._unloading[key] = mv
        versions = self._versions.get(mv.name, {})
        if versions.get(mv.version) is mv:
            del versions[mv.version]
        if not versions:
            self._versions.pop(mv.name, None)
        try:
            # A lease is held around the inference only (not while a body uploads); its deadline bounds it.
            await mv.leases_released(self.settings.request_timeout_s)
            # Queued batches get the same bound; what is still queued after it is answered 503.
            await mv.batcher.close(drain=True, timeout=self.settings.request_timeout_s)
        finally:
            if self._unloading.get(key) is mv:
                del self._unloading[key]
            if mv.observer is not None:
                mv.observer.release()
        # A successor under the same number already set these series; only drop what it does not share.
        successor = self._versions.get(mv.name, {}).get(mv.version)
        if successor is None:
            with contextlib.suppress(KeyError):
                self.metrics.model_ready.remove(mv.name, str(mv.version))
            with contextlib.suppress(KeyError):
                self.metrics.max_batch_size.remove(mv.name, str(mv.version))
            with contextlib.suppress(KeyError):
                self.metrics.instances.remove(mv.name, str(mv.version))
            if self.budget is not None:
                self.budget.remove_version(mv.name, mv.version)
        if successor is None or _info_labels(successor) != _info_labels(mv):
            with contextlib.suppress(KeyError):
                self.metrics.model_info.remove(*_info_labels(mv))
        log.info(
            "unloaded %s version %d",
            mv.name,
            mv.version,
            extra={"model": mv.name, "version": mv.version, "event": "model_unloaded"},
        )

    def forget_failure(self, name: str, version: int) -> None:
        """Stop reporting a version's failed load (its file is gone, superseded, or its model unloaded): its
        0 in deepvit_model_ready goes too, unless a version under that number serves."""
        if self._failures.pop((name, version), None) is not None and version not in self._versions.get(name, {}):
            with contextlib.suppress(KeyError):
                self.metrics.model_ready.remove(name, str(version))

    async def close(self) -> None:
        for mv in self.all_versions():
            await self.unload_version(mv)

    # -- lookup ---------------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return self.loaded and bool(self._versions) and all(mv.state == "ready" for mv in self.all_versions())

    def default_model(self) -> str | None:
        """The model /classify uses when none is named: the configured one, else the only one served."""
        if self.settings.default_model:
            return self.settings.default_model
        return next(iter(self._versions)) if len(self._versions) == 1 else None

    def default_name(self) -> str:
        default = self.default_model()
        if default is not None:
            return default
        if not self._versions:
            raise UnavailableError("no model is loaded yet", reason="not_ready")
        raise BadRequestError(f"several models are served; name one with ?model= (one of {', '.join(self.names())})")

    @contextlib.contextmanager
    def lease(self, name: str | None, version: int | None) -> Iterator[ModelVersion]:
        """``resolve``, and hold the version until the block ends: an unload waits for it."""
        with self.resolve(name, version).leased() as mv:
            yield mv

    @contextlib.contextmanager
    def lease_for(self, mv: ModelVersion, name: str | None, version: int | None) -> Iterator[ModelVersion]:
        """Hold, for the inference itself, the version a request was read and decoded for (resolved without a
        lease, so that a slow upload holds up no swap); if it was replaced meanwhile, what ``(name, version)``
        resolves to now, provided it takes the same input; else 503."""
        current = mv if mv.state == "ready" else self.resolve(name, version)
        if current is not mv and not current.io.takes_same_input(mv.io):
            raise UnavailableError(
                f"model {mv.name} version {mv.version} was replaced by one taking other input while the request "
                "was read; retry",
                reason="unloading",
            )
        with current.leased():
            yield current

    def resolve(self, name: str | None, version: int | None) -> ModelVersion:
        if not self.loaded:
            raise UnavailableError("models are still loading; retry shortly", reason="not_ready")
        name = name or self.default_name()
        versions = self._versions.get(name)
        if not versions:
            raise NotFoundError(f"unknown model {name!r}; served models: {', '.join(self.names()) or 'none'}")
        if version is None:
            mv = versions[max(versions)]
        elif version in versions:
            mv = versions[version]
        else:
            raise NotFoundError(
                f"model {name!r} has no version {version}; served versions: {', '.join(map(str, sorted(versions)))}"
            )
        if mv.state != "ready":
            raise UnavailableError(f"model {name!r} version {mv.version} is {mv.state}", reason="not_ready")
        return mv
