"""One run of ``deepvit predict``: the inputs, what the output already holds, the Ray Data pipeline over the
rest, and the tally that decides the exit code.

The pipeline: ``read_binary_files`` (raw bytes and their paths, so that the contract's own decode and crop
run: Ray's ``read_images`` decodes and resizes its own way, and fails its whole read task on one corrupt
file) → ``map_batches`` of :class:`~.classifier.Classifier` on an actor pool (one session per actor, as many
actors as the cluster has cores for, each with its share of threads) → ``write_parquet``. Reading and
writing are I/O and are given no CPU of their own, or they would wait for the actors that hold every core.

Local by default (``ray.init`` with this machine's cores, no dashboard, no usage statistics); ``address``
(or ``RAY_ADDRESS``, which a Ray job's entrypoint is given) joins an existing cluster, whose nodes then read
the inputs and write the output themselves: SRC and ``--output`` must be reachable from every node (a bucket,
or a shared file system).
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import PurePosixPath
from typing import Any

from deepvit.artifact import ArtifactError, ArtifactMetadata
from deepvit.artifact.session import metadata_of, open_session

from .classifier import Classifier, ClassifierSpec
from .engine import AUTO, allowed
from .inputs import Inputs, filesystem_of, resolve
from .output import Output
from .rows import ModelIdentity, table

DEFAULT_MAX_FILE_BYTES = 64 * 2**20


@dataclass(frozen=True)
class PredictConfig:
    src: str
    artifact: str
    output: str
    top_k: int = 5
    batch_size: int = 8  # on a CPU the most efficient batch is small (bench/results: ORT per image, by batch)
    rows_per_file: int = 1000
    address: str | None = None
    actors: int | None = None  # default: the cluster's CPUs / threads_per_actor
    threads_per_actor: int = 1
    engine: str = "auto"  # or an engine's name (deepvit.artifact.engines); auto: measured on each actor's host
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES
    progress: bool = True


@dataclass
class Summary:
    """What a run did, for the closing lines (and ``--json``)."""

    inputs: int
    done_before: int  # inputs whose rows an earlier run had written
    written: int = 0  # rows this run wrote
    errors: int = 0  # rows with an error (all runs)
    engines: dict[str, int] = field(default_factory=dict)  # rows by the engine that computed them (all runs)
    missing: list[str] = field(default_factory=list)  # inputs without a row
    duplicated: list[str] = field(default_factory=list)  # inputs with more than one
    deleted: list[str] = field(default_factory=list)  # files a killed run left half written
    skipped: int = 0  # files of the folder not named as images
    seconds: float = 0.0  # the whole run
    startup_s: float = 0.0  # Ray's start (or connection)
    predict_s: float = 0.0  # the pipeline, once Ray was up
    cluster: str = ""
    failure: str = ""  # why the pipeline stopped, when it did

    @property
    def complete(self) -> bool:
        return not self.missing and not self.duplicated and not self.failure

    def images_per_s(self) -> float:
        return self.written / self.seconds if self.seconds else 0.0

    def images_per_s_started(self) -> float:
        return self.written / self.predict_s if self.predict_s else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "inputs": self.inputs,
            "done_before": self.done_before,
            "written": self.written,
            "errors": self.errors,
            "engines": self.engines,
            "missing": len(self.missing),
            "duplicated": len(self.duplicated),
            "deleted_partial_files": len(self.deleted),
            "skipped_not_images": self.skipped,
            "seconds": round(self.seconds, 3),
            "startup_seconds": round(self.startup_s, 3),
            "predict_seconds": round(self.predict_s, 3),
            "images_per_s": round(self.images_per_s(), 2),
            "images_per_s_once_started": round(self.images_per_s_started(), 2),
            "cluster": self.cluster,
            "complete": self.complete,
            "failure": self.failure or None,
        }


@dataclass(frozen=True)
class Artifact:
    data: bytes
    model: ModelIdentity
    meta: ArtifactMetadata


def load_artifact(location: str) -> Artifact:
    """The artifact's bytes (a local path or a URI), its digest and identity; an ArtifactError when it is
    not one ``deepvit export`` made."""
    fs, path, _ = filesystem_of(location)
    try:
        with fs.open_input_stream(path) as f:
            data = f.read()
    except (FileNotFoundError, IsADirectoryError, OSError) as exc:
        raise ArtifactError(f"--artifact {location} cannot be read: {str(exc).splitlines()[0]}") from None
    meta = metadata_of(open_session(data, optimize=False), location)
    parts = PurePosixPath(path).parts
    # In a model repository (<name>/<version>/model.onnx) the served name and version are the folders'.
    in_repository = len(parts) >= 3 and parts[-2].isdigit()
    name, version = (parts[-3], int(parts[-2])) if in_repository else (meta.name, None)
    return Artifact(data, ModelIdentity(name, version, hashlib.sha256(data).hexdigest()), meta)


def check_engine(cfg: PredictConfig, artifact: Artifact) -> None:
    """An engine named for a local run that this host or the artifact's gate refuses: an ArtifactError now,
    before Ray starts. (On a cluster the actors' hosts decide, and refuse it there.)"""
    if cfg.engine != AUTO and not (cfg.address or os.environ.get("RAY_ADDRESS")):
        allowed(artifact.meta, cfg.engine)


def run(cfg: PredictConfig, artifact: Artifact, log: Callable[[str], None]) -> Summary:
    started = time.perf_counter()
    run_id = f"{datetime.now(UTC):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:8]}"  # names this run's files
    inputs = resolve(cfg.src, cfg.max_file_bytes)
    out = Output(cfg.output)
    resumed = out.claim({"artifact_sha256": artifact.model.sha256, "top_k": cfg.top_k, "source": cfg.src})
    before = out.tally(delete_unreadable=True)
    earlier = out.files()
    for path in before.deleted:
        log(f"deleted {path}: written in part by a run that did not finish; its inputs are done again")
    todo = [p for p in inputs.sizes if inputs.display(p) not in before.rows]
    refused = {p: why for p, why in inputs.refused.items() if inputs.display(p) not in before.rows}
    done_before = len(inputs) - len(todo) - len(refused)
    if resumed:
        log(f"resuming {out.location}: {done_before} of {len(inputs)} inputs done, {len(todo) + len(refused)} to do")
    summary = Summary(len(inputs), done_before, deleted=before.deleted, skipped=inputs.skipped)
    if refused:
        rows = table([inputs.display(p) for p in refused], list(refused.values()), artifact.model)
        out.write(rows, f"{run_id}-refused.parquet")
    if todo:
        try:
            _pipeline(cfg, artifact, inputs, todo, out, run_id, summary, log)
        except Exception as exc:  # the cluster's errors (a lost node, an actor that could not start) end the run
            summary.failure = _reason(exc)
    for path in out.settle(earlier, run_id):
        log(f"deleted {path}: written by a killed run after this one began; its inputs were done again")
    after = out.tally(delete_unreadable=True)  # a write the failure cut short: its inputs are missing
    summary.deleted += after.deleted
    wanted = [inputs.display(p) for p in (*inputs.sizes, *inputs.refused)]
    summary.missing = [p for p in wanted if after.rows[p] == 0]
    summary.duplicated = [p for p in wanted if after.rows[p] > 1]
    summary.written = sum(after.rows.values()) - sum(before.rows.values())
    summary.errors = after.errors
    summary.engines = dict(after.engines.most_common())
    summary.seconds = time.perf_counter() - started
    return summary


def _pipeline(
    cfg: PredictConfig,
    artifact: Artifact,
    inputs: Inputs,
    todo: list[str],
    out: Output,
    run_id: str,
    summary: Summary,
    log: Callable[[str], None],
) -> None:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # before ray is imported: it reads it then
    import ray
    import ray.data

    t0 = time.perf_counter()
    address = cfg.address or os.environ.get("RAY_ADDRESS")  # set for the entrypoint of a Ray job
    if address:
        ray.init(address=address, logging_level=logging.WARNING)
    else:
        # "local": a cluster of its own, even where a `ray start` one runs on this machine (ray.init would join it).
        ray.init(address="local", num_cpus=os.cpu_count() or 1, include_dashboard=False, logging_level=logging.WARNING)
    try:
        summary.startup_s = time.perf_counter() - t0
        cpus = int(ray.cluster_resources().get("CPU", 1))  # type: ignore[no-untyped-call]
        nodes = len([n for n in ray.nodes() if n.get("Alive")])  # type: ignore[no-untyped-call]
        actors = cfg.actors or max(1, cpus // cfg.threads_per_actor)
        summary.cluster = (
            f"{nodes} node{'s' if nodes != 1 else ''}, {cpus} CPUs: {actors} actor{'s' if actors != 1 else ''} "
            f"x {cfg.threads_per_actor} thread{'s' if cfg.threads_per_actor != 1 else ''}"
        )
        how = "the fastest engine on each actor's host" if cfg.engine == AUTO else f"engine {cfg.engine}"
        log(f"{len(todo)} files to classify on {summary.cluster}, batches of {cfg.batch_size}, {how}")
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = cfg.progress
        # In the object store once, rather than in every actor's constructor arguments.
        model = ray.put(artifact.data)
        spec = ClassifierSpec(
            model,
            artifact.meta,
            artifact.model,
            cfg.top_k,
            cfg.threads_per_actor,
            engine=cfg.engine,
            batch_size=cfg.batch_size,
            scheme=inputs.scheme,
        )
        t1 = time.perf_counter()
        # Reading and writing take no CPU slot, so their tasks are bounded apart: a process each costs a
        # Python start-up, and a reader keeps some 8 cores busy (a file read is far cheaper than its inference).
        io_tasks = max(1, math.ceil(cpus / 8))
        # Blocks of a few batches: they stream through the actors evenly, and a kill loses little.
        blocks = max(1, math.ceil(len(todo) / (4 * cfg.batch_size)))
        ds = ray.data.read_binary_files(
            todo,
            filesystem=inputs.filesystem,
            include_paths=True,
            num_cpus=0,
            concurrency=io_tasks,
            override_num_blocks=blocks,
        )
        ds = ds.map_batches(
            Classifier,
            fn_constructor_args=(spec,),
            batch_size=cfg.batch_size,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=actors),
            num_cpus=cfg.threads_per_actor,
        )
        ds.write_parquet(
            out.path,
            filesystem=out.filesystem,
            min_rows_per_file=cfg.rows_per_file,
            filename_provider=_run_files(run_id),
            ray_remote_args={"num_cpus": 0},
            concurrency=io_tasks,
        )
        summary.predict_s = time.perf_counter() - t1
    finally:
        ray.shutdown()


def _reason(exc: BaseException) -> str:
    """An error of the pipeline in one line: a task's error is the one its task raised (Ray's ``cause``)."""
    cause = getattr(exc, "cause", None)
    exc = cause if isinstance(cause, BaseException) else exc
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return f"{type(exc).__name__}: {lines[0][:500]}" if lines else type(exc).__name__


def _run_files(run_id: str) -> Any:
    """Ray Data's file names for this run: ``<run>-<write>-<task>.parquet`` (Ray Data wants its write's id in
    them)."""
    from ray.data.datasource import FilenameProvider

    class RunFiles(FilenameProvider):
        def get_filename_for_task(self, write_uuid: str, task_index: int) -> str:
            return f"{run_id}-{write_uuid}-{task_index:06d}.parquet"

        def get_filename_for_block(self, block: Any, write_uuid: str, task_index: int, block_index: int) -> str:
            return f"{run_id}-{write_uuid}-{task_index:06d}-{block_index:06d}.parquet"

    return RunFiles()
