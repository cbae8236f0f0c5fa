"""What the attention output costs: the same model exported without and with ``--explain``, timed side by
side in one run (interleaved rounds, single-threaded sessions, the median per image), asking the second for
the logits alone and for both outputs. The question it answers: is an artifact with the attention output
slower for callers who want the logits only?"""

from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from deepvit.artifact import ATTENTION_NAME, OUTPUT_NAME
from deepvit.artifact.session import metadata_of, open_session


@dataclass(frozen=True)
class CostRow:
    batch: int
    case: str
    ms_per_image: float
    ratio: float  # to the plain artifact at the same batch size


def measure(plain: Path, explain: Path, batch_sizes: Sequence[int], rounds: int) -> list[CostRow]:
    sessions = [open_session(plain, intra_op_threads=1), open_session(explain, intra_op_threads=1)]
    metas = [metadata_of(s, str(p)) for s, p in zip(sessions, (plain, explain), strict=True)]
    if metas[0].attention is not None or metas[1].attention is None:
        raise SystemExit(f"deepvit bench: {plain} must be exported without --explain and {explain} with it")
    if metas[0].config != metas[1].config:
        raise SystemExit("deepvit bench: the two artifacts must be the same model (their configs differ)")
    crop = metas[0].preprocess.crop_size
    rows: list[CostRow] = []
    for b in batch_sizes:
        x = {"image": np.random.default_rng(b).integers(0, 256, (b, crop, crop, 3), dtype=np.uint8)}
        cases: dict[str, Callable[[], object]] = {
            "without --explain: logits": functools.partial(sessions[0].run, [OUTPUT_NAME], x),
            "with --explain: logits only": functools.partial(sessions[1].run, [OUTPUT_NAME], x),
            "with --explain: logits and attention": functools.partial(
                sessions[1].run, [OUTPUT_NAME, ATTENTION_NAME], x
            ),
        }
        times: dict[str, list[float]] = {k: [] for k in cases}
        for fn in cases.values():
            fn()  # not timed: first-call allocations
        for _ in range(rounds):  # interleaved, so that the machine's noise falls on every case alike
            for name, fn in cases.items():
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
        base = statistics.median(times["without --explain: logits"])
        for name, ts in times.items():
            rows.append(CostRow(b, name, 1e3 * statistics.median(ts) / b, statistics.median(ts) / base))
    return rows


def render(rows: list[CostRow]) -> str:
    lines = [
        "| batch | artifact and outputs asked for | ms per image | vs without |",
        "| ---: | --- | ---: | ---: |",
    ]
    lines += [f"| {r.batch} | {r.case} | {r.ms_per_image:.2f} | {r.ratio:.3f} |" for r in rows]
    return "\n".join(lines)
