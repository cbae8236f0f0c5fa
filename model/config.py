"""DeepViT configuration: one frozen dataclass, the six official variants, and the JSON form.

The field names follow the official constructor's terms as recorded in the conformance data
(zhoudaquan/dvit_repo, ``models/deep_vision_transformer.py``), so a JSON config written for the
official code reads here unchanged.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from deepvit.artifact import PreprocessSpec

PatchEmbedKind = Literal["conv", "cnn"]


class ConfigError(ValueError):
    """A model configuration that cannot describe a DeepViT."""


@dataclass(frozen=True)
class DeepViTConfig:
    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    num_classes: int = 1000
    embed_dim: int = 384
    depth: int = 16
    num_heads: int = 12
    mlp_ratio: float = 3.0
    qkv_bias: bool = True
    layernorm_eps: float = 1e-6
    # 0-based indices of the blocks whose attention applies Re-attention (paper, Eq. 3).
    reattention_blocks: tuple[int, ...] = ()
    # reatten_scale = head_dim ** -0.5 when true, else 1.0 (only deepvit_S sets it).
    transform_scale: bool = False
    patch_embed: PatchEmbedKind = "conv"
    # The block's adjust_ratio r: x + attn(norm1(x * r)) / r, then the same for the MLP.
    scale_adjustment: float = 1.0
    # Regularisation, used only while training.
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    # Evaluation resize: shorter side to int(img_size / crop_pct) before the centre crop.
    crop_pct: float = 0.9

    def __post_init__(self) -> None:
        problems = []
        if self.embed_dim % self.num_heads:
            problems.append(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if self.img_size % self.patch_size:
            problems.append(f"img_size {self.img_size} is not divisible by patch_size {self.patch_size}")
        if self.patch_embed not in ("conv", "cnn"):
            problems.append(f"patch_embed must be 'conv' or 'cnn', not {self.patch_embed!r}")
        if self.patch_embed == "cnn" and self.patch_size % 2:
            problems.append("the cnn stem halves the resolution first, so patch_size must be even")
        bad = [i for i in self.reattention_blocks if not 0 <= i < self.depth]
        if bad:
            problems.append(f"reattention_blocks {bad} are outside 0..{self.depth - 1}")
        for name in ("img_size", "patch_size", "in_chans", "num_classes", "embed_dim", "depth", "num_heads"):
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be positive")
        if self.scale_adjustment <= 0:
            problems.append("scale_adjustment must be positive")
        if not 0 < self.crop_pct <= 1:
            problems.append("crop_pct must be in (0, 1]")
        if problems:
            raise ConfigError("invalid DeepViT config: " + "; ".join(problems))

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def num_patches(self) -> int:
        return (self.img_size // self.patch_size) ** 2

    @property
    def preprocessing(self) -> PreprocessSpec:
        """The official evaluation transform (DeiT style): shorter side to int(img_size / crop_pct), bicubic,
        centre crop, mean = std = 0.5."""
        return PreprocessSpec.from_crop_pct(self.img_size, self.crop_pct)

    def replace(self, **changes: Any) -> DeepViTConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["reattention_blocks"] = list(self.reattention_blocks)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DeepViTConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown config fields {unknown}; known fields are {sorted(known)}")
        problems = _json_type_problems(data)
        if problems:
            raise ConfigError("invalid DeepViT config: " + "; ".join(problems))
        values = dict(data)
        if "reattention_blocks" in values:
            values["reattention_blocks"] = tuple(values["reattention_blocks"])
        try:
            return cls(**values)
        except TypeError as exc:
            raise ConfigError(f"invalid DeepViT config: {exc}") from exc

    @classmethod
    def from_json(cls, path: str | Path) -> DeepViTConfig:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"cannot read model config {path}: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"model config {path} must be a JSON object of config fields")
        return cls.from_dict(data)


def _json_type_problems(data: dict[str, Any]) -> list[str]:
    # JSON types checked against each field's default, so that "transform_scale": "false" (truthy) or
    # "depth": 4.5 is an error naming the field rather than a silently different model or a traceback.
    problems = []
    for f in dataclasses.fields(DeepViTConfig):
        if f.name not in data:
            continue
        value, default = data[f.name], f.default
        if isinstance(default, bool):
            ok, want = isinstance(value, bool), "true or false"
        elif isinstance(default, int):
            ok, want = isinstance(value, int) and not isinstance(value, bool), "an integer"
        elif isinstance(default, float):
            ok, want = isinstance(value, int | float) and not isinstance(value, bool), "a number"
        elif isinstance(default, str):
            ok, want = isinstance(value, str), "a string"
        else:  # reattention_blocks
            ok = isinstance(value, list | tuple) and all(isinstance(i, int) and not isinstance(i, bool) for i in value)
            want = "a list of block indices"
        if not ok:
            problems.append(f"{f.name} must be {want}, not {value!r}")
    return problems


def _official(**kw: Any) -> DeepViTConfig:
    # Shared by every registered official model: 12 heads, mlp_ratio 3, qkv_bias, LayerNorm eps 1e-6.
    return DeepViTConfig(num_heads=12, mlp_ratio=3.0, qkv_bias=True, layernorm_eps=1e-6, **kw)


# The registered models of the official code, by their official names.
VARIANTS: dict[str, DeepViTConfig] = {
    "deepvit_patch16_224_re_attn_16b": _official(
        embed_dim=384, depth=16, reattention_blocks=tuple(range(16)), patch_embed="conv"
    ),
    "deepvit_patch16_224_re_attn_24b": _official(
        embed_dim=384, depth=24, reattention_blocks=tuple(range(24)), patch_embed="conv"
    ),
    "deepvit_patch16_224_re_attn_32b": _official(
        embed_dim=384, depth=32, reattention_blocks=tuple(range(32)), patch_embed="conv"
    ),
    "deepvit_S": _official(
        embed_dim=396,
        depth=16,
        reattention_blocks=tuple(range(11, 16)),
        transform_scale=True,
        patch_embed="cnn",
        scale_adjustment=0.5,
    ),
    "deepvit_L": _official(
        embed_dim=420,
        depth=32,
        reattention_blocks=tuple(range(20, 32)),
        patch_embed="cnn",
        scale_adjustment=0.5,
    ),
    "deepvit_L_384": _official(
        img_size=384,
        embed_dim=420,
        depth=32,
        reattention_blocks=tuple(range(20, 32)),
        patch_embed="cnn",
        scale_adjustment=0.5,
        crop_pct=1.0,
    ),
}


def get_config(arch: str) -> DeepViTConfig:
    try:
        return VARIANTS[arch]
    except KeyError:
        raise ConfigError(f"unknown architecture {arch!r}; choose one of {', '.join(VARIANTS)}") from None
