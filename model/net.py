"""DeepViT (Zhou et al. 2021): a ViT whose deeper blocks use Re-attention.

Mirrors the official ``DeepVisionTransformer`` (zhoudaquan/dvit_repo, ``models/deep_vision_transformer.py``):
cls token, learned position embedding, a stack of blocks, final LayerNorm, linear head on the cls token.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .config import DeepViTConfig, get_config
from .layers import Block, ConvStemPatchEmbed, PatchEmbed, stochastic_depth_rates


class DeepViT(nn.Module):
    def __init__(self, cfg: DeepViTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        D = cfg.embed_dim
        self.patch_embed: nn.Module = ConvStemPatchEmbed(cfg) if cfg.patch_embed == "cnn" else PatchEmbed(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_patches + 1, D))
        self.pos_drop = nn.Dropout(cfg.drop_rate)
        rates = stochastic_depth_rates(cfg)
        self.blocks = nn.ModuleList(Block(cfg, i, rates[i]) for i in range(cfg.depth))
        self.norm = nn.LayerNorm(D, eps=cfg.layernorm_eps)
        self.head = nn.Linear(D, cfg.num_classes)
        init_weights(self)

    def forward_features(self, x: Tensor, need_weights: bool = False) -> tuple[Tensor, list[Tensor]]:
        x = self.patch_embed(x)  # (B, N, D)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = self.pos_drop(torch.cat((cls, x), dim=1) + self.pos_embed)  # (B, 1 + N, D)
        maps: list[Tensor] = []
        for blk in self.blocks:
            x, attn = blk(x, need_weights)
            if attn is not None:
                maps.append(attn)
        return self.norm(x)[:, 0], maps  # (B, D)

    def forward(self, x: Tensor) -> Tensor:
        logits: Tensor = self.head(self.forward_features(x)[0])  # (B, classes)
        return logits

    def forward_with_attention(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        """Logits and every block's attention map (B, H, 1+N, 1+N), after Re-attention where it applies."""
        feats, maps = self.forward_features(x, need_weights=True)
        return self.head(feats), maps

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token"}


def init_weights(model: DeepViT) -> None:
    """The official initialisation: truncated normal (std 0.02) for every Linear weight, the position
    embedding and the cls token; zero Linear biases; LayerNorm to identity. Convolutions (including Θ) and
    BatchNorm keep PyTorch's defaults, as the official ``_init_weights`` leaves them alone."""
    nn.init.trunc_normal_(model.pos_embed, std=0.02)
    nn.init.trunc_normal_(model.cls_token, std=0.02)
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def build_model(arch_or_cfg: str | DeepViTConfig, **overrides: object) -> DeepViT:
    cfg = get_config(arch_or_cfg) if isinstance(arch_or_cfg, str) else arch_or_cfg
    if overrides:
        cfg = cfg.replace(**overrides)
    return DeepViT(cfg)
