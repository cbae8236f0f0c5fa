"""Recompute the running statistics of Re-attention's BatchNorm over heads before an evaluation.

Re-attention normalises the head-mixed attention maps with a BatchNorm2d over the H heads (paper, Eq. 3;
official ``var_norm``). Its running mean and variance are a momentum average over training batches of a
model whose weights kept moving, and mixup / cutmix / random erasing change the maps' statistics too, so
the official training code re-estimates them on training batches before validating. Here they are
re-estimated from scratch as an equal-weight average over ``max_batches`` batches (momentum ``None``), with
every other module in eval mode (no dropout, no drop path, the stem's BatchNorm untouched), on training
images through the evaluation transform: the statistics the evaluated and exported model will meet.
Under DDP each rank estimates on its own shard and the estimates are averaged, so all ranks agree.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from .distributed import Dist, average_


def reattention_norms(model: nn.Module) -> list[nn.BatchNorm2d]:
    """The ``attn.var_norm`` BatchNorms of the blocks that apply Re-attention (not the conv stem's)."""
    return [m for name, m in model.named_modules() if name.endswith("attn.var_norm") and isinstance(m, nn.BatchNorm2d)]


@torch.no_grad()
def recalibrate_reattention(
    model: nn.Module,
    batches: Iterable[Tensor | tuple[Tensor, ...] | list[Tensor]],
    max_batches: int,
    device: torch.device,
    dist: Dist | None = None,
) -> int:
    """Re-estimate every Re-attention BatchNorm's running statistics; returns the batches used.

    ``model`` must be the bare module, not a DistributedDataParallel wrapper (whose forward would
    broadcast rank 0's buffers over the statistics being estimated). Nothing else in the model changes.
    """
    norms = reattention_norms(model)
    if not norms or max_batches <= 0:
        return 0
    was_training = model.training
    momenta = [n.momentum for n in norms]
    before = [{k: v.clone() for k, v in n.state_dict().items()} for n in norms]
    model.eval()
    for n in norms:
        n.reset_running_stats()
        n.momentum = None  # cumulative average: every batch weighs the same
        n.train()
    used = 0
    try:
        for batch in batches:
            if used >= max_batches:
                break
            images = batch[0] if isinstance(batch, (tuple, list)) else batch
            model(images.to(device, non_blocking=True))
            used += 1
    finally:
        for n, m in zip(norms, momenta, strict=True):
            n.momentum = m
        model.train(was_training)
    if used == 0:  # an empty loader: keep the old statistics rather than the reset ones
        for n, sd in zip(norms, before, strict=True):
            n.load_state_dict(sd)
    if dist is not None:
        average_([t for n in norms for t in (n.running_mean, n.running_var) if t is not None], dist)
    return used
