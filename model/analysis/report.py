"""What ``deepvit analyze`` leaves behind: ``report.json``, a PNG (the L×L similarity matrix as a heat map
and each block's similarity to the next) and a table for the terminal. The PNG and the side-by-side
comparison of several models (:mod:`.compare`) draw the same way."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..atomic import atomic_path, write_text_atomic

REPORT = "report.json"
PLOT = "attention_similarity.png"
# A report without these keys did not come from deepvit analyze (or from a version that wrote less).
REQUIRED = ("blocks", "similarity_next", "matrix", "similar_blocks", "threshold", "reattention_blocks", "premixing")


class ReportError(ValueError):
    """A report.json that cannot be read as one; the message says which file and why."""


def write_report(report: dict[str, Any], path: str | Path) -> Path:
    path = Path(path)
    write_text_atomic(path, json.dumps(report, indent=1) + "\n")
    return path


def read_report(path: str | Path) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ReportError(f"cannot read {path}: {exc}") from None
    missing = [k for k in REQUIRED if not isinstance(data, dict) or k not in data]
    if missing:
        raise ReportError(f"{path} is not a deepvit analyze report (missing {', '.join(missing)})")
    return dict(data)


def _kind(report: dict[str, Any], block: int) -> str:
    return "Re-attention" if block in report["reattention_blocks"] else "MHSA"


def table(report: dict[str, Any]) -> str:
    """One line per block: its attention, its similarity to the next block (applied maps and, where they
    differ, softmax maps before the mixing) and, in Re-attention blocks, applied vs its own softmax map."""
    premix = report["premixing"]
    t = report["threshold"]
    head = f"{'block':>5}  {'attention':<12}  {'M(p,p+1)':>8}"
    if premix is not None:
        head += f"  {'softmax M(p,p+1)':>16}  {'applied vs softmax':>18}"
    lines = [head, "-" * len(head)]
    for p in range(report["blocks"]):
        nxt = f"{report['similarity_next'][p]:8.3f}" if p < report["blocks"] - 1 else f"{'':>8}"
        line = f"{p:>5}  {_kind(report, p):<12}  {nxt}"
        if premix is not None:
            soft = f"{premix['similarity_next'][p]:16.3f}" if p < report["blocks"] - 1 else f"{'':>16}"
            own = ""
            if p in report["reattention_blocks"]:
                own = f"{premix['applied_vs_premixing'][report['reattention_blocks'].index(p)]:18.3f}"
            line += f"  {soft}  {own:>18}"
        lines.append(line.rstrip())
    pairs = report["blocks"] - 1
    summary = f"similar blocks (M(p,p+1) > {t:g}): {report['similar_blocks']} of {pairs}"
    if premix is not None:
        summary += f"; with the softmax maps before the mixing: {premix['similar_blocks']} of {pairs}"
    lines.append(summary + f"  ({report.get('images', '?')} images)")
    return "\n".join(lines)


def plot_reports(reports: Sequence[tuple[str, dict[str, Any]]], png: str | Path) -> Path | None:
    """Heat maps of each report's applied-map matrix, and one panel of every report's similarity to the
    next block (dashed: the softmax maps before the mixing). None (nothing written) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    # One heat map per set of maps (a model's applied maps; with Re-attention, its softmax maps before the
    # mixing too), then one panel of the curves.
    panels: list[tuple[str, dict[str, Any], list[list[float]]]] = []
    for name, r in reports:
        panels.append((f"{name}: applied maps", r, r["matrix"]))
        if r["premixing"] is not None:
            panels.append((f"{name}: softmax before mixing", r, r["premixing"]["matrix"]))
    fig, axes = plt.subplots(
        1, len(panels) + 1, figsize=(3.6 * len(panels) + 4.6, 3.8), squeeze=False, layout="constrained"
    )
    # Cosines of Re-attention maps can be negative (BatchNorm centres them); those of softmax maps cannot.
    low = min(0.0, *(min(min(row) for row in m) for _, _, m in panels))
    image = None
    for ax, (title, r, matrix) in zip(axes[0], panels, strict=False):
        image = ax.imshow(matrix, vmin=low, vmax=1.0, cmap="viridis")
        ax.set_title(title, fontsize="medium")
        ax.set(xlabel="block q", ylabel="block p")
        ticks = list(range(r["blocks"]))
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.set_yticks(ticks, [str(t) for t in ticks])
        for b in r["reattention_blocks"]:  # Re-attention blocks in red
            ax.get_xticklabels()[b].set_color("tab:red")
            ax.get_yticklabels()[b].set_color("tab:red")
    if image is not None:
        fig.colorbar(image, ax=list(axes[0][: len(panels)]), shrink=0.85, label="mean cosine M(p, q)")
    curve = axes[0][len(panels)]
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for k, (name, r) in enumerate(reports):
        colour = colours[k % len(colours)]
        xs = list(range(r["blocks"] - 1))
        curve.plot(xs, r["similarity_next"], marker="o", color=colour, label=name)
        if r["premixing"] is not None:
            curve.plot(
                xs, r["premixing"]["similarity_next"], marker="x", linestyle="--", color=colour,
                label=f"{name}, softmax before mixing",
            )  # fmt: skip
    pairs = max((r["blocks"] for _, r in reports), default=1) - 1
    curve.set_xticks(list(range(pairs)), [f"{p}→{p + 1}" for p in range(pairs)])
    threshold = reports[0][1]["threshold"] if reports else 0.9
    curve.axhline(threshold, color="grey", linestyle=":", label=f"threshold {threshold:g}")
    curve.set(title="similarity to the next block", xlabel="blocks p → p+1", ylabel="M(p, p+1)", ylim=(low, 1.02))
    curve.grid(alpha=0.3)
    curve.legend(fontsize="small", loc="best")
    png = Path(png)
    try:
        with atomic_path(png) as tmp:
            fig.savefig(tmp, dpi=100, format="png")
    finally:
        plt.close(fig)
    return png
