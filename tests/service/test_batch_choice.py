"""Batch sizes chosen by measurement: the warm-up times each batch shape on the session that will serve, and
the batcher takes the most efficient one unless the operator fixed a size; the choice is reported."""

from __future__ import annotations

import asyncio
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from serving import metric_samples

from deepvit.artifact.batching import Warmup
from deepvit.service.config import Settings
from deepvit.service.metrics import Metrics
from deepvit.service.models.manager import ModelManager
from deepvit.service.runtime import ModelRuntime


def test_the_most_efficient_batch_within_the_budget_wins() -> None:
    cpu = Warmup(1.0, {1: 0.0116, 2: 0.0230, 4: 0.050, 8: 0.110, 16: 0.26, 32: 0.62})  # cost per image grows
    assert cpu.best_batch_size(budget_s=1.0) == 1
    gpu = Warmup(1.0, {1: 0.004, 8: 0.005, 32: 0.008, 64: 0.015, 128: 0.031})  # a GPU amortises
    assert gpu.best_batch_size(budget_s=1.0) == 64  # the lowest time per image
    assert gpu.best_batch_size(budget_s=0.006) == 8  # what fits the latency budget
    flat = Warmup(1.0, {1: 0.0100, 2: 0.0199, 4: 0.0398})  # within 5%: the smaller batch, less waiting
    assert flat.best_batch_size(budget_s=1.0) == 1
    assert Warmup(1.0, {4: 2.0, 8: 4.0}).best_batch_size(budget_s=0.1) == 4  # nothing fits: the smallest


@pytest.mark.parametrize("fixed", [None, 4])
def test_the_choice_is_applied_and_reported(exported_tiny_patch: Path, tmp_path: Path, fixed: int | None) -> None:
    (tmp_path / "tiny" / "1").mkdir(parents=True)
    shutil.copy(exported_tiny_patch, tmp_path / "tiny" / "1" / "model.onnx")
    extra = {} if fixed is None else {"max_batch_size": fixed}
    settings = Settings(model_repository=tmp_path, providers=["cpu"], warmup=True, **extra)
    metrics = Metrics()
    manager = ModelManager(settings, metrics)

    async def load() -> tuple[int, str, dict[int, float]]:
        mv = await manager.load_version("tiny", 1, tmp_path / "tiny" / "1" / "model.onnx")
        try:
            return mv.batcher.max_batch_size, mv.batch_size_chosen_by, mv.batch_s
        finally:
            await manager.close()

    size, chosen_by, timings = asyncio.run(load())
    assert sorted(timings) == ([1, 2, 4, 8, 16, 32] if fixed is None else [1, 2, 4])
    if fixed is None:
        assert chosen_by == "measurement"
        assert size == Warmup(0, timings).best_batch_size(settings.batch_budget_s)
    else:
        assert (size, chosen_by) == (4, "setting")
    assert metric_samples(metrics.render().decode(), "deepvit_max_batch_size") == {}  # removed at unload


def test_instances_share_one_queue_and_compute_at_once() -> None:
    from deepvit.service.batcher import Batcher

    running: list[int] = []
    most = 0
    lock = threading.Lock()

    def instance(k: int) -> Callable[[list[int]], list[tuple[int, int]]]:
        def predict(items: list[int]) -> list[tuple[int, int]]:
            nonlocal most
            with lock:
                running.append(k)
                most = max(most, len(running))
            time.sleep(0.1)
            with lock:
                running.remove(k)
            return [(k, i) for i in items]

        return predict

    async def run() -> list[tuple[int, int]]:
        b: Batcher[int, tuple[int, int]] = Batcher(
            [instance(0), instance(1)], max_batch_size=1, max_delay_s=0, max_queue_size=8
        )
        b.start()
        try:
            return await asyncio.gather(*(b.submit(i, time.monotonic() + 10) for i in range(4)))
        finally:
            await b.close()

    t0 = time.monotonic()
    results = asyncio.run(run())
    assert sorted(i for _, i in results) == [0, 1, 2, 3]
    assert {k for k, _ in results} == {0, 1}  # both instances served
    assert most == 2
    assert time.monotonic() - t0 < 0.35  # four batches of 0.1 s on two instances, not 0.4 s


def test_the_operator_sets_the_instance_count(exported_tiny_patch: Path, tmp_path: Path) -> None:
    (tmp_path / "tiny" / "1").mkdir(parents=True)
    shutil.copy(exported_tiny_patch, tmp_path / "tiny" / "1" / "model.onnx")
    settings = Settings(model_repository=tmp_path, providers=["cpu"], warmup=True, instances=2)
    manager = ModelManager(settings, Metrics())

    async def load() -> tuple[int, int, str]:
        mv = await manager.load_version("tiny", 1, tmp_path / "tiny" / "1" / "model.onnx")
        try:
            return mv.batcher.instances, len({id(rt.session) for rt in mv.runtimes}), mv.instances_chosen_by
        finally:
            await manager.close()

    assert asyncio.run(load()) == (2, 2, "setting")


def test_a_lone_batch_runs_on_the_solo_session_holding_every_instance() -> None:
    """At low load a batch that finds every instance idle and nothing behind it runs on the session over all
    the cores; under load the instances take the batches, and the solo session never computes beside them."""
    from deepvit.service.batcher import Batcher

    running: set[str] = set()
    beside_solo: list[set[str]] = []
    lock = threading.Lock()

    def session(name: str) -> Callable[[list[int]], list[tuple[str, int]]]:
        def predict(items: list[int]) -> list[tuple[str, int]]:
            with lock:
                if "solo" in running or (name == "solo" and running):
                    beside_solo.append({name, *running})
                running.add(name)
            time.sleep(0.05)
            with lock:
                running.discard(name)
            return [(name, i) for i in items]

        return predict

    async def run() -> tuple[list[tuple[str, int]], list[tuple[str, int]], int]:
        b: Batcher[int, tuple[str, int]] = Batcher(
            [session("instance-0"), session("instance-1")],
            max_batch_size=2,
            max_delay_s=0,
            max_queue_size=16,
            solo=session("solo"),
        )
        b.start()
        try:
            lone = [await b.submit(-1, time.monotonic() + 10, alone=True)]
            burst = await asyncio.gather(*(b.submit(i, time.monotonic() + 10, alone=True) for i in range(6)))
            # Not alone (the caller's pipeline holds other requests): the instances, though nothing is queued.
            busy = [await b.submit(-2, time.monotonic() + 10)]
            return lone + busy, list(burst), b.solo_batches
        finally:
            await b.close()

    lone, burst, solo_batches = asyncio.run(run())
    assert lone[0] == ("solo", -1)
    assert lone[1][0].startswith("instance")
    assert sorted(i for _, i in burst) == list(range(6))
    assert {name for name, _ in burst[:4]} == {"instance-0", "instance-1"}  # under load: the instances
    assert solo_batches == 1 + sum(name == "solo" for name, _ in burst) // 2
    assert beside_solo == []


def test_measured_single_threaded_instances_keep_the_wide_session_for_lone_batches(
    exported_tiny_patch: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where one single-threaded session per core wins the measurement, the session over every core that lost
    it is kept as the solo session: a lone request runs on it."""
    path = tmp_path / "tiny" / "1" / "model.onnx"
    path.parent.mkdir(parents=True)
    shutil.copy(exported_tiny_patch, path)
    settings = Settings(model_repository=tmp_path, providers=["cpu"], warmup=True)
    manager = ModelManager(settings, Metrics())

    def single_wins(name: str, version: int, path: Path, *_: object) -> tuple[int, tuple[ModelRuntime, Warmup]]:
        single = manager._runtime_factory(path, settings.model_copy(update={"intra_op_threads": 1}))
        return 2, (single, Warmup(0.1, {1: 0.004, 2: 0.006, 4: 0.02}))  # batches of 2: the most efficient

    monkeypatch.setattr(manager, "_measure_instances", single_wins)

    async def load() -> tuple[int, bool, int, int, list[int]]:
        mv = await manager.load_version("tiny", 1, path)
        try:
            crop = mv.runtime.meta.preprocess.crop_size
            await mv.batcher.submit(np.zeros((crop, crop, 3), np.uint8), time.monotonic() + 10, alone=True)
            solo_apart = mv.solo is not None and all(mv.solo is not rt for rt in mv.runtimes)
            threads = [rt.session.get_session_options().intra_op_num_threads for rt in mv.runtimes]
            return mv.batcher.instances, solo_apart, mv.batcher.solo_batches, mv.batcher.max_batch_size, threads
        finally:
            await manager.close()

    # The batch size is the instances' own most efficient (2), not the wide session's.
    assert asyncio.run(load()) == (2, True, 1, 2, [1, 1])
