"""The training history: one JSON object per epoch in ``log.jsonl``, and a PNG of the curves at the end."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..atomic import atomic_path, write_text_atomic


class History:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def records(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def append(self, record: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def truncate_from(self, epoch: int) -> None:
        """Forget epochs >= ``epoch`` (a resumed run re-does them), atomically."""
        kept = [r for r in self.records() if int(r["epoch"]) < epoch]
        write_text_atomic(self.path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept))

    def plot(self, png: str | Path) -> Path | None:
        """Loss and accuracy curves; returns None (and writes nothing) when matplotlib is missing."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return None
        rows = self.records()
        if not rows:
            return None
        epochs = [int(r["epoch"]) for r in rows]
        fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
        ax_loss.plot(epochs, [r["train_loss"] for r in rows], label="train")
        ax_loss.plot(epochs, [r["val_loss"] for r in rows], label="val")
        ax_loss.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
        ax_acc.plot(epochs, [100 * r["val_top1"] for r in rows], label="val top-1")
        ax_acc.plot(epochs, [100 * r["val_top5"] for r in rows], label="val top-5", alpha=0.6)
        if all("ema_val_top1" in r for r in rows):
            ax_acc.plot(epochs, [100 * r["ema_val_top1"] for r in rows], label="EMA val top-1", linestyle="--")
        ax_acc.set(xlabel="epoch", ylabel="%", title="accuracy", ylim=(0, 100))
        for ax in (ax_loss, ax_acc):
            ax.grid(alpha=0.3)
            ax.legend()
        fig.tight_layout()
        png = Path(png)
        try:
            with atomic_path(png) as tmp:
                fig.savefig(tmp, dpi=100, format="png")
        finally:
            plt.close(fig)
        return png
