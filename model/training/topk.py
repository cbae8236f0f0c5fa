"""Top-1 / top-5 counting, and running a model over batches to count them (training's validation and
``deepvit evaluate --checkpoint`` alike)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class TopK:
    """Running counts; sums over shards and ranks add up exactly."""

    correct1: float = 0.0
    correct5: float = 0.0
    count: float = 0.0
    loss_sum: float = 0.0

    def add(self, logits: Tensor, targets: Tensor) -> Tensor:
        """Count one batch; returns the top-1 predictions."""
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices  # (B, k)
        hits = top.eq(targets[:, None])
        self.correct1 += float(hits[:, 0].sum())
        self.correct5 += float(hits.any(dim=1).sum())
        self.count += float(targets.numel())
        self.loss_sum += float(F.cross_entropy(logits.float(), targets, reduction="sum"))
        return top[:, 0]

    def as_list(self) -> list[float]:
        return [self.correct1, self.correct5, self.count, self.loss_sum]

    @classmethod
    def from_list(cls, v: list[float]) -> TopK:
        return cls(*v)

    @property
    def top1(self) -> float:
        return self.correct1 / self.count if self.count else 0.0

    @property
    def top5(self) -> float:
        return self.correct5 / self.count if self.count else 0.0

    @property
    def loss(self) -> float:
        return self.loss_sum / self.count if self.count else 0.0


@torch.no_grad()
def evaluate_model(
    model: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    device: torch.device,
    amp: bool = False,
    on_logits: Callable[[np.ndarray], None] | None = None,
) -> TopK:
    """Counts of ``model`` (eval mode) over ``batches``; ``on_logits`` gets each batch's float32 logits when
    given."""
    was_training = model.training
    model.eval()
    counts = TopK()
    try:
        for images, targets in batches:
            images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.float16, enabled=amp and device.type == "cuda"):
                logits = model(images)
            counts.add(logits.float(), targets)
            if on_logits is not None:
                on_logits(logits.float().cpu().numpy())
    finally:
        model.train(was_training)
    return counts
