"""The engine an actor computes with: the service's candidates, the fastest of them measured where the actor
runs (an injected clock decides here), or the one named, refused with its reason where it cannot compute."""

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


class FakeSession:
    """A session whose runs last ``seconds`` on the clock below."""

    def __init__(self, engine: Engine, clock: FakeClock, seconds: float) -> None:
        self.engine, self.clock, self.seconds, self.runs = engine, clock, seconds, 0

    def get_inputs(self) -> list[Any]:
        return [type("Input", (), {"name": "image"})()]

    def run(self, outputs: Any, feed: dict[str, np.ndarray]) -> None:
        self.runs += 1
        self.clock.now += self.seconds


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def opened() -> dict[str, FakeSession]:
    """The sessions a test's opener made, by engine."""
    return {}


def _opener(clock: FakeClock, seconds: dict[str, float], opened: dict[str, FakeSession]) -> Any:
    def open_engine(model: bytes, engine: Engine, threads: int) -> FakeSession:
        opened[engine.name] = FakeSession(engine, clock, seconds[engine.name])
        return opened[engine.name]

    return open_engine


def test_auto_keeps_the_fastest_engine_measured_at_the_jobs_batch(
    artifact: Path, opened: dict[str, FakeSession]
) -> None:
    clock = FakeClock()
    meta = read_metadata(artifact)
    seconds = {"cpu": 0.08, "openvino": 0.05}  # a batch of 8: 10 ms and 6.25 ms an image
    chosen = choose(b"", meta, "auto", 1, 8, found=HOST, open_engine=_opener(clock, seconds, opened), clock=clock)
    assert chosen.engine == OPENVINO_ENGINE
    assert chosen.session is opened["openvino"]
    assert chosen.images_per_s == pytest.approx({"cpu": 100.0, "openvino": 160.0})
    assert chosen.refused == {"openvino-bf16": "no BF16 on this CPU"}
    assert all(s.runs == 1 + TIMED_RUNS for s in opened.values())  # one to allocate, then timed


def test_a_single_candidate_is_used_without_measuring(artifact: Path, opened: dict[str, FakeSession]) -> None:
    clock = FakeClock()
    only_cpu = Candidates((CPU_ENGINE,), {"openvino": "the plugin is not installed"})
    opener = _opener(clock, {"cpu": 0.1}, opened)
    chosen = choose(b"", read_metadata(artifact), "auto", 1, 8, found=only_cpu, open_engine=opener, clock=clock)
    assert chosen.engine == CPU_ENGINE
    assert opened["cpu"].runs == 0
    assert chosen.images_per_s == {}


def test_a_named_engine_is_used_as_it_is(artifact: Path, opened: dict[str, FakeSession]) -> None:
    clock = FakeClock()
    opener = _opener(clock, {"cpu": 0.01, "openvino": 1.0}, opened)
    chosen = choose(b"", read_metadata(artifact), "openvino", 1, 8, found=HOST, open_engine=opener, clock=clock)
    assert chosen.engine == OPENVINO_ENGINE  # slower, but named
    assert list(opened) == ["openvino"]


def test_a_named_engine_that_cannot_compute_here_is_refused_with_why(artifact: Path) -> None:
    with pytest.raises(ArtifactError, match="--engine openvino-bf16 cannot compute this artifact here: no BF16"):
        choose(b"", read_metadata(artifact), OPENVINO_BF16.name, 1, 8, found=HOST)


def test_the_best_of_the_timed_runs_counts() -> None:
    clock = FakeClock()
    durations = iter([5.0, 0.4, 0.2, 0.3])  # the untimed run, then three timed ones

    class Session(FakeSession):
        def run(self, outputs: Any, feed: dict[str, np.ndarray]) -> None:
            self.clock.now += next(durations)

    session = Session(CPU_ENGINE, clock, 0.0)
    assert seconds_per_image(session, np.zeros((4, 2, 2, 3), np.uint8), clock) == pytest.approx(0.05)


@pytest.mark.parametrize("threads", [1, 2])
def test_a_cpu_session_uses_the_actors_threads(artifact: Path, threads: int) -> None:
    session = engine_session(artifact.read_bytes(), CPU_ENGINE, threads)
    assert session.get_providers() == ["CPUExecutionProvider"]
    assert session.get_session_options().intra_op_num_threads == threads


def test_an_openvino_session_is_openvinos(artifact: Path) -> None:
    session = engine_session(artifact.read_bytes(), OPENVINO_ENGINE, 1)
    assert session.get_providers()[0] == "OpenVINOExecutionProvider"
