"""Attention rollout (Abnar & Zuidema 2020, "Quantifying Attention Flow in Transformers") of the cls token
over the patch grid, computed inside the exported graph as the artifact's ``attention`` output.

The definition, exactly (the artifact's metadata records it as :data:`ROLLOUT_DEFINITION`):

- for each block l, the attention map the block applies (after Re-attention where the block has it),
  averaged over heads: Ā_l (T x T, T = 1 + G²); negatives clamped to 0 (Re-attention's BatchNorm makes
  some) and each row renormalised to sum 1, a row summing to under 1e-6 becoming uniform;
- Â_l = 0.5·Ā_l + 0.5·I, rows renormalised (the residual connection carries half of each token on);
- v = e_cls, then v ← v·Â_l for l = L … 1: the cls row of Â_L ⋯ Â_1, a vector-matrix product per block
  instead of a matrix product;
- the output is v[1:] (the patches, row-major over the G x G grid) renormalised to sum 1 (uniform in the
  degenerate case where no attention reaches a patch at all).
"""

from __future__ import annotations

import torch
from torch import Tensor

ROW_EPS = 1e-6
ROLLOUT_DEFINITION = (
    "attention rollout (Abnar & Zuidema 2020) of the cls token: per block the applied map (after "
    "Re-attention) averaged over heads, negatives clamped to 0, rows renormalised (a row sum under 1e-6 "
    "uniform); A_hat = 0.5*A + 0.5*I rows renormalised; v = e_cls, v <- v @ A_hat for blocks L..1; "
    "output v[1:] renormalised to sum 1, row-major over the patch grid"
)


def _rows_normalised(a: Tensor) -> Tensor:
    """Each row divided by its sum; a row summing to under ``ROW_EPS`` becomes uniform."""
    s = a.sum(dim=-1, keepdim=True)
    uniform = torch.full_like(a, 1.0 / a.shape[-1])
    return torch.where(s < ROW_EPS, uniform, a / s.clamp_min(ROW_EPS))


def attention_rollout(maps: list[Tensor]) -> Tensor:
    """Every block's applied map, each (B, H, T, T), first block first → (B, T - 1), rows summing to 1."""
    if not maps:
        raise ValueError("attention rollout needs the maps of at least one block")
    B, _, T, _ = maps[0].shape
    eye = torch.eye(T, dtype=torch.float32, device=maps[0].device)
    v = torch.zeros(B, 1, T, dtype=torch.float32, device=maps[0].device)
    v[:, :, 0] = 1.0  # e_cls, (B, 1, T)
    for attn in reversed(maps):
        a = _rows_normalised(attn.float().mean(dim=1).clamp_min(0.0))  # Ā_l, (B, T, T)
        a = _rows_normalised(0.5 * a + 0.5 * eye)  # Â_l
        v = v @ a  # (B, 1, T)
    return _rows_normalised(v[:, 0, 1:])  # (B, G²)
