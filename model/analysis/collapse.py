"""Attention collapse of a DeepViT on images: the paper's cross-block similarity, for the maps each block
applies and, in Re-attention blocks, for the softmax maps before the head mixing (what Re-attention changed).

The applied maps are :meth:`DeepViT.forward_with_attention`'s. The softmax maps of a Re-attention block are
the input of its head-mixing matrix Θ (``attn.reatten_matrix``, a 1×1 convolution over heads, then
BatchNorm and the scale; paper Eq. 3 and the official ``models/layers.py``), so a forward pre-hook on Θ reads
them without a change to the network: its forward, its exported graph and its state-dict keys stay the
official ones. In plain blocks the applied map is the softmax map.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..layers import Attention
from ..net import DeepViT
from .similarity import SimilarityAccumulator, similar_blocks, similarity_next


@dataclass(frozen=True)
class MapFigures:
    """The L×L mean similarity of one set of maps (one per block) and what follows from it."""

    matrix: np.ndarray  # (L, L) float64

    def similarity_next(self) -> list[float]:
        return similarity_next(self.matrix)

    def similar_blocks(self, threshold: float) -> int:
        return similar_blocks(self.similarity_next(), threshold)

    def to_dict(self, threshold: float) -> dict[str, Any]:
        return {
            "similarity_next": self.similarity_next(),
            "matrix": self.matrix.tolist(),
            "similar_blocks": self.similar_blocks(threshold),
        }


@dataclass(frozen=True)
class CollapseReport:
    blocks: int
    heads: int
    tokens: int
    images: int
    threshold: float
    reattention_blocks: tuple[int, ...]
    applied: MapFigures  # the maps each block applies to V (after Re-attention where it applies)
    # The same with each Re-attention block's softmax map before the mixing in place of its applied map;
    # None for a model without Re-attention, where the two are one.
    premixing: MapFigures | None
    # For each Re-attention block, in order: the mean cosine of its applied map with its own softmax map.
    applied_vs_premixing: tuple[float, ...]

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "blocks": self.blocks,
            "heads": self.heads,
            "tokens": self.tokens,
            "images": self.images,
            "threshold": self.threshold,
            "reattention_blocks": list(self.reattention_blocks),
        }
        out |= self.applied.to_dict(self.threshold)
        out["premixing"] = None
        if self.premixing is not None:
            out["premixing"] = self.premixing.to_dict(self.threshold) | {
                "applied_vs_premixing": list(self.applied_vs_premixing)
            }
        return out


def _attentions(model: DeepViT) -> list[Attention]:
    found = [m for blk in model.blocks for m in blk.children() if isinstance(m, Attention)]
    if len(found) != len(model.blocks):
        raise TypeError("every block must have one Attention")
    return found


@contextlib.contextmanager
def premixing_maps(model: DeepViT) -> Iterator[dict[int, Tensor]]:
    """While open, the softmax map (B, H, T, T) each Re-attention block fed its head-mixing matrix Θ in the
    latest forward pass, by block index."""
    seen: dict[int, Tensor] = {}
    handles = []

    def recorder(index: int) -> Callable[[nn.Module, tuple[Tensor, ...]], None]:
        def hook(_module: nn.Module, inputs: tuple[Tensor, ...]) -> None:
            seen[index] = inputs[0].detach()

        return hook

    for i, attn in enumerate(_attentions(model)):
        if attn.reattention:
            handles.append(attn.reatten_matrix.register_forward_pre_hook(recorder(i)))
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def measure_collapse(
    model: DeepViT,
    batches: Iterable[Tensor],
    threshold: float = 0.9,
    device: torch.device | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> CollapseReport:
    """Run ``model`` (in eval mode: dropout before Θ off, BatchNorm on its running statistics) over
    ``batches`` of preprocessed images (B, 3, S, S) and average the cross-block similarities over them.
    ``on_batch`` gets each batch's image count (a progress bar)."""
    cfg = model.cfg
    L = cfg.depth
    reattention = tuple(i for i, attn in enumerate(_attentions(model)) if attn.reattention)
    device = device or torch.device("cpu")
    was_training = model.training
    model.eval().to(device)
    # One accumulator over the L applied maps followed by the R softmax maps of the Re-attention blocks:
    # every figure of the report is a block of its (L + R)² matrix.
    acc = SimilarityAccumulator(L + len(reattention))
    try:
        with premixing_maps(model) as softmax:
            for images in batches:
                softmax.clear()  # a map left from the previous batch must not stand in for this one's
                _, applied = model.forward_with_attention(images.to(device))
                if missing := [i for i in reattention if i not in softmax]:
                    raise RuntimeError(f"Re-attention blocks {missing} did not run their head mixing Θ")
                acc.add([*applied, *(softmax[i] for i in reattention)])
                if on_batch is not None:
                    on_batch(int(images.shape[0]))
    finally:
        model.train(was_training)
    full = acc.mean()
    # Index, in the accumulator, of the map standing for each block: its applied map, or its softmax map.
    premix_index = list(range(L))
    for j, i in enumerate(reattention):
        premix_index[i] = L + j
    return CollapseReport(
        blocks=L,
        heads=cfg.num_heads,
        tokens=cfg.num_patches + 1,
        images=acc.images,
        threshold=threshold,
        reattention_blocks=reattention,
        applied=MapFigures(full[:L, :L].copy()),
        premixing=MapFigures(full[np.ix_(premix_index, premix_index)]) if reattention else None,
        applied_vs_premixing=tuple(float(full[i, L + j]) for j, i in enumerate(reattention)),
    )
