"""The engine an actor computes with: the one the service would choose on the actor's host.

The candidates are the service's (:func:`deepvit.artifact.engines.candidates`: what the host offers and the
artifact's gates allow). With ``--engine auto`` each actor measures them where it runs, as the service's
warm-up does: a session per candidate with the actor's threads, each batch size up to the job's run once to
allocate, then timed; the fewest seconds per image computes, at the smallest size within 5% of its best (on
a CPU a larger batch is not always cheaper per image: attention's matrices outgrow the caches). A named
engine is measured for its size alone, and is an error where the host or the gate refuses it (no silent
fallback: a job's rows say what computed them).
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from deepvit.artifact import ArtifactError, ArtifactMetadata
from deepvit.artifact.batching import Warmup, warmup_batch_sizes
from deepvit.artifact.engines import ENGINES, Candidates, Engine, candidates, host_engines
from deepvit.artifact.session import open_session

AUTO = "auto"
CHOICES = (AUTO, *ENGINES)
TIMED_RUNS = 2  # the best of two: a neighbour's burst inflates one run, not both; each run costs the job time


@dataclass(frozen=True)
class Chosen:
    """An actor's session, its engine, the number of images of its calls, and what each candidate measured
    (images/s at its best size)."""

    session: Any
    engine: Engine
    batch: int
    images_per_s: dict[str, float] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)

    def describe(self) -> str:
        measured = ", ".join(f"{name} {rate:.1f}" for name, rate in self.images_per_s.items())
        return (
            f"engine {self.engine.name} on {socket.gethostname()}, calls of {self.batch} image"
            f"{'s' if self.batch != 1 else ''} (images/s measured at each engine's best size: {measured})"
        )


def engine_session(model: bytes, engine: Engine, threads: int) -> Any:
    """A session of ``engine`` over ``threads`` cores, its pool threads not spinning between batches."""
    return open_session(model, intra_op_threads=threads, inter_op_threads=1, spinning=False, engine=engine)


def allowed(meta: ArtifactMetadata, wanted: str, found: Candidates | None = None) -> Candidates:
    """The candidates for ``wanted`` (``auto``, or one engine by name); an ArtifactError naming why when the
    engine named cannot compute this artifact here."""
    found = found if found is not None else candidates(meta, host_engines())
    if wanted == AUTO:
        return found
    engine = ENGINES[wanted]
    if engine not in found.engines:
        why = found.refused.get(engine.name, "not offered here")
        raise ArtifactError(f"--engine {engine.name} cannot compute this artifact here: {why}")
    return Candidates((engine,), found.refused)


def seconds_per_image(session: Any, batch: np.ndarray, clock: Callable[[], float] = time.perf_counter) -> float:
    """The best of :data:`TIMED_RUNS` runs of ``batch`` after one untimed run, per image."""
    feed = {session.get_inputs()[0].name: batch}
    session.run(None, feed)
    best = float("inf")
    for _ in range(TIMED_RUNS):
        t0 = clock()
        session.run(None, feed)
        best = min(best, clock() - t0)
    return best / len(batch)


def choose(
    model: bytes,
    meta: ArtifactMetadata,
    wanted: str,
    threads: int,
    batch_size: int,
    *,
    found: Candidates | None = None,
    open_engine: Callable[[bytes, Engine, int], Any] = engine_session,
    clock: Callable[[], float] = time.perf_counter,
) -> Chosen:
    """The session to compute with and the size of its calls: each candidate warmed at each size up to the
    job's ``batch_size`` (the rows an actor is handed at a time); the engine with the fewest seconds per
    image, at the size the service's warm-up would keep (:meth:`Warmup.best_batch_size`: the smallest within
    5% of its best)."""
    found = allowed(meta, wanted, found)
    crop = meta.preprocess.crop_size
    pixels = np.random.default_rng(batch_size).integers(0, 256, (batch_size, crop, crop, 3), dtype=np.uint8)
    sessions: dict[str, Any] = {}
    warmups: dict[str, Warmup] = {}
    for engine in found.engines:
        started = clock()
        session = sessions[engine.name] = open_engine(model, engine, threads)
        timings = {n: n * seconds_per_image(session, pixels[:n], clock) for n in warmup_batch_sizes(batch_size)}
        warmups[engine.name] = Warmup(clock() - started, timings)
    unbounded = float("inf")  # an actor's calls wait for no one: no latency budget bounds their size
    rates = {name: 1.0 / w.best_time_per_image(unbounded) for name, w in warmups.items()}
    best = max(rates, key=lambda name: rates[name])
    size = warmups[best].best_batch_size(unbounded)
    return Chosen(sessions[best], ENGINES[best], size, rates, found.refused)
