"""Where a training run starts from: a fresh model, a fine-tune of other weights (``--init``), or a
checkpoint of an interrupted run (``--resume``), with the optimizer, schedule, scaler and EMA state."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..checkpoint import CheckpointError, filter_state_dict, load_weights, read_checkpoint, weights_of
from ..config import ConfigError, DeepViTConfig, get_config
from ..net import DeepViT
from .settings import TrainSettings

# Config fields a resumed run may not change: they define the architecture (drop path may differ).
_ARCH_FIELDS = ("img_size", "patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio", "reattention_blocks")


def resolve_config(s: TrainSettings, resume: Any | None) -> tuple[DeepViTConfig, str]:
    """The model config and its name: from ``--arch`` / ``--model-config``, or from the resumed checkpoint."""
    given: DeepViTConfig | None = None
    if s.arch is not None:
        given = get_config(s.arch)
    elif s.model_config is not None:
        given = DeepViTConfig.from_json(s.model_config)
    name = s.arch or "custom"
    if resume is None:
        if given is None:
            raise ConfigError("give --arch or --model-config")
        return given.replace(drop_path_rate=s.drop_path), name
    saved = resume.get("config") if isinstance(resume, Mapping) else None
    if not isinstance(saved, dict):
        raise CheckpointError(f"{s.resume} has no model config: --resume takes a checkpoint of deepvit train")
    cfg = DeepViTConfig.from_dict(saved)
    if given is not None:
        differ = [f for f in _ARCH_FIELDS if getattr(given, f) != getattr(cfg, f)]
        if differ:
            raise ConfigError(f"--resume: the checkpoint's model differs from the one given in {differ}")
    return cfg, str(resume.get("arch", name))


def _adapt(sd: dict[str, Tensor], model: DeepViT, log: Callable[[str], None] | None) -> dict[str, Tensor]:
    """Fine-tuning: a new head when the class count differs, the position embedding resampled to the grid."""
    own = model.state_dict()
    out = dict(sd)
    head = [k for k in ("head.weight", "head.bias") if k in sd and sd[k].shape != own[k].shape]
    if head:
        for k in head:
            out[k] = own[k]
        if log:
            log(f"--init: new classifier head ({sd['head.weight'].shape[0]} -> {own['head.weight'].shape[0]} classes)")
    pos = sd.get("pos_embed")
    if pos is not None and pos.shape != own["pos_embed"].shape and pos.shape[-1] == own["pos_embed"].shape[-1]:
        from timm.layers import resample_abs_pos_embed

        grid = model.cfg.img_size // model.cfg.patch_size
        out["pos_embed"] = resample_abs_pos_embed(pos, new_size=[grid, grid], num_prefix_tokens=1)
        if log:
            log(f"--init: position embedding resampled {list(pos.shape)} -> {list(out['pos_embed'].shape)}")
    return out


def build_for_training(
    cfg: DeepViTConfig,
    arch: str,
    num_classes: int,
    s: TrainSettings,
    log: Callable[[str], None] | None = None,
) -> tuple[DeepViT, DeepViTConfig]:
    """A model with the official initialisation (seeded, so every rank starts equal), or ``--init`` weights."""
    cfg = cfg.replace(num_classes=num_classes)
    torch.manual_seed(s.seed)
    model = DeepViT(cfg)
    if s.init is not None and s.resume is None:
        obj = read_checkpoint(s.init)
        sd = weights_of(obj, "ema" if s.init_ema else "state_dict")
        load_weights(model, _adapt(sd, model, log), arch)
        if log:
            log(f"--init: weights from {Path(s.init).name}" + (" (EMA)" if s.init_ema else ""))
    return model, cfg


def load_resume_state(
    ckpt: Mapping[str, Any],
    model: nn.Module,
    ema: Any | None,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: torch.amp.GradScaler,
) -> tuple[int, float, int]:
    """Restore everything a run needs to continue; returns (next epoch, best top-1, its epoch)."""
    missing = [k for k in ("state_dict", "optimizer", "scheduler", "epoch") if k not in ckpt]
    if missing:
        raise CheckpointError(f"cannot resume: the checkpoint lacks {missing} (was it written by deepvit train?)")
    model.load_state_dict(filter_state_dict(ckpt["state_dict"]), strict=True)
    if ema is not None:
        if "state_dict_ema" in ckpt:
            ema.module.load_state_dict(filter_state_dict(ckpt["state_dict_ema"]), strict=True)
        else:
            ema.set(model)
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    if ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    return int(ckpt["epoch"]) + 1, float(ckpt.get("best_metric", -1.0)), int(ckpt.get("best_epoch", -1))
