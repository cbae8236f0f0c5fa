"""Batch sizes chosen by measurement: the warm-up times each batch shape on the session that will serve, and
the batcher takes the most efficient one unless the operator fixed a size; the choice is reported."""

from __future__ import annotations

import asyncio
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from serving import metric_samples

from deepvit.service.config import Settings
from deepvit.service.metrics import Metrics
from deepvit.service.models.manager import ModelManager
from deepvit.service.runtime import Warmup


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
        assert size == Warmup(0, timings).best_batch_size(settings.request_timeout_s / 8)
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
