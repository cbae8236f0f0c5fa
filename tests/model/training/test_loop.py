"""The pieces of training that are ours: weight-decay groups, the schedule, Re-attention BatchNorm
recalibration, the checkpoint format, and a resume that continues bit for bit."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from deepvit.model.checkpoint import filter_state_dict, load_weights, read_checkpoint, select_state_dict
from deepvit.model.config import DeepViTConfig
from deepvit.model.net import DeepViT
from deepvit.model.training.distributed import Dist
from deepvit.model.training.loop import TrainingError, train
from deepvit.model.training.recalibration import reattention_norms, recalibrate_reattention
from deepvit.model.training.recipe import build_optimizer, build_scheduler
from deepvit.model.training.settings import TrainSettings
from deepvit.model.training.start import build_for_training
from deepvit.model.training.synthetic import CLASSES


@pytest.fixture
def cfg(tiny_shapes_config: Path) -> DeepViTConfig:
    return DeepViTConfig.from_json(tiny_shapes_config)


def _settings(**kw: Any) -> TrainSettings:
    return TrainSettings(**({"data": ".", "output": ".", "arch": "deepvit_S"} | kw))


def test_weight_decay_spares_norms_biases_pos_embed_and_cls_token(cfg: DeepViTConfig) -> None:
    model = DeepViT(cfg)
    opt = build_optimizer(model, _settings(weight_decay=0.05), lr=1e-3)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = {g["weight_decay"]: {names[id(p)] for p in g["params"]} for g in opt.param_groups}
    assert set(groups) == {0.0, 0.05}
    no_decay, decay = groups[0.0], groups[0.05]
    assert not no_decay & decay
    assert no_decay | decay == set(names.values())
    # Decay exactly the weight matrices and kernels: Linear weights, convolutions, Re-attention's Θ.
    assert decay == {n for n, p in model.named_parameters() if p.ndim >= 2} - {"pos_embed", "cls_token"}
    assert {"pos_embed", "cls_token", "head.bias", "norm.weight", "blocks.0.norm1.weight"} <= no_decay
    assert {"blocks.2.attn.var_norm.weight", "blocks.2.attn.var_norm.bias", "patch_embed.bn1.weight"} <= no_decay
    assert {"blocks.2.attn.reatten_matrix.weight", "blocks.0.attn.qkv.weight", "head.weight"} <= decay
    assert type(opt).__name__ == "AdamW"


def test_learning_rate_scales_with_global_batch_unless_given() -> None:
    assert _settings(batch_size=64).effective_lr(world_size=8) == pytest.approx(5e-4)
    assert _settings(batch_size=32).effective_lr(world_size=2) == pytest.approx(5e-4 * 64 / 512)
    assert _settings(lr=1e-3).effective_lr(world_size=8) == 1e-3


def test_schedule_warms_up_linearly_then_follows_the_cosine_down_to_min_lr() -> None:
    opt = torch.optim.AdamW([nn.Parameter(torch.zeros(2))], lr=1e-3)
    sched = build_scheduler(opt, _settings(epochs=10, warmup_epochs=2, lr=1e-3), steps_per_epoch=5)

    def lr_at(step: int) -> float:
        sched.step_update(step)
        return float(opt.param_groups[0]["lr"])

    def cosine(step: int) -> float:  # timm's CosineLRScheduler over the whole run, min_lr 1e-5
        return 1e-5 + (1e-3 - 1e-5) * 0.5 * (1 + math.cos(math.pi * step / 50))

    assert lr_at(0) == pytest.approx(1e-6)  # warmup_lr
    assert lr_at(5) == pytest.approx(1e-6 + (1e-3 - 1e-6) * 5 / 10)  # linear warm-up over 2 epochs
    for step in (10, 30, 49):
        assert lr_at(step) == pytest.approx(cosine(step))


def test_recalibration_recomputes_only_the_reattention_statistics(cfg: DeepViTConfig) -> None:
    torch.manual_seed(0)
    model = DeepViT(cfg).train()
    norms = reattention_norms(model)
    assert len(norms) == len(cfg.reattention_blocks) == 2
    for n in norms:  # stale statistics, as after many momentum updates on mixed-up batches
        n.running_mean.fill_(5.0)  # type: ignore[union-attr]
        n.running_var.fill_(9.0)  # type: ignore[union-attr]
    batches = [torch.randn(6, 3, 32, 32) for _ in range(4)]

    # What the statistics must be: each var_norm's input, averaged per head over the batches, with the
    # model in eval mode except the var_norms themselves (no dropout or drop path, stem BN frozen).
    reference = copy.deepcopy(model).eval()
    seen: dict[int, list[Tensor]] = {i: [] for i in range(len(norms))}
    for i, n in enumerate(reattention_norms(reference)):
        n.train()
        n.register_forward_pre_hook(lambda _m, args, i=i: seen[i].append(args[0].detach()))
    with torch.no_grad():
        for b in batches:
            reference(b)

    before = copy.deepcopy(model.state_dict())
    used = recalibrate_reattention(model, iter(batches), max_batches=3, device=torch.device("cpu"))
    assert used == 3
    assert model.training, "the mode the model was in comes back"
    for i, n in enumerate(norms):
        xs = seen[i][:3]
        torch.testing.assert_close(n.running_mean, torch.stack([x.mean(dim=(0, 2, 3)) for x in xs]).mean(0))
        torch.testing.assert_close(n.running_var, torch.stack([x.var(dim=(0, 2, 3)) for x in xs]).mean(0))
        assert n.momentum == 0.1
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {
        f"blocks.{b}.attn.var_norm.{s}"
        for b in cfg.reattention_blocks
        for s in ("running_mean", "running_var", "num_batches_tracked")
    }

    plain = DeepViT(cfg.replace(reattention_blocks=()))
    assert recalibrate_reattention(plain, iter(batches), 3, torch.device("cpu")) == 0


def test_checkpoint_round_trip_and_bit_identical_resume(
    small_shapes: Path, tiny_shapes_config: Path, tmp_path: Path
) -> None:
    # The official recipe's random parts all on (RandAugment, random erasing, mixup / cutmix, drop path,
    # EMA, recalibration), so the resumed run must restore or reseed every one of them.
    base = TrainSettings(
        data=str(small_shapes),
        output="",
        model_config=str(tiny_shapes_config),
        epochs=2,
        batch_size=8,
        workers=0,
        recalibrate_batches=2,
        ema_decay=0.9,
        progress=False,
    )
    quiet = lambda _msg: None  # noqa: E731
    straight = train(base.replace(output=str(tmp_path / "a")), Dist(), quiet)
    assert straight.epochs_run == 2
    interrupted = train(base.replace(output=str(tmp_path / "b")), Dist(), quiet, stop_after=lambda e: e == 0)
    assert interrupted.epochs_run == 1
    assert read_checkpoint(tmp_path / "b" / "last.pth.tar")["epoch"] == 0
    resumed = train(
        base.replace(output=str(tmp_path / "b"), resume=str(tmp_path / "b" / "last.pth.tar")), Dist(), quiet
    )
    assert resumed.epochs_run == 1

    a = read_checkpoint(tmp_path / "a" / "last.pth.tar")  # weights_only, like every load
    b = read_checkpoint(tmp_path / "b" / "last.pth.tar")
    assert a["epoch"] == b["epoch"] == 1
    for key in ("state_dict", "state_dict_ema"):
        assert a[key].keys() == b[key].keys()
        for name, tensor in a[key].items():
            assert torch.equal(tensor, b[key][name]), f"{key}.{name} differs after resume"
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values(), strict=True):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert a["scheduler"] == b["scheduler"]
    timing = {"epoch_seconds", "train_seconds", "images_per_second"}
    logs = [
        [
            {k: v for k, v in json.loads(line).items() if k not in timing}
            for line in (tmp_path / d / "log.jsonl").read_text().splitlines()
        ]
        for d in "ab"
    ]
    assert logs[0] == logs[1]
    assert [r["epoch"] for r in logs[0]] == [0, 1]

    # The format: what the model side (export, verify, evaluate) and the official loader read.
    assert set(a) >= {
        "state_dict",
        "state_dict_ema",
        "epoch",
        "optimizer",
        "scheduler",
        "scaler",
        "config",
        "args",
        "arch",
    }
    json.dumps(a["args"])  # plain data
    json.dumps(a["config"])
    assert a["class_names"] == list(CLASSES)
    cfg = DeepViTConfig.from_dict(a["config"])
    assert cfg.num_classes == len(CLASSES)
    for weights in ("state_dict", "ema"):
        model = DeepViT(cfg)
        load_weights(model, filter_state_dict(select_state_dict(a, weights)), "tiny")  # strict
    assert (tmp_path / "a" / "curves.png").stat().st_size > 0
    assert (tmp_path / "a" / "labels.txt").read_text().split() == list(CLASSES)
    assert not list((tmp_path / "a").glob(".*tmp*")), "no temporary files left behind"

    with pytest.raises(TrainingError, match="already holds a run"):
        train(base.replace(output=str(tmp_path / "a")), Dist(), quiet)  # a fresh run never overwrites one
    again = train(base.replace(output=str(tmp_path / "b"), resume=str(tmp_path / "b" / "last.pth.tar")), Dist(), quiet)
    assert again.epochs_run == 0, "resuming a finished run trains nothing"


def test_init_fine_tunes_with_a_new_head_and_a_resampled_position_embedding(data_dir: Path) -> None:
    # The official tiny_cnn checkpoint (7 classes, 64 px) fine-tuned to 8 classes at 96 px.
    cfg = DeepViTConfig.from_json(data_dir / "tiny_cnn.json").replace(img_size=96)
    init = data_dir / "conformance" / "official_tiny_cnn.pth.tar"
    s = _settings(init=str(init))
    model, built = build_for_training(cfg, "tiny_cnn", len(CLASSES), s)
    assert built.num_classes == len(CLASSES)
    official = filter_state_dict(select_state_dict(read_checkpoint(init)))
    ours = model.state_dict()
    assert ours["head.weight"].shape == (len(CLASSES), cfg.embed_dim)
    assert ours["pos_embed"].shape == (1, (96 // cfg.patch_size) ** 2 + 1, cfg.embed_dim)
    torch.testing.assert_close(ours["pos_embed"][:, 0], official["pos_embed"][:, 0])  # cls position kept
    for k in set(ours) - {"head.weight", "head.bias", "pos_embed"}:
        assert torch.equal(ours[k], official[k]), k


def test_train_cli_says_what_is_wrong(small_shapes: Path, tmp_path: Path, run_deepvit: Any) -> None:
    res = run_deepvit("train", "--data", small_shapes, "--output", tmp_path / "o")
    assert (res.code, "give exactly one of --arch and --model-config" in res.stderr) == (2, True)
    res = run_deepvit("train", "--data", small_shapes / "train", "--arch", "deepvit_S", "--output", tmp_path / "o")
    assert (res.code, "must hold train/<class>/* and val/<class>/*" in res.stderr) == (2, True)
    res = run_deepvit("train", "--data", small_shapes, "--resume", tmp_path / "none.pth.tar", "--output", tmp_path)
    assert (res.code, "does not exist" in res.stderr) == (2, True)
    res = run_deepvit(
        "train", "--data", small_shapes, "--arch", "deepvit_S", "--batch-size", "64", "--output", tmp_path
    )
    assert (res.code, "do not fill one batch of 64" in res.stderr) == (2, True)
    assert not (tmp_path / "o").exists()
