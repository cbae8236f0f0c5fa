"""What the benchmark runs print: latency percentiles and the two-column tables of the single-figure runs
(``--overload``, ``--decode-memory``)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def percentile_ms(seconds: Sequence[float], q: float) -> float:
    """The ``q``-th percentile of durations in seconds, in milliseconds (NaN when there are none)."""
    return float(np.percentile(np.asarray(seconds), q)) * 1000 if len(seconds) else float("nan")


def key_value_table(rows: Sequence[tuple[str, str]]) -> str:
    """A Markdown table of figure names and their values, without a header row's words."""
    return "\n".join(["| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)])
