"""The engine an actor computes with, and the size of its calls: the service's candidates, each timed at
each size up to the job's batch where the actor runs (an injected clock decides here), the fastest per image
at the smallest size within 5% of its best; or the engine named, refused with its reason where it cannot
compute."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from deepvit.artifact import ArtifactError
from deepvit.artifact.engines import CPU_ENGINE, OPENVINO_BF16, OPENVINO_ENGINE, Candidates, Engine
from deepvit.artifact.session import read_metadata
from deepvit.predict.engine import TIMED_RUNS, choose, engine_session, seconds_per_image

HOST = Candidates((CPU_ENGINE, OPENVINO_ENGINE), {"openvino-bf16": "no BF16 on this CPU"})


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class FakeSession:
    """A session whose runs of n images last ``per_image[n] * n`` on the clock."""

    def __init__(self, clock: FakeClock, per_image: dict[int, float]) -> None:
        self.clock, self.per_image, self.sizes = clock, per_image, []

    def get_inputs(self) -> list[Any]:
        return [type("Input", (), {"name": "image"})()]

    def run(self, outputs: Any, feed: dict[str, np.ndarray]) -> None:
        n = len(feed["image"])
        self.sizes.append(n)
        self.clock.now += self.per_image[n] * n


def _choose(artifact: Path, wanted: str, per_image: dict[str, dict[int, float]], found: Candidates = HOST) -> Any:
    clock, opened = FakeClock(), {}

    def open_engine(model: bytes, engine: Engine, threads: int) -> FakeSession:
        opened[engine.name] = FakeSession(clock, per_image[engine.name])
        return opened[engine.name]

    chosen = choose(b"", read_metadata(artifact), wanted, 1, 8, found=found, open_engine=open_engine, clock=clock)
    return chosen, opened


def test_auto_keeps_the_fastest_engine_at_its_best_size(artifact: Path) -> None:
    per_image = {
        "cpu": {1: 0.025, 2: 0.031, 4: 0.029, 8: 0.030},  # attention outgrows the caches: one at a time is best
        "openvino": {1: 0.036, 2: 0.032, 4: 0.029, 8: 0.032},
    }
    chosen, opened = _choose(artifact, "auto", per_image)
    assert chosen.engine == CPU_ENGINE
    assert chosen.batch == 1
    assert chosen.session is opened["cpu"]
    assert chosen.images_per_s == pytest.approx({"cpu": 40.0, "openvino": 1 / 0.029})
    assert chosen.refused == {"openvino-bf16": "no BF16 on this CPU"}
    # Every size up to the job's batch: one run to allocate, then the timed ones.
    assert sorted(opened["openvino"].sizes) == sorted([n for n in (1, 2, 4, 8) for _ in range(1 + TIMED_RUNS)])


def test_the_smallest_size_within_five_percent_of_the_best_is_kept(artifact: Path) -> None:
    per_image = {"cpu": {1: 0.050, 2: 0.0295, 4: 0.0290, 8: 0.0285}, "openvino": {n: 1.0 for n in (1, 2, 4, 8)}}
    chosen, _ = _choose(artifact, "auto", per_image)
    assert (chosen.engine, chosen.batch) == (CPU_ENGINE, 2)  # 29.5 ms is within 5% of 28.5 ms


def test_a_single_candidate_is_timed_only_for_its_size(artifact: Path) -> None:
    only_cpu = Candidates((CPU_ENGINE,), {"openvino": "the plugin is not installed"})
    chosen, opened = _choose(artifact, "auto", {"cpu": {1: 0.04, 2: 0.02, 4: 0.03, 8: 0.03}}, found=only_cpu)
    assert (chosen.engine, chosen.batch) == (CPU_ENGINE, 2)
    assert list(opened) == ["cpu"]


def test_a_named_engine_is_used_as_it_is(artifact: Path) -> None:
    per_image = {"cpu": dict.fromkeys((1, 2, 4, 8), 0.01), "openvino": {1: 1.0, 2: 1.0, 4: 0.5, 8: 1.0}}
    chosen, opened = _choose(artifact, "openvino", per_image)
    assert (chosen.engine, chosen.batch) == (OPENVINO_ENGINE, 4)  # slower than cpu, but named
    assert list(opened) == ["openvino"]


def test_a_named_engine_that_cannot_compute_here_is_refused_with_why(artifact: Path) -> None:
    with pytest.raises(ArtifactError, match="--engine openvino-bf16 cannot compute this artifact here: no BF16"):
        choose(b"", read_metadata(artifact), OPENVINO_BF16.name, 1, 8, found=HOST)


def test_the_best_of_the_timed_runs_counts() -> None:
    clock = FakeClock()
    durations = iter([5.0, 0.4, 0.2, 0.3][: 1 + TIMED_RUNS])  # the untimed run, then the timed ones

    class Session(FakeSession):
        def run(self, outputs: Any, feed: dict[str, np.ndarray]) -> None:
            self.clock.now += next(durations)

    session = Session(clock, {})
    assert seconds_per_image(session, np.zeros((4, 2, 2, 3), np.uint8), clock) == pytest.approx(0.05)


@pytest.mark.parametrize("threads", [1, 2])
def test_a_cpu_session_uses_the_actors_threads(artifact: Path, threads: int) -> None:
    session = engine_session(artifact.read_bytes(), CPU_ENGINE, threads)
    assert session.get_providers() == ["CPUExecutionProvider"]
    assert session.get_session_options().intra_op_num_threads == threads


def test_an_openvino_session_is_openvinos(artifact: Path) -> None:
    session = engine_session(artifact.read_bytes(), OPENVINO_ENGINE, 1)
    assert session.get_providers()[0] == "OpenVINOExecutionProvider"
