"""The training loop of ``deepvit train``: one process or many (torchrun), into checkpoints that export.

Each epoch: train (mixup / cutmix, AMP on CUDA, optional gradient clipping, EMA update per step), then
recalibrate Re-attention's BatchNorm statistics (see :mod:`.recalibration`) of the model and of its
EMA, evaluate both on the validation set, and let rank 0 write ``last.pth.tar`` (and ``best.pth.tar`` when
the model's top-1 improved), then one line of ``log.jsonl``. The checkpoint holds exactly the weights that
were evaluated, so an interrupted run loses at most the epoch in flight.

Exact resume: every random stream an epoch uses (initialisation aside) is reseeded from (seed, epoch,
rank) at the start of that epoch, and the sampler shuffles by (seed, epoch); together with the optimizer,
schedule, scaler and EMA state in the checkpoint, ``--resume`` continues bit for bit where the
uninterrupted run would have been (on the same hardware and settings).
"""

from __future__ import annotations

import math
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from ..atomic import copy_atomic, write_text_atomic
from ..checkpoint import read_checkpoint, save_checkpoint
from ..config import ConfigError, DeepViTConfig
from .distributed import Dist, ShardSampler, all_reduce_sum, average_batchnorm_
from .folders import DatasetError, image_folder, split_dirs
from .history import History
from .recalibration import recalibrate_reattention
from .recipe import (
    build_criterion,
    build_ema,
    build_mixup,
    build_optimizer,
    build_scheduler,
)
from .settings import TrainSettings
from .start import build_for_training, load_resume_state, resolve_config
from .topk import TopK, evaluate_model
from .transforms import eval_transform, train_transform

LAST, BEST = "last.pth.tar", "best.pth.tar"
LOG, PLOT, LABELS, CONFIG = "log.jsonl", "curves.png", "labels.txt", "model_config.json"


class TrainingError(RuntimeError):
    pass


@dataclass(frozen=True)
class TrainResult:
    best_top1: float
    best_epoch: int
    epochs_run: int
    seconds: float
    output: Path


def seed_epoch(seed: int, epoch: int, rank: int) -> None:
    """Reseed python, numpy and torch for one epoch of one rank (augmentation, mixup, drop path)."""
    s = (seed * 1_000_003 + epoch * 7_919 + rank * 104_729) % 2**31
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)


def _loaders(
    s: TrainSettings, cfg: DeepViTConfig, d: Dist
) -> tuple[Any, DataLoader[Any], DataLoader[Any], DataLoader[Any]]:
    train_dir, val_dir = split_dirs(s.data)
    pre = cfg.preprocessing
    train_ds = image_folder(train_dir, train_transform(pre, s.augment))
    val_ds = image_folder(val_dir, eval_transform(pre))
    if train_ds.classes != val_ds.classes:
        raise DatasetError(f"train classes {train_ds.classes} differ from val classes {val_ds.classes}")
    if len(train_ds) // d.world_size < s.batch_size:
        raise DatasetError(
            f"{len(train_ds)} training images over {d.world_size} process(es) do not fill one batch of "
            f"{s.batch_size}; lower --batch-size"
        )
    pin = d.device.type == "cuda"
    sampler: DistributedSampler[Any] = DistributedSampler(
        train_ds, d.world_size, d.rank, shuffle=True, seed=s.seed, drop_last=True
    )
    train = DataLoader(train_ds, s.batch_size, sampler=sampler, num_workers=s.workers, pin_memory=pin, drop_last=True)
    eval_bs = s.eval_batch_size or 2 * s.batch_size
    val = DataLoader(val_ds, eval_bs, sampler=ShardSampler(len(val_ds), d), num_workers=s.workers, pin_memory=pin)
    # Recalibration sees training images through the evaluation transform (see model.recalibration).
    calib_ds = image_folder(train_dir, eval_transform(pre))
    calib_sampler: DistributedSampler[Any] = DistributedSampler(
        calib_ds, d.world_size, d.rank, shuffle=True, seed=s.seed + 1
    )
    calib = DataLoader(calib_ds, eval_bs, sampler=calib_sampler, num_workers=s.workers, pin_memory=pin)
    return train_ds, train, val, calib


def train(
    s: TrainSettings,
    d: Dist,
    log: Callable[[str], None] = print,
    stop_after: Callable[[int], bool] | None = None,
) -> TrainResult:
    """Run epochs ``start..s.epochs - 1``; ``stop_after(epoch)`` returning true ends the run after that
    epoch's checkpoint, the schedule untouched, as an interruption would (``--resume`` continues it)."""
    out = Path(s.output)
    _check_output(s)
    resume = read_checkpoint(s.resume) if s.resume else None
    cfg, arch = resolve_config(s, resume)
    train_ds, train_loader, val_loader, calib_loader = _loaders(s, cfg, d)
    class_names: list[str] = list(train_ds.classes)
    if resume is not None and cfg.num_classes != len(class_names):
        raise ConfigError(f"the checkpoint has {cfg.num_classes} classes but {s.data} has {len(class_names)}")
    model, cfg = build_for_training(cfg, arch, len(class_names), s, log if d.is_main else None)
    model.to(d.device)
    steps = len(train_loader)
    lr = s.effective_lr(d.world_size)
    optimizer = build_optimizer(model, s, lr)
    scheduler = build_scheduler(optimizer, s, steps)
    use_amp = s.amp and d.device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    ema = build_ema(model, s)
    start_epoch, best_top1, best_epoch = 0, -1.0, -1
    if resume is not None:
        start_epoch, best_top1, best_epoch = load_resume_state(resume, model, ema, optimizer, scheduler, scaler)
        if resume.get("class_names") not in (None, class_names):
            raise DatasetError(f"{s.data} has classes {class_names}, the checkpoint {resume['class_names']}")
        changed = _changed_settings(resume, s)
        if changed and d.is_main:
            log(f"--resume with settings changed from the checkpoint's: {', '.join(changed)}")
    ddp: nn.Module = model
    if d.enabled:
        ddp = nn.parallel.DistributedDataParallel(model, device_ids=[d.local_rank] if d.device.type == "cuda" else None)
    mixup = build_mixup(s, cfg.num_classes)
    criterion = build_criterion(s).to(d.device)
    history = History(out / LOG)
    run_args = s.to_dict() | {"world_size": d.world_size, "effective_lr": lr, "steps_per_epoch": steps}
    if d.is_main:
        out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out / LABELS, "\n".join(class_names) + "\n")
        write_text_atomic(out / CONFIG, cfg_json(cfg))
        history.truncate_from(start_epoch)
        log(
            f"training {arch} on {len(train_ds)} images, {len(class_names)} classes, {d.world_size} process(es) "
            f"on {d.device.type}, {steps} steps/epoch, lr {lr:.3g}, epochs {start_epoch}..{s.epochs - 1}"
        )
    started, epochs_run = time.monotonic(), 0
    for epoch in range(start_epoch, s.epochs):
        t0, epochs_run = time.monotonic(), epochs_run + 1
        seed_epoch(s.seed, epoch, d.rank)
        train_loader.sampler.set_epoch(epoch)  # type: ignore[attr-defined]
        loss, images = train_one_epoch(
            ddp, model, train_loader, optimizer, scheduler, scaler, criterion, mixup, ema, epoch, s, d, use_amp
        )
        record: dict[str, Any] = {"epoch": epoch, "train_loss": loss, "lr": optimizer.param_groups[0]["lr"]}
        record["train_images"], record["train_seconds"] = images, time.monotonic() - t0
        record["images_per_second"] = images / max(record["train_seconds"], 1e-9)
        calib_loader.sampler.set_epoch(epoch)  # type: ignore[attr-defined]
        # One model over all ranks: what each rank evaluates is what rank 0 saves.
        average_batchnorm_(model, d)
        if ema is not None:
            average_batchnorm_(ema.module, d)
        val = _validate(model, calib_loader, val_loader, s, d, use_amp)
        record |= {"val_top1": val.top1, "val_top5": val.top5, "val_loss": val.loss, "val_images": int(val.count)}
        if ema is not None:
            ev = _validate(ema.module, calib_loader, val_loader, s, d, use_amp)
            record |= {"ema_val_top1": ev.top1, "ema_val_top5": ev.top5, "ema_val_loss": ev.loss}
        improved = val.top1 > best_top1
        if improved:
            best_top1, best_epoch = val.top1, epoch
        record |= {"best_val_top1": best_top1, "best_epoch": best_epoch, "epoch_seconds": time.monotonic() - t0}
        if d.is_main:
            payload = _payload(epoch, arch, cfg, model, ema, optimizer, scheduler, scaler, run_args, class_names)
            payload |= {"metric": val.top1, "best_metric": best_top1, "best_epoch": best_epoch}
            save_checkpoint(out / LAST, payload)
            if improved:
                copy_atomic(out / LAST, out / BEST)
            history.append(record)
            ema_txt = f", EMA top-1 {record['ema_val_top1']:.2%}" if ema is not None else ""
            log(
                f"epoch {epoch}: train loss {loss:.4f}, val top-1 {val.top1:.2%} top-5 {val.top5:.2%}{ema_txt}"
                f" ({record['epoch_seconds']:.1f}s){' *best*' if improved else ''}"
            )
        if stop_after is not None and stop_after(epoch):
            break
    seconds = time.monotonic() - started
    if d.is_main:
        png = history.plot(out / PLOT)
        log(f"best val top-1 {best_top1:.2%} at epoch {best_epoch}; {out / BEST}" + (f"; curves {png}" if png else ""))
    return TrainResult(best_top1, best_epoch, epochs_run, seconds, out)


def _payload(
    epoch: int,
    arch: str,
    cfg: DeepViTConfig,
    model: nn.Module,
    ema: Any | None,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: torch.amp.GradScaler,
    run_args: dict[str, Any],
    class_names: list[str],
) -> dict[str, Any]:
    """A checkpoint in the official training script's layout (state_dict, state_dict_ema, epoch, arch,
    optimizer, args, ...), which model.checkpoint reads; config and args are plain data, never pickled
    objects, so torch.load(weights_only=True) reads every byte of it."""
    payload: dict[str, Any] = {
        "epoch": epoch,
        "arch": arch,
        "state_dict": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "config": cfg.to_dict(),
        "args": run_args,
        "class_names": class_names,
    }
    if ema is not None:
        payload["state_dict_ema"] = ema.module.state_dict()
    return payload


def _check_output(s: TrainSettings) -> None:
    """A fresh run does not overwrite another run's checkpoints; resuming one is explicit."""
    last = Path(s.output) / LAST
    if s.resume is None and last.exists():
        raise TrainingError(
            f"{s.output} already holds a run ({last.name}); continue it with --resume {last}, "
            "or train into another --output"
        )


def _changed_settings(resume: Any, s: TrainSettings) -> list[str]:
    """Settings of a resumed run that differ from the checkpoint's (the run then no longer continues
    exactly, which can be intended, e.g. more epochs)."""
    saved = resume.get("args") if isinstance(resume, dict) else None
    if not isinstance(saved, dict):
        return []
    ignore = {"resume", "output", "progress", "workers", "device", "arch", "model_config"}
    now = s.to_dict()
    return sorted(k for k in now if k not in ignore and k in saved and _plain(saved[k]) != _plain(now[k]))


def _plain(v: Any) -> Any:
    return list(v) if isinstance(v, tuple) else v


def cfg_json(cfg: DeepViTConfig) -> str:
    import json

    return json.dumps(cfg.to_dict(), indent=1) + "\n"


def train_one_epoch(
    ddp: nn.Module,
    model: nn.Module,
    loader: DataLoader[Any],
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: torch.amp.GradScaler,
    criterion: nn.Module,
    mixup: Any | None,
    ema: Any | None,
    epoch: int,
    s: TrainSettings,
    d: Dist,
    use_amp: bool,
) -> tuple[float, int]:
    """One pass over this rank's shard; returns (mean loss over all ranks, images over all ranks)."""
    from tqdm import tqdm

    ddp.train()
    steps = len(loader)
    loss_sum, seen = 0.0, 0
    t0 = time.monotonic()
    bar = tqdm(
        loader,
        total=steps,
        desc=f"epoch {epoch}",
        disable=not (s.progress and d.is_main),
        leave=False,
        file=sys.stderr,
        dynamic_ncols=True,
        mininterval=1.0,
    )
    for i, (images, targets) in enumerate(bar):
        scheduler.step_update(epoch * steps + i)
        images, targets = images.to(d.device, non_blocking=True), targets.to(d.device, non_blocking=True)
        if mixup is not None:
            images, targets = mixup(images, targets)
        with torch.autocast(d.device.type, dtype=torch.float16, enabled=use_amp):
            loss = criterion(ddp(images), targets)
        value = float(loss.item())  # the step's host sync (and under DDP one more, just below)
        # Every rank stops together: one that raised alone would leave the others waiting in the gradient
        # all-reduce until the collective timeout. A scalar all-reduce is small beside a ViT step.
        bad_ranks = all_reduce_sum([float(not math.isfinite(value))], d)[0]  # a single process: its own flag
        if bad_ranks:
            where = (
                f"loss is {value}" if not math.isfinite(value) else f"the loss of {bad_ranks:.0f} rank(s) is not finite"
            )
            raise TrainingError(f"{where} at epoch {epoch}, step {i}; lower --lr or set --clip-grad")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if s.clip_grad is not None:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), s.clip_grad)
        scaler.step(optimizer)
        scaler.update()
        if ema is not None:
            ema.update(model)
        loss_sum += value * images.shape[0]
        seen += images.shape[0]
        rate = seen * d.world_size / max(time.monotonic() - t0, 1e-9)
        lr_now = optimizer.param_groups[0]["lr"]
        bar.set_postfix(loss=f"{value:.3f}", lr=f"{lr_now:.2e}", img_s=f"{rate:.0f}", refresh=False)
    bar.close()
    total_loss, total_seen = all_reduce_sum([loss_sum, float(seen)], d)
    return total_loss / max(total_seen, 1.0), int(total_seen)


def _validate(
    model: nn.Module, calib: DataLoader[Any], val: DataLoader[Any], s: TrainSettings, d: Dist, use_amp: bool
) -> TopK:
    """Recalibrate (when on), then top-k over all ranks' shards of the validation set."""
    if s.recalibrate_batches:
        recalibrate_reattention(model, calib, s.recalibrate_batches, d.device, d)
    counts = evaluate_model(model, val, d.device, amp=use_amp)
    return TopK.from_list(all_reduce_sum(counts.as_list(), d))
