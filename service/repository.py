"""The model repository: ``<repository>/<name>/<version>/model.onnx``, versions being positive integers.

``ModelManager`` owns the served model versions: each has an ONNX Runtime session and its own batcher.
Loading and warm-up run off the event loop; a version takes traffic only once warmed.

Swaps cost no request: a request holds a lease (``lease_for``) on the version it was decoded for from submission
until its answer is in (not while its body uploads, so a slow client holds up no swap), and
unloading (an explicit unload, a newer version, a changed file) first takes the version out of the lookup,
then waits for the leases, lets the queued batches finish (``Batcher.close(drain=True)``, bounded by the request
timeout: what is left then gets 503) and only then
releases the session. A version replaced by a reload of the same number is swapped in one step.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from .batcher import Batcher
from .config import Settings, parse_version_policy
from .errors import ArtifactError, BadRequestError, NotFoundError, UnavailableError
from .metrics import Metrics
from .runtime import LoadCancelledError, ModelRuntime, Prediction

log = logging.getLogger("deepvit.repository")

ARTIFACT_NAME = "model.onnx"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_VERSION_RE = re.compile(r"[1-9][0-9]{0,17}")  # ASCII digits only: str.isdigit() takes "²", which int() refuses

State = Literal["loading", "ready", "unloading", "failed"]
Signature = tuple[int, int]  # (mtime_ns, size) of model.onnx: what tells a changed file


def artifact_signature(path: Path) -> Signature:
    st = path.stat()
    return st.st_mtime_ns, st.st_size


def scan_repository(root: Path) -> dict[str, dict[int, Path]]:
    """Every ``<name>/<version>/model.onnx`` under ``root``; other entries are ignored."""
    found: dict[str, dict[int, Path]] = {}
    if not root.is_dir():
        return found
    for model_dir in sorted(root.iterdir()):
        if not model_dir.is_dir() or not _NAME_RE.match(model_dir.name):
            continue
        try:
            version_dirs = list(model_dir.iterdir())
        except OSError as exc:  # removed (or made unreadable) since the listing
            log.warning("skipping %s: %s", model_dir, exc)
            continue
        for version_dir in version_dirs:
            if not _VERSION_RE.fullmatch(version_dir.name):
                if version_dir.is_dir():
                    log.warning("skipping %s: a version is a positive integer (1, 2, ...)", version_dir)
                continue
            artifact = version_dir / ARTIFACT_NAME
            if artifact.is_file():
                found.setdefault(model_dir.name, {})[int(version_dir.name)] = artifact
    return found


def select_versions(versions: Sequence[int], policy: str) -> list[int]:
    kind, arg = parse_version_policy(policy)
    ordered = sorted(versions)
    if kind == "all":
        return ordered
    if kind == "latest":
        assert isinstance(arg, int)
        return ordered[-arg:]
    assert isinstance(arg, tuple)
    return [v for v in ordered if v in arg]


class _QueueDepth:
    """``deepvit_queue_depth{model}``: the images queued for a model, over all its versions. Several versions
    batch at once (``latest:N``, or the old one draining during a swap), each batcher reporting its own depth;
    the series is their sum, not the last report."""

    def __init__(self, metrics: Metrics, model: str) -> None:
        self._gauge = metrics.queue_depth.labels(model)
        self._depths: dict[object, int] = {}  # reporting batcher's observer -> its depth

    def report(self, source: object, depth: int) -> None:
        self._depths[source] = depth
        self._gauge.set(sum(self._depths.values()))

    def forget(self, source: object) -> None:
        if self._depths.pop(source, None) is not None:
            self._gauge.set(sum(self._depths.values()))


class _BatchMetrics:
    """Adapts one version's batcher's observer hooks to Prometheus."""

    def __init__(self, metrics: Metrics, model: str, depth: _QueueDepth) -> None:
        self._depth = depth
        self._wait = metrics.queue_wait.labels(model)
        self._inference = metrics.inference.labels(model)
        self._batch = metrics.batch_size.labels(model)

    def queue_depth(self, depth: int) -> None:
        self._depth.report(self, depth)

    def release(self) -> None:
        """The batcher is closed: its queue no longer counts."""
        self._depth.forget(self)

    def batch_done(self, size: int, queue_waits: Sequence[float], compute_s: float) -> None:
        for w in queue_waits:
            self._wait.observe(w)
        self._inference.observe(compute_s)
        self._batch.observe(size)

    def expired(self, queue_wait: float) -> None:
        # The autoscaler reads the mean queue wait: leaving out the items that waited longest would make an
        # overloaded server look idle.
        self._wait.observe(queue_wait)


@dataclass(eq=False)
class ModelVersion:
    name: str
    version: int
    path: Path
    runtime: ModelRuntime
    batcher: Batcher[np.ndarray, Prediction]
    state: State = "loading"
    warmup_s: float = 0.0
    inflight: int = field(default=0)  # requests holding a lease: unloading waits for them
    signature: Signature | None = None  # of the file this session was built from
    observer: _BatchMetrics | None = None  # its batcher's metrics

    @property
    def labels(self) -> tuple[str, ...]:
        return self.runtime.meta.labels


def _input_of(mv: ModelVersion) -> tuple[object, ...]:
    """What a decoded request depends on: two versions equal in this take the same tensors and images."""
    rt = mv.runtime
    return rt.input_name, str(rt.session.get_outputs()[0].name), rt.meta.preprocess, rt.meta.num_classes, rt.meta.labels


def _info_labels(mv: ModelVersion) -> tuple[str, str, str, str, str]:
    meta = mv.runtime.meta
    return mv.name, str(mv.version), mv.runtime.provider_label, meta.precision, meta.weights


class ModelManager:
    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.models: dict[str, dict[int, ModelVersion]] = {}
        self.failures: dict[tuple[str, int], str] = {}
        self.loading: set[tuple[str, int]] = set()
        self.unloading: dict[tuple[str, int], ModelVersion] = {}
        self.loaded = False  # the start-up load has finished
        self._queue_depths: dict[str, _QueueDepth] = {}  # per model, shared by its versions' batchers
        self._stopping = threading.Event()  # read by builds in worker threads

    def stop_loading(self) -> None:
        """Draining has begun: a build under way stops at its next warm-up shape, none starts."""
        self._stopping.set()

    # -- loading --------------------------------------------------------------------------------
    def _build(self, name: str, version: int, path: Path) -> ModelVersion:
        """Blocking: session, warm-up. Runs in a worker thread."""
        s = self.settings
        if self._stopping.is_set():
            raise LoadCancelledError(f"{path} not loaded: the server is shutting down")
        runtime = ModelRuntime(path, s)
        depth = self._queue_depths.setdefault(name, _QueueDepth(self.metrics, name))
        observer = _BatchMetrics(self.metrics, name, depth)
        batcher: Batcher[np.ndarray, Prediction] = Batcher(
            runtime.predict,
            max_batch_size=s.max_batch_size,
            max_delay_s=s.max_queue_delay_s,
            max_queue_size=s.max_queue_size,
            observer=observer,
            name=f"{name}-{version}",
        )
        mv = ModelVersion(name, version, path, runtime, batcher, observer=observer)
        if s.warmup:
            try:
                mv.warmup_s = runtime.warmup(s.max_batch_size, cancelled=self._stopping.is_set)
            except LoadCancelledError as exc:
                # Logged here: the task that awaited this build may already be cancelled by the shutdown.
                log.info("%s", exc, extra={"model": name, "version": version, "event": "load_cancelled"})
                raise
        return mv

    async def load_version(self, name: str, version: int, path: Path) -> ModelVersion:
        """Build and warm a version, then put it into service; one already serving under the same number
        keeps serving until then and is unloaded (drained) afterwards. A failure is recorded and raised."""
        log.info("loading %s version %d from %s", name, version, path, extra={"model": name, "version": version})
        self.loading.add((name, version))
        if version not in self.models.get(name, {}):  # not serving until loaded and warmed (and 0 if it fails)
            self.metrics.model_ready.labels(name, str(version)).set(0)
        try:
            signature = artifact_signature(path)
            mv = await asyncio.to_thread(self._build, name, version, path)
        except LoadCancelledError:
            raise  # not the file's fault: nothing to record
        except Exception as exc:
            reason = str(exc) if isinstance(exc, ArtifactError) else f"{type(exc).__name__}: {exc}"
            self.failures[(name, version)] = reason
            self.metrics.model_load_failures.labels(name, str(version)).inc()
            raise
        finally:
            self.loading.discard((name, version))
        mv.signature = signature
        mv.batcher.start()
        mv.state = "ready"
        self.failures.pop((name, version), None)
        replaced = self.models.setdefault(name, {}).get(version)
        self.models[name][version] = mv
        meta = mv.runtime.meta
        self.metrics.model_ready.labels(name, str(version)).set(1)
        self.metrics.model_info.labels(*_info_labels(mv)).set(1)
        self.metrics.images.labels(name)  # counted by the routes; at 0 from now on, so rate() sees the first
        log.info(
            "model %s version %d ready on %s (%s, %s weights%s), warm-up %.2fs",
            name,
            version,
            mv.runtime.provider,
            meta.precision,
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
        self.unloading[key] = mv
        versions = self.models.get(mv.name, {})
        if versions.get(mv.version) is mv:
            del versions[mv.version]
        if not versions:
            self.models.pop(mv.name, None)
        try:
            loop = asyncio.get_running_loop()
            # A lease is held around the inference only (not while a body uploads); its deadline bounds it.
            end = loop.time() + self.settings.request_timeout_s
            while mv.inflight > 0 and loop.time() < end:
                await asyncio.sleep(0.005)
            # Queued batches get the same bound; what is still queued after it is answered 503.
            await mv.batcher.close(drain=True, timeout=self.settings.request_timeout_s)
        finally:
            if self.unloading.get(key) is mv:
                del self.unloading[key]
            if mv.observer is not None:
                mv.observer.release()
        # A successor under the same number already set these series; only drop what it does not share.
        successor = self.models.get(mv.name, {}).get(mv.version)
        if successor is None:
            with contextlib.suppress(KeyError):
                self.metrics.model_ready.remove(mv.name, str(mv.version))
        if successor is None or _info_labels(successor) != _info_labels(mv):
            with contextlib.suppress(KeyError):
                self.metrics.model_info.remove(*_info_labels(mv))
        log.info("unloaded %s version %d", mv.name, mv.version, extra={"model": mv.name, "version": mv.version})

    def forget_failure(self, name: str, version: int) -> None:
        """Stop reporting a version's failed load (its file is gone, superseded, or its model unloaded): its
        0 in deepvit_model_ready goes too, unless a version under that number serves."""
        if self.failures.pop((name, version), None) is not None and version not in self.models.get(name, {}):
            with contextlib.suppress(KeyError):
                self.metrics.model_ready.remove(name, str(version))

    async def close(self) -> None:
        for versions in list(self.models.values()):
            for mv in list(versions.values()):
                await self.unload_version(mv)

    # -- lookup ---------------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return (
            self.loaded
            and bool(self.models)
            and all(mv.state == "ready" for vs in self.models.values() for mv in vs.values())
        )

    def default_model(self) -> str | None:
        """The model /classify uses when none is named: the configured one, else the only one served."""
        if self.settings.default_model:
            return self.settings.default_model
        return next(iter(self.models)) if len(self.models) == 1 else None

    def default_name(self) -> str:
        default = self.default_model()
        if default is not None:
            return default
        if not self.models:
            raise UnavailableError("no model is loaded yet", reason="not_ready")
        raise BadRequestError(
            f"several models are served; name one with ?model= (one of {', '.join(sorted(self.models))})"
        )

    @contextlib.contextmanager
    def lease(self, name: str | None, version: int | None) -> Iterator[ModelVersion]:
        """``resolve``, and hold the version until the block ends: an unload waits for it."""
        mv = self.resolve(name, version)
        mv.inflight += 1
        try:
            yield mv
        finally:
            mv.inflight -= 1

    @contextlib.contextmanager
    def lease_for(self, mv: ModelVersion, name: str | None, version: int | None) -> Iterator[ModelVersion]:
        """Hold, for the inference itself, the version a request was read and decoded for (resolved without a
        lease, so that a slow upload holds up no swap); if it was replaced meanwhile, what ``(name, version)``
        resolves to now, provided it takes the same input; else 503."""
        current = mv if mv.state == "ready" else self.resolve(name, version)
        if current is not mv and _input_of(current) != _input_of(mv):
            raise UnavailableError(
                f"model {mv.name} version {mv.version} was replaced by one taking other input while the request "
                "was read; retry",
                reason="unloading",
            )
        current.inflight += 1
        try:
            yield current
        finally:
            current.inflight -= 1

    def resolve(self, name: str | None, version: int | None) -> ModelVersion:
        if not self.loaded:
            raise UnavailableError("models are still loading; retry shortly", reason="not_ready")
        name = name or self.default_name()
        versions = self.models.get(name)
        if not versions:
            raise NotFoundError(f"unknown model {name!r}; served models: {', '.join(sorted(self.models)) or 'none'}")
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
