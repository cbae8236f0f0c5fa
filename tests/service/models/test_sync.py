"""Keeping the served versions in step with the repository's files: what polls, explicit loads and unloads
do, with the real ModelManager over fake runtimes (no ONNX Runtime)."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from deepvit.artifact import ArtifactError, ArtifactMetadata, PreprocessSpec
from deepvit.artifact.engines import CPU_ENGINE
from deepvit.service.batcher import Batcher, BatcherClosedError
from deepvit.service.config import Settings
from deepvit.service.context import AppContext
from deepvit.service.errors import BadRequestError, NotFoundError, UnavailableError
from deepvit.service.metrics import Metrics
from deepvit.service.models.manager import ModelManager, ModelVersion
from deepvit.service.models.sync import RepositorySync
from deepvit.service.runtime import Prediction


# -- what polls do, with a fake manager --------------------------------------------------------------
class FakeRuntime:
    """A version's runtime built from any file, as ``ModelManager``'s runtime factory: a file starting with
    b"bad" fails to load, as a corrupt artifact does."""

    provider = "CPUExecutionProvider"
    provider_label = "cpu"
    engine = CPU_ENGINE
    precision = "fp32"
    input_name = "image"

    def __init__(self, path: Path, settings: Settings) -> None:
        if path.read_bytes().startswith(b"bad"):
            raise ArtifactError(f"{path}: not a model")
        pre = PreprocessSpec(crop_size=32, resize_shorter=35)
        self.meta = ArtifactMetadata(path.parent.parent.name, "custom", 2, ("a", "b"), pre, "state_dict", "fp32", "")

    def predict(self, images: list[np.ndarray]) -> list[Prediction]:
        return [Prediction(np.zeros(2, dtype=np.float32), len(images)) for _ in images]


class Events(logging.Handler):
    """The store's load attempts and unloads, in order, from its log records."""

    def __init__(self) -> None:
        super().__init__()
        self.log: list[tuple[str, str, int]] = []

    def emit(self, record: logging.LogRecord) -> None:
        kind = {"model_loading": "load", "model_unloaded": "unload"}.get(getattr(record, "event", ""))
        if kind is not None:
            self.log.append((kind, getattr(record, "model", ""), getattr(record, "version", 0)))


@pytest.fixture
def events() -> Iterator[Events]:
    handler = Events()
    logger = logging.getLogger("deepvit.repository")
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def write(root: Path, name: str, version: int, content: bytes = b"good") -> None:
    (root / name / str(version)).mkdir(parents=True, exist_ok=True)
    (root / name / str(version) / "model.onnx").write_bytes(content)


def live(root: Path) -> tuple[RepositorySync, ModelManager]:
    """A real ModelManager over fake runtimes, started (as after the start-up load), and its sync."""
    settings = Settings(model_repository=root, repository_poll_s=1.0, warmup=False)
    manager = ModelManager(settings, Metrics(), runtime_factory=FakeRuntime)  # type: ignore[arg-type]
    manager.loaded = True
    return RepositorySync(manager), manager


def run(manager: ModelManager, scenario: Callable[[], Awaitable[None]]) -> None:
    """Run a scenario, then release what it left loaded (their batchers' tasks end with the loop)."""

    async def main() -> None:
        try:
            await scenario()
        finally:
            await manager.close()

    asyncio.run(main())


async def settle(repo: RepositorySync) -> None:
    """Two polls: what was written before is seen unchanged twice, so it is acted on."""
    await repo.poll_once()
    await repo.poll_once()


async def failed_newcomer(repo: RepositorySync, root: Path) -> None:
    """Model m: version 1 serves, then a version 2 that fails to load arrives; 1 stays, as the fallback."""
    write(root, "m", 1)
    await settle(repo)
    write(root, "m", 2, b"bad bytes")
    await settle(repo)


def served(manager: ModelManager) -> dict[str, list[int]]:
    return {name: sorted(manager.versions(name)) for name in manager.names()}


def test_polls_load_a_settled_new_version_then_unload_its_predecessor(tmp_path: Path, events: Events) -> None:
    repo, manager = live(tmp_path)
    write(tmp_path, "m", 1)

    async def scenario() -> None:
        await repo.poll_once()  # first sight: not yet settled
        assert served(manager) == {}
        await repo.poll_once()
        assert served(manager) == {"m": [1]}
        write(tmp_path, "m", 2)
        await repo.poll_once()
        assert served(manager) == {"m": [1]}
        await repo.poll_once()
        assert served(manager) == {"m": [2]}
        assert events.log[-2:] == [("load", "m", 2), ("unload", "m", 1)]

    run(manager, scenario)


def test_polls_wait_one_scan_before_unloading_what_went_missing(tmp_path: Path, events: Events) -> None:
    repo, manager = live(tmp_path)
    write(tmp_path, "m", 1)
    write(tmp_path, "m", 2)

    async def scenario() -> None:
        await repo.poll_once()
        await repo.poll_once()
        assert served(manager) == {"m": [2]}
        done = len(events.log)
        (tmp_path / "m" / "2").rename(tmp_path / "m" / ".2-old")  # a directory being replaced by a rename
        await repo.poll_once()
        (tmp_path / "m" / ".2-old").rename(tmp_path / "m" / "2")
        await repo.poll_once()
        await repo.poll_once()
        assert events.log[done:] == []  # nothing happened

        shutil.rmtree(tmp_path / "m" / "2")  # removed for good: version 1 (on disk, settled) comes back
        await repo.poll_once()
        assert served(manager) == {"m": [2]}
        await repo.poll_once()
        assert served(manager) == {"m": [1]}
        assert events.log[done:] == [("load", "m", 1), ("unload", "m", 2)]

        shutil.rmtree(tmp_path / "m")
        await repo.poll_once()
        await repo.poll_once()
        assert served(manager) == {}

    run(manager, scenario)


def test_a_failed_version_is_reported_not_retried_and_leaves_the_old_serving(tmp_path: Path, events: Events) -> None:
    repo, manager = live(tmp_path)
    write(tmp_path, "m", 1)

    async def scenario() -> None:
        await repo.poll_once()
        await repo.poll_once()
        write(tmp_path, "m", 2, b"bad bytes")
        for _ in range(5):
            await repo.poll_once()
        assert served(manager) == {"m": [1]}
        assert events.log.count(("load", "m", 2)) == 1
        entries = {(e.version, e.state): e.reason for e in await repo.index()}
        assert entries[(1, "READY")] == ""
        assert entries[(2, "UNAVAILABLE")] == "m/2/model.onnx: not a model"  # relative to the repository
        with pytest.raises(BadRequestError, match=r"failed to load: version 2.*serving versions 1"):
            await repo.load("m")  # an explicit load tries again, and says what still serves
        assert events.log.count(("load", "m", 2)) == 2

        write(tmp_path, "m", 2, b"good, repaired")
        os.utime(tmp_path / "m" / "2" / "model.onnx", (1, 1))  # a new signature even within the clock's tick
        await repo.poll_once()
        await repo.poll_once()
        assert served(manager) == {"m": [2]}

    run(manager, scenario)


def test_a_failure_is_forgotten_once_superseded_or_unloaded(tmp_path: Path) -> None:
    # A failed version keeps deepvit_model_ready at 0 (and its alert firing) only while it should serve.
    repo, manager = live(tmp_path)

    async def scenario() -> None:
        await failed_newcomer(repo, tmp_path)
        assert served(manager) == {"m": [1]}
        assert ("m", 2) in manager.failures()
        write(tmp_path, "m", 3)
        await settle(repo)
        assert served(manager) == {"m": [3]}
        assert manager.failures() == {}  # version 2 is no longer wanted by latest:1
        write(tmp_path, "m", 4, b"bad again")
        await settle(repo)
        assert ("m", 4) in manager.failures()
        await repo.unload("m")
        assert manager.failures() == {}

    run(manager, scenario)


def test_a_new_model_that_failed_is_forgotten_once_its_folder_is_gone(tmp_path: Path) -> None:
    repo, manager = live(tmp_path)
    write(tmp_path, "new", 1, b"bad bytes")

    async def scenario() -> None:
        await settle(repo)
        assert ("new", 1) in manager.failures()
        shutil.rmtree(tmp_path / "new")
        await settle(repo)
        assert manager.failures() == {}

    run(manager, scenario)


def test_a_superseded_failure_gets_one_more_try_when_wanted_again(tmp_path: Path, events: Events) -> None:
    repo, manager = live(tmp_path)

    async def scenario() -> None:
        await failed_newcomer(repo, tmp_path)
        write(tmp_path, "m", 3, b"bad too")
        await settle(repo)
        assert set(manager.failures()) == {("m", 3)}  # version 2 is superseded: no longer reported
        shutil.rmtree(tmp_path / "m" / "3")
        for _ in range(3):
            await repo.poll_once()
        assert events.log.count(("load", "m", 2)) == 2  # wanted again: tried again, and reported
        assert set(manager.failures()) == {("m", 2)}
        assert served(manager) == {"m": [1]}

    run(manager, scenario)


def test_a_fallback_whose_changed_file_fails_is_not_retried_every_poll(tmp_path: Path, events: Events) -> None:
    repo, manager = live(tmp_path)

    async def scenario() -> None:
        await failed_newcomer(repo, tmp_path)
        write(tmp_path, "m", 1, b"bad now")
        os.utime(tmp_path / "m" / "1" / "model.onnx", (1, 1))
        for _ in range(5):
            await repo.poll_once()
        assert events.log.count(("load", "m", 1)) == 2  # the first load, and one try of the changed file
        assert ("m", 1) in manager.failures()

    run(manager, scenario)


def test_an_unreadable_repository_root_changes_nothing(tmp_path: Path) -> None:
    root = tmp_path / "repo"
    repo, manager = live(root)
    write(root, "m", 1)

    async def scenario() -> None:
        await repo.poll_once()
        await repo.poll_once()
        root.rename(tmp_path / "elsewhere")  # an unmounted volume
        for _ in range(3):
            await repo.poll_once()
        assert served(manager) == {"m": [1]}

    run(manager, scenario)


def test_an_unloaded_model_stays_unloaded_until_loaded(tmp_path: Path) -> None:
    repo, manager = live(tmp_path)
    write(tmp_path, "m", 1)
    write(tmp_path, "other", 1)

    async def scenario() -> None:
        await repo.poll_once()
        await repo.poll_once()
        await repo.unload("m")
        for _ in range(3):
            await repo.poll_once()
        assert served(manager) == {"other": [1]}
        assert [e.reason for e in await repo.index() if e.name == "m"] == ["unloaded by request"]
        await repo.load("m")
        assert served(manager) == {"m": [1], "other": [1]}
        with pytest.raises(NotFoundError):
            await repo.load("nope")
        with pytest.raises(NotFoundError):
            await repo.unload("nope")

    run(manager, scenario)


def test_an_explicit_load_of_a_model_gone_from_disk_is_404_and_unloads_nothing(tmp_path: Path, events: Events) -> None:
    repo, manager = live(tmp_path)
    write(tmp_path, "m", 1)

    async def scenario() -> None:
        await repo.poll_once()
        await repo.poll_once()
        shutil.rmtree(tmp_path / "m")
        with pytest.raises(NotFoundError, match="not in the repository"):
            await repo.load("m")
        assert served(manager) == {"m": [1]}  # removal is left to polling (after its grace) or an unload
        assert ("unload", "m", 1) not in events.log

    run(manager, scenario)


def test_an_explicit_load_with_the_repository_unreadable_is_503_and_changes_nothing(tmp_path: Path) -> None:
    root = tmp_path / "repo"
    repo, manager = live(root)
    write(root, "m", 1)

    async def scenario() -> None:
        await repo.poll_once()
        await repo.poll_once()
        await repo.unload("m")
        root.rename(tmp_path / "elsewhere")  # an unmounted volume
        with pytest.raises(UnavailableError, match="not readable"):
            await repo.load("m")
        assert "m" in repo.held  # still held: a load that did nothing lifts nothing
        (tmp_path / "elsewhere").rename(root)
        write(root, "other", 1)
        await repo.poll_once()
        await repo.poll_once()
        assert served(manager) == {"other": [1]}

    run(manager, scenario)


def test_load_and_unload_wait_for_the_start_up_load(tmp_path: Path, events: Events) -> None:
    repo, manager = live(tmp_path)
    write(tmp_path, "m", 1)
    manager.loaded = False

    async def scenario() -> None:
        with pytest.raises(UnavailableError, match="still loading"):
            await repo.load("m")
        with pytest.raises(UnavailableError, match="still loading"):
            await repo.unload("m")
        assert events.log == []

    run(manager, scenario)


def test_a_poll_after_a_racing_scan_serves_what_was_found(tmp_path: Path) -> None:
    repo, manager = live(tmp_path)
    write(tmp_path, "m", 1)

    async def scenario() -> None:
        await repo.poll_once()
        await repo.poll_once()
        assert served(manager) == {"m": [1]}
        await repo.load("m")

    run(manager, scenario)


def test_an_unload_drains_its_queue_for_a_bounded_time_then_fails_what_is_left() -> None:
    def slow(items: list[int]) -> list[int]:
        time.sleep(0.2)
        return items

    async def scenario() -> None:
        batcher: Batcher[int, int] = Batcher(slow, max_batch_size=1, max_delay_s=0, max_queue_size=16)
        batcher.start()
        queued = [asyncio.create_task(batcher.submit(i, time.monotonic() + 30)) for i in range(10)]
        await asyncio.sleep(0.05)
        t0 = time.monotonic()
        await batcher.close(drain=True, timeout=0.3)
        assert time.monotonic() - t0 < 1.0  # not the 2 s of the whole queue
        results = await asyncio.gather(*queued, return_exceptions=True)
        assert 0 in results
        assert any(isinstance(r, BatcherClosedError) for r in results)

    asyncio.run(scenario())


def test_draining_stops_polling_and_loads(tmp_path: Path) -> None:
    """``AppContext.drain`` (what SIGTERM starts) stops the poller: no new build holds up the exit."""
    repo, manager = live(tmp_path)
    write(tmp_path, "m", 1)

    async def scenario() -> None:
        ctx = AppContext(
            settings=manager.settings,
            metrics=Metrics(),
            models=manager,
            decode_pool=None,  # type: ignore[arg-type]
            repository=repo,
            pipeline=None,  # type: ignore[arg-type]
            bodies=None,  # type: ignore[arg-type]
            budget=None,  # type: ignore[arg-type]
        )
        poller = asyncio.create_task(repo.poll_forever(0.01))
        while served(manager) != {"m": [1]}:
            await asyncio.sleep(0.01)
        assert await ctx.drain(0)
        write(tmp_path, "m", 2)
        write(tmp_path, "other", 1)
        await asyncio.wait_for(poller, 1)  # it ends by itself
        await repo.poll_once()
        await repo.poll_once()
        assert served(manager) == {"m": [1]}
        with pytest.raises(UnavailableError, match="shutting down"):
            await repo.load("other")
        assert served(manager) == {"m": [1]}

    run(manager, scenario)


def test_a_poll_under_way_when_draining_begins_loads_nothing_more(tmp_path: Path) -> None:
    repo, manager = live(tmp_path)
    write(tmp_path, "a", 1)
    write(tmp_path, "b", 1)
    load_version = manager.load_version

    async def load_then_drain(name: str, version: int, path: Path) -> ModelVersion:
        mv = await load_version(name, version, path)
        repo.stop()  # SIGTERM while the poll is busy with "a"
        return mv

    manager.load_version = load_then_drain  # type: ignore[method-assign]

    async def scenario() -> None:
        await repo.poll_once()
        await repo.poll_once()
        assert served(manager) == {"a": [1]}

    run(manager, scenario)
