"""The engine an actor computes with: the one the service would choose on the actor's host.

The candidates are the service's (:func:`deepvit.artifact.engines.candidates`: what the host offers and the
artifact's gates allow). With ``--engine auto`` each actor measures them where it runs, as the service's
warm-up does: a session per candidate with the actor's threads, a batch of the job's size run once to
allocate, then timed; the fewest seconds per image computes. A named engine is used as it is, and is an
error where the host or the gate refuses it (no silent fallback: a job's rows say what computed them).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from deepvit.artifact import ArtifactError, ArtifactMetadata
from deepvit.artifact.engines import CPU_ENGINE, ENGINES, Candidates, Engine, candidates, host_engines
from deepvit.artifact.session import open_session

AUTO = "auto"
CHOICES = (AUTO, *ENGINES)
TIMED_RUNS = 3  # the best of three: a neighbour's burst inflates one run, not three


@dataclass(frozen=True)
class Chosen:
    """An actor's session, its engine, and what the others measured (images/s by engine)."""

    session: Any
    engine: Engine
    images_per_s: dict[str, float] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)


def engine_session(model: bytes, engine: Engine, threads: int) -> Any:
    """A session of ``engine`` over ``threads`` cores, its pool threads not spinning between batches."""
    plugin = None if engine.provider == CPU_ENGINE.provider else engine
    return open_session(model, intra_op_threads=threads, inter_op_threads=1, spinning=False, engine=plugin)


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
    """The session to compute with: the one candidate, or the fastest at ``batch_size`` images a call."""
    found = allowed(meta, wanted, found)
    if len(found.engines) == 1:
        engine = found.engines[0]
        return Chosen(open_engine(model, engine, threads), engine, {}, found.refused)
    crop = meta.preprocess.crop_size
    batch = np.random.default_rng(batch_size).integers(0, 256, (batch_size, crop, crop, 3), dtype=np.uint8)
    sessions, rates = {}, {}
    for engine in found.engines:
        sessions[engine.name] = open_engine(model, engine, threads)
        rates[engine.name] = 1.0 / seconds_per_image(sessions[engine.name], batch, clock)
    best = max(rates, key=lambda name: rates[name])
    return Chosen(sessions[best], ENGINES[best], rates, found.refused)
