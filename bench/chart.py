"""The benchmark's chart: throughput and p99 latency against concurrency for each server of one run, with the
machine's limit drawn across (matplotlib, from the train extra: a checkout's tooling, not the service's)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol


class Point(Protocol):
    layer: str
    setting: str
    images_per_s: float
    p99_ms: float | None


def draw(rows: Sequence[Point], limit_per_s: float, title: str, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, list[tuple[int, float, float]]] = {}
    for r in rows:
        if r.p99_ms is None or "concurrency" not in r.setting:
            continue
        c = int(r.setting.rsplit(" ", 1)[-1])
        series.setdefault(r.layer, []).append((c, r.images_per_s, r.p99_ms))
    fig, (ax_t, ax_p) = plt.subplots(1, 2, figsize=(11, 4.2))
    for layer, points in series.items():
        points.sort()
        cs = [p[0] for p in points]
        ax_t.plot(cs, [p[1] for p in points], marker="o", label=layer)
        ax_p.plot(cs, [p[2] for p in points], marker="o", label=layer)
    ax_t.axhline(limit_per_s, color="grey", linestyle="--", label="machine limit")
    for ax, what in ((ax_t, "images/s"), (ax_p, "p99 latency, ms")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrency (clients)")
        ax.set_ylabel(what)
        ax.grid(alpha=0.3)
    ax_p.set_yscale("log")
    ax_t.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
