"""DeepViT building blocks: patch stems, the MLP, attention with optional Re-attention, the block.

Module and parameter names are the official ones (zhoudaquan/dvit_repo, ``models/layers.py``), so the
state-dict keys match a released checkpoint exactly; the order in which submodules are created is the
official order too, which keeps ``state_dict()`` in the official key order.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .config import DeepViTConfig


class PatchEmbed(nn.Module):
    """Non-overlapping patches by one Conv2d with kernel = stride = patch (the ViT stem)."""

    def __init__(self, cfg: DeepViTConfig) -> None:
        super().__init__()
        self.proj = nn.Conv2d(cfg.in_chans, cfg.embed_dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)

    def forward(self, x: Tensor) -> Tensor:
        x = self.proj(x)  # (B, D, H/p, W/p)
        return x.flatten(2).transpose(1, 2)  # (B, N, D)


class ConvStemPatchEmbed(nn.Module):
    """The 3-conv stem of deepvit_S/L (official ``PatchEmbed_CNN``): 7x7/2, 3x3, then patch/2 patches."""

    def __init__(self, cfg: DeepViTConfig) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cfg.in_chans, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(64, 64, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(64)
        half = cfg.patch_size // 2  # conv1 already halved the resolution
        self.proj = nn.Conv2d(64, cfg.embed_dim, kernel_size=half, stride=half)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))  # (B, 64, H/2, W/2)
        x = self.relu(self.bn2(self.conv2(x)))
        x = self.proj(x)  # (B, D, H/p, W/p)
        return x.flatten(2).transpose(1, 2)  # (B, N, D)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        x = self.drop(self.act(self.fc1(x)))
        x = self.drop(self.fc2(x))
        return x


class Attention(nn.Module):
    """Multi-head self-attention; with ``reattention`` the maps are re-mixed across heads.

    Re-attention (paper, Eq. 3): ReAttention(Q, K, V) = Norm(Θᵀ · Softmax(QKᵀ/√d)) V, where Θ is a
    learnable H×H matrix. As in the official code Θ is a 1×1 Conv2d over the head axis (with bias), Norm
    is BatchNorm2d over heads, and the result is multiplied by ``reatten_scale``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        qkv_bias: bool,
        reattention: bool,
        transform_scale: bool,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.reattention = reattention
        if reattention:
            # Created before qkv, as officially, so the state-dict order matches.
            self.reatten_matrix = nn.Conv2d(num_heads, num_heads, kernel_size=1, stride=1)
            # A module, not BatchNorm2d: export folds it into reatten_matrix and leaves an Identity here.
            self.var_norm: nn.Module = nn.BatchNorm2d(num_heads)
            self.reatten_scale = self.scale if transform_scale else 1.0
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: Tensor, need_weights: bool = False) -> tuple[Tensor, Tensor | None]:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, H, N, d)
        if not self.reattention and not need_weights:
            # Plain MHSA needs no map: the fused kernel computes softmax(QKᵀ·scale)V without storing it.
            drop = self.attn_drop.p if self.training else 0.0
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=drop, scale=self.scale)
            return self.proj_drop(self.proj(out.transpose(1, 2).reshape(B, N, C))), None
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)  # (B, H, N, N)
        attn = self.attn_drop(attn)
        if self.reattention:
            attn = self.var_norm(self.reatten_matrix(attn)) * self.reatten_scale  # mix heads: (B, H, N, N)
        out = (attn @ v).transpose(1, 2).reshape(B, N, C)  # (B, N, D)
        return self.proj_drop(self.proj(out)), attn if need_weights else None


class DropPath(nn.Module):
    """Stochastic depth per sample (Huang et al. 2016), as timm's ``DropPath``."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep


class Block(nn.Module):
    """Pre-norm transformer block with the official ``adjust_ratio`` r.

    x ← x + attn(norm1(x·r))/r, then x ← x + mlp(norm2(x·r))/r. With r = 0.5 (deepvit_S/L) this keeps the
    LayerNorm inputs small in deep stacks; with r = 1 it is the usual ViT block.
    """

    def __init__(self, cfg: DeepViTConfig, index: int, drop_path: float) -> None:
        super().__init__()
        dim = cfg.embed_dim
        self.adjust_ratio = cfg.scale_adjustment
        self.norm1 = nn.LayerNorm(dim, eps=cfg.layernorm_eps)
        self.attn = Attention(
            dim,
            cfg.num_heads,
            qkv_bias=cfg.qkv_bias,
            reattention=index in cfg.reattention_blocks,
            transform_scale=cfg.transform_scale,
            attn_drop=cfg.attn_drop_rate,
            proj_drop=cfg.drop_rate,
        )
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=cfg.layernorm_eps)
        self.mlp = Mlp(dim, int(dim * cfg.mlp_ratio), drop=cfg.drop_rate)

    def forward(self, x: Tensor, need_weights: bool = False) -> tuple[Tensor, Tensor | None]:
        r = self.adjust_ratio
        y, attn = self.attn(self.norm1(x * r), need_weights)
        x = x + self.drop_path(y / r)
        x = x + self.drop_path(self.mlp(self.norm2(x * r))) / r
        return x, attn


def stochastic_depth_rates(cfg: DeepViTConfig) -> list[float]:
    # Linear decay rule, as the official code's torch.linspace(0, drop_path_rate, depth); plain Python so
    # that building under torch.device("meta") works.
    if cfg.depth == 1:
        return [0.0]
    step = cfg.drop_path_rate / (cfg.depth - 1)
    return [i * step for i in range(cfg.depth)]
