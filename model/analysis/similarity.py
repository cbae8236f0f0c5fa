"""The paper's cross-block similarity of attention maps (Zhou et al. 2021, Sec. 3.2, Eq. 2).

For blocks p and q, head h and token t::

    M^{p,q}_{h,t} = cos(A^p[h, :, t], A^q[h, :, t])

column t of a block's (T×T) map being how token t contributes to every output token. The paper averages it
over heads and tokens, and over images; "attention collapse" is M^{p,p+1} near 1 in the deep blocks: adjacent
blocks mix the tokens alike, so stacking more of them adds little.

Pure tensor code: no model, no files. Each map's columns are scaled to unit length once, after which one
matrix product over every column of every head of every image gives the sum of all the cosines of a batch,
for every pair of maps at once.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

_SLICE = 1 << 18  # columns' entries per float64 product: K × 2 MB at a time


def unit_columns(maps: Tensor) -> Tensor:
    """``maps`` (..., T, T) with every column (the axis -2) scaled to unit length.

    A zero column stays zero (so its cosine with anything is 0): softmax maps have none, and the maps
    after Re-attention's BatchNorm have none in practice.
    """
    return F.normalize(maps.float(), dim=-2, eps=1e-12)


def cosine_sums(maps: Sequence[Tensor]) -> Tensor:
    """For K maps of one batch, each (B, H, T, T): the K×K sums over images, heads and tokens of
    M^{p,q}_{h,t}, in float64. Divide by B·H·T for the mean."""
    if not maps:
        raise ValueError("no attention maps")
    shape = maps[0].shape
    if len(shape) != 4 or shape[-1] != shape[-2] or any(m.shape != shape for m in maps):
        raise ValueError(f"maps must all be (B, H, T, T) of one shape, got {[tuple(m.shape) for m in maps]}")
    # With unit columns, the dot product of two whole flattened maps is the sum of their columns' cosines.
    flat = torch.stack([unit_columns(m).reshape(-1) for m in maps])  # (K, B·H·T·T)
    # Summed in float64, a slice at a time: a float32 sum over millions of products drifts by ~1e-5.
    sums = torch.zeros(len(maps), len(maps), dtype=torch.float64, device=flat.device)
    for part in torch.split(flat, _SLICE, dim=1):
        part64 = part.double()
        sums += part64 @ part64.T
    return sums  # (K, K)


class SimilarityAccumulator:
    """The mean of M^{p,q} over heads, tokens and every image added, for K maps per image."""

    def __init__(self, maps: int) -> None:
        self.maps = maps
        self._sums = torch.zeros(maps, maps, dtype=torch.float64)
        self._columns = 0  # images × heads × tokens seen
        self.images = 0

    def add(self, maps: Sequence[Tensor]) -> None:
        if len(maps) != self.maps:
            raise ValueError(f"expected {self.maps} maps per batch, got {len(maps)}")
        B, H, T, _ = maps[0].shape
        self._sums += cosine_sums(maps).cpu()
        self._columns += B * H * T
        self.images += B

    def mean(self) -> np.ndarray:
        """(K, K) float64: the mean cosine of every pair of maps."""
        if not self._columns:
            raise ValueError("no images were added")
        out: np.ndarray = (self._sums / self._columns).numpy()
        return out


def similarity_next(matrix: np.ndarray) -> list[float]:
    """M^{p,p+1} for p = 0 .. L-2: each block's similarity with the next."""
    return [float(matrix[p, p + 1]) for p in range(matrix.shape[0] - 1)]


def similar_blocks(next_similarities: Sequence[float], threshold: float) -> int:
    """How many blocks are more similar than ``threshold`` to the next (the paper's count of similar blocks)."""
    return sum(1 for s in next_similarities if s > threshold)
