"""The distributed path for real: `torchrun --nproc_per_node 2 ... deepvit train` with gloo on the CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from deepvit.model.checkpoint import read_checkpoint
from deepvit.model.training.synthetic import CLASSES


def test_two_gloo_processes_train_one_model_and_only_rank_0_writes(
    small_shapes: Path, tiny_shapes_config: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc-per-node", "2",
        "-m", "deepvit.cli", "train",
        "--data", str(small_shapes), "--model-config", str(tiny_shapes_config), "--output", str(out),
        "--epochs", "2", "--batch-size", "4", "--workers", "0", "--recalibrate-batches", "2", "--no-progress",
    ]  # fmt: skip
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    logged = proc.stdout + proc.stderr
    assert "2 process(es) on cpu" in logged
    assert logged.count("epoch 0: train loss") == 1, "only rank 0 reports"

    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [0, 1], "one log line per epoch, from rank 0 only"
    n_train, n_val = 4 * len(CLASSES), 2 * len(CLASSES)
    for r in records:
        # Each rank trains on its half (DistributedSampler); the sums are over both ranks.
        assert r["train_images"] == n_train
        # Each validation image counted exactly once over the two ranks (no sampler padding).
        assert r["val_images"] == n_val
        assert 0.0 <= r["val_top1"] <= r["val_top5"] <= 1.0
    ckpt = read_checkpoint(out / "last.pth.tar")
    assert ckpt["args"]["world_size"] == 2
    assert ckpt["args"]["effective_lr"] == 5e-4 * 4 * 2 / 512
    assert not any(k.startswith("module.") for k in ckpt["state_dict"]), "saved without the DDP wrapper"
    assert sorted(p.name for p in out.iterdir()) == [
        "best.pth.tar", "curves.png", "labels.txt", "last.pth.tar", "log.jsonl", "model_config.json",
    ]  # fmt: skip


def _average_batchnorm_on_rank(rank: int, port: int, out: str) -> None:
    import torch
    import torch.distributed as dist

    from deepvit.model.training.distributed import Dist, average_batchnorm_

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        torch.manual_seed(rank)
        bn = torch.nn.BatchNorm2d(4)
        bn(torch.randn(8, 4, 3, 3) * (rank + 1))  # each rank's own training update of the statistics
        average_batchnorm_(torch.nn.Sequential(bn), Dist(rank=rank, world_size=2))
        torch.save({"mean": bn.running_mean, "var": bn.running_var}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_batchnorm_statistics_are_averaged_so_every_rank_evaluates_the_model_rank_0_saves(tmp_path: Path) -> None:
    import socket

    import torch
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_average_batchnorm_on_rank, args=(port, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert torch.equal(r0["mean"], r1["mean"])
    assert torch.equal(r0["var"], r1["var"])
    # ... and they are the mean of what the ranks had, not rank 0's alone.
    own = []
    for rank in (0, 1):
        torch.manual_seed(rank)
        bn = torch.nn.BatchNorm2d(4)
        bn(torch.randn(8, 4, 3, 3) * (rank + 1))
        own.append(bn.running_var)
    torch.testing.assert_close(r0["var"], (own[0] + own[1]) / 2)
