"""The timm objects a training run is made of, built from :class:`.settings.TrainSettings`: the
optimizer with its weight-decay groups, the schedule, mixup / cutmix, the loss and the model EMA."""

from __future__ import annotations

from typing import Any

from torch import nn
from torch.optim import Optimizer

from .settings import TrainSettings


def build_optimizer(model: nn.Module, s: TrainSettings, lr: float) -> Optimizer:
    """AdamW (timm's factory): weight decay on weight matrices and kernels only; norms, biases and the
    model's ``no_weight_decay()`` names (pos_embed, cls_token) form a group with weight decay 0."""
    from timm.optim import create_optimizer_v2

    opt: Optimizer = create_optimizer_v2(
        model, opt="adamw", lr=lr, weight_decay=s.weight_decay, eps=s.opt_eps, filter_bias_and_bn=True
    )
    return opt


def build_scheduler(optimizer: Optimizer, s: TrainSettings, steps_per_epoch: int) -> Any:
    """Cosine decay to ``min_lr`` with linear warm-up from ``warmup_lr``, stepped every update (timm).

    Stepping per update rather than per epoch (DeiT) gives the same curve sampled finer; it matters only
    for short runs, where a per-epoch warm-up would be a staircase.
    """
    from timm.scheduler import CosineLRScheduler

    return CosineLRScheduler(
        optimizer,
        t_initial=s.epochs * steps_per_epoch,
        lr_min=s.min_lr,
        warmup_t=s.warmup_epochs * steps_per_epoch,
        warmup_lr_init=s.warmup_lr,
        t_in_epochs=False,
    )


def build_mixup(s: TrainSettings, num_classes: int) -> Any | None:
    if not s.mixup_active:
        return None
    from timm.data import Mixup

    return Mixup(  # type: ignore[no-untyped-call]
        mixup_alpha=s.mixup,
        cutmix_alpha=s.cutmix,
        prob=s.mixup_prob,
        switch_prob=s.mixup_switch_prob,
        mode="batch",
        label_smoothing=s.smoothing,
        num_classes=num_classes,
    )


def build_criterion(s: TrainSettings) -> nn.Module:
    """Soft-target cross-entropy after mixup (which already smooths), else label smoothing, else plain."""
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    if s.mixup_active:
        return SoftTargetCrossEntropy()  # type: ignore[no-untyped-call]
    if s.smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing=s.smoothing)  # type: ignore[no-untyped-call]
    return nn.CrossEntropyLoss()


def build_ema(model: nn.Module, s: TrainSettings) -> Any | None:
    if not s.ema:
        return None
    from timm.utils import ModelEmaV3

    return ModelEmaV3(model, decay=s.ema_decay)
