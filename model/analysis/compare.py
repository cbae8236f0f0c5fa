"""Several ``deepvit analyze`` reports side by side: one PNG and one Markdown table (what the README shows).

    python -m deepvit.model.analysis.compare --output DIR [--name NAME] LABEL=REPORT.json [LABEL=REPORT.json ...]

writes ``DIR/NAME.png`` and ``DIR/NAME.md`` and prints the table.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..atomic import write_text_atomic
from .report import ReportError, plot_reports, read_report


def markdown(reports: Sequence[tuple[str, dict[str, Any]]]) -> str:
    """Rows: each block pair's M(p,p+1), then the count of similar blocks; columns: the applied maps of each
    report and, for reports with Re-attention, the softmax maps before the mixing too."""
    if len({r["blocks"] for _, r in reports}) != 1:
        raise ReportError("the reports compared must have the same number of blocks")
    columns: list[tuple[str, list[float], int]] = []
    for name, r in reports:
        applied = "applied" if r["premixing"] is not None else "softmax = applied"
        columns.append((f"{name} ({applied})", r["similarity_next"], r["similar_blocks"]))
        if r["premixing"] is not None:
            p = r["premixing"]
            columns.append((f"{name} (softmax, before mixing)", p["similarity_next"], p["similar_blocks"]))
    blocks = reports[0][1]["blocks"]
    kinds = [
        "/".join("R" if p in r["reattention_blocks"] else "M" for _, r in reports) for p in range(blocks)
    ]  # each report's attention in block p: M(HSA) or R(e-attention)
    lines = [
        "| blocks p → p+1 | " + " | ".join(c[0] for c in columns) + " |",
        "| --- | " + " | ".join("---:" for _ in columns) + " |",
    ]
    for p in range(blocks - 1):
        pair = f"{p} → {p + 1} ({kinds[p]} → {kinds[p + 1]})"
        lines.append(f"| {pair} | " + " | ".join(f"{c[1][p]:.3f}" for c in columns) + " |")
    thresholds = {r["threshold"] for _, r in reports}
    t = f"{next(iter(thresholds)):g}" if len(thresholds) == 1 else "each report's threshold"
    lines.append(f"| similar blocks (M > {t}) | " + " | ".join(f"{c[2]} of {blocks - 1}" for c in columns) + " |")
    images = ", ".join(f"{name}: {r.get('images', '?')}" for name, r in reports)
    lines.append("")
    lines.append(f"M/R: multi-head self-attention or Re-attention in that block of each model; images: {images}.")
    epochs = [(name, r.get("model", {}).get("epoch")) for name, r in reports]
    if all(e is not None for _, e in epochs):
        lines.append("Weights after training epoch " + ", ".join(f"{name}: {e}" for name, e in epochs) + " (0-based).")
    return "\n".join(lines) + "\n"


def _labelled(spec: str) -> tuple[str, Path]:
    label, sep, path = spec.partition("=")
    if not sep or not label or not path:
        raise argparse.ArgumentTypeError(f"expected LABEL=REPORT.json, not {spec!r}")
    return label, Path(path)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m deepvit.model.analysis.compare", description=__doc__.splitlines()[0])
    p.add_argument("reports", nargs="+", type=_labelled, metavar="LABEL=REPORT.json")
    p.add_argument("--output", type=Path, required=True, metavar="DIR")
    p.add_argument("--name", default="comparison", help="file name of the PNG and the table (default comparison)")
    args = p.parse_args(argv)
    try:
        reports = [(label, read_report(path)) for label, path in args.reports]
        text = markdown(reports)
    except ReportError as exc:
        print(f"compare: error: {exc}", file=sys.stderr)
        return 2
    out: Path = args.output
    write_text_atomic(out / f"{args.name}.md", text)
    png = plot_reports(reports, out / f"{args.name}.png")
    print(text, end="")
    print(f"compare: wrote {out / (args.name + '.md')}" + (f" and {png}" if png else ""), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
