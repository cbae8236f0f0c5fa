"""One process or many: the torchrun environment, the process group, reductions and the eval sharding.

``torchrun --nproc_per_node N`` sets RANK, LOCAL_RANK and WORLD_SIZE; without them this is a single
process and every helper here is a no-op. NCCL on GPUs, gloo on the CPU.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Sampler


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup(device: str = "auto") -> Dist:
    """Read the torchrun environment, pick the device, and join the process group when there are peers."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda:
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", rank=rank, world_size=world)
    return Dist(rank=rank, world_size=world, local_rank=local, device=dev)


def teardown(d: Dist) -> None:
    if d.enabled and dist.is_initialized():
        # Every rank leaves together: a rank that destroys its group while rank 0 is still writing
        # checkpoints and plots aborts in gloo's threads ("terminate called without an active exception").
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()


def all_reduce_sum(values: list[float], d: Dist) -> list[float]:
    """Sum a few scalars over all ranks (float64, so counts stay exact)."""
    if not d.enabled:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=d.device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return [float(v) for v in t.tolist()]


def average_(tensors: list[torch.Tensor], d: Dist) -> None:
    """In-place mean over ranks, e.g. BatchNorm statistics each rank estimated on its own shard."""
    if not d.enabled:
        return
    for t in tensors:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t.div_(d.world_size)


def average_batchnorm_(model: nn.Module, d: Dist) -> None:
    """Average every BatchNorm's running statistics over ranks (timm's ``distribute_bn(reduce=True)``).

    DDP copies rank 0's buffers into every rank at the start of each training forward, so after an epoch's
    last step each rank holds its own last batch's update: without this the ranks would each evaluate a
    slightly different model, and rank 0 would save only its own. Call it on the bare model and the EMA."""
    stats = [
        buf
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
        for buf in (m.running_mean, m.running_var)
        if buf is not None
    ]
    average_(stats, d)


class ShardSampler(Sampler[int]):
    """Every rank takes indices rank, rank + world, ...: each sample is seen exactly once over all ranks,
    with no padding, so summed counts are exact (DistributedSampler pads with repeats)."""

    def __init__(self, length: int, d: Dist) -> None:
        self.indices = list(range(d.rank, length, d.world_size))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)
