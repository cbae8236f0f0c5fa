"""Every setting of ``deepvit train``, with the official defaults; plain data, no torch.

Defaults are the ImageNet recipe DeepViT is trained with: DeiT's (Touvron et al. 2021) as timm implements
it, with DeepViT's drop path 0.2. The learning rate follows DeiT's linear scaling rule: lr = base_lr x
global batch / 512, the global batch being the per-process batch times the processes; an explicit ``lr``
wins. The whole object is saved with every checkpoint (``args``), so a run says how it was made.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class AugmentRecipe:
    """The training-time pixel recipe (timm's ``create_transform``), DeiT's defaults."""

    auto_augment: str | None = "rand-m9-mstd0.5-inc1"
    color_jitter: float = 0.4  # used only when auto_augment is None, as in timm
    reprob: float = 0.25
    remode: str = "pixel"
    recount: int = 1
    hflip: float = 0.5
    interpolation: str = "bicubic"
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)


LR_REFERENCE_BATCH = 512


@dataclass(frozen=True)
class TrainSettings:
    # What to train, on what, into where.
    data: str
    output: str
    arch: str | None = None
    model_config: str | None = None
    init: str | None = None  # fine-tune from these weights
    init_ema: bool = False
    resume: str | None = None
    # Schedule and optimiser (DeiT / DeepViT).
    epochs: int = 300
    batch_size: int = 64  # per process
    eval_batch_size: int | None = None  # default: 2 x batch_size
    lr: float | None = None  # absolute; default base_lr x global batch / 512
    base_lr: float = 5e-4
    min_lr: float = 1e-5
    warmup_lr: float = 1e-6
    warmup_epochs: int = 5
    weight_decay: float = 0.05
    opt_eps: float = 1e-8
    clip_grad: float | None = None
    # Regularisation and augmentation.
    drop_path: float = 0.2
    smoothing: float = 0.1
    mixup: float = 0.8
    cutmix: float = 1.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    auto_augment: str | None = AugmentRecipe.auto_augment
    color_jitter: float = AugmentRecipe.color_jitter
    reprob: float = AugmentRecipe.reprob
    remode: str = AugmentRecipe.remode
    recount: int = AugmentRecipe.recount
    hflip: float = AugmentRecipe.hflip
    scale: tuple[float, float] = AugmentRecipe.scale  # random-resized-crop area range
    ratio: tuple[float, float] = AugmentRecipe.ratio  # random-resized-crop aspect-ratio range
    train_interpolation: str = AugmentRecipe.interpolation
    # Model EMA (DeiT's decay) and Re-attention BatchNorm recalibration before each evaluation.
    ema: bool = True
    ema_decay: float = 0.99996
    recalibrate_batches: int = 100  # 0: off
    # Machinery.
    amp: bool = True  # CUDA only; ignored on the CPU
    device: str = "auto"
    workers: int = 4
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        problems = []
        if (self.arch is None) == (self.model_config is None) and self.resume is None:
            problems.append("give exactly one of --arch and --model-config")
        for name in ("epochs", "batch_size"):
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be positive")
        if self.warmup_epochs < 0 or self.recalibrate_batches < 0 or self.workers < 0:
            problems.append("warmup_epochs, recalibrate_batches and workers must not be negative")
        if self.mixup_active and self.batch_size % 2:
            problems.append("mixup / cutmix pair samples within a batch: batch_size must be even")
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def mixup_active(self) -> bool:
        return self.mixup_prob > 0 and (self.mixup > 0 or self.cutmix > 0)

    def effective_lr(self, world_size: int) -> float:
        if self.lr is not None:
            return self.lr
        return self.base_lr * self.batch_size * world_size / LR_REFERENCE_BATCH

    @property
    def augment(self) -> AugmentRecipe:
        return AugmentRecipe(
            auto_augment=self.auto_augment,
            color_jitter=self.color_jitter,
            reprob=self.reprob,
            remode=self.remode,
            recount=self.recount,
            hflip=self.hflip,
            interpolation=self.train_interpolation,
            scale=(float(self.scale[0]), float(self.scale[1])),
            ratio=(float(self.ratio[0]), float(self.ratio[1])),
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> TrainSettings:
        return dataclasses.replace(self, **changes)
