"""What a batch of each size costs on a session, and which size to compute with: the rule the service's
warm-up and ``deepvit predict``'s actors share, so that both choose the same way."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Warmup:
    """What a warm-up measured: its duration, and the time of one batch of each size it ran."""

    seconds: float
    batch_s: dict[int, float]

    def best_batch_size(self, budget_s: float, tolerance: float = 0.05) -> int:
        """The most efficient batch size: the lowest time per image among the sizes whose batch takes at
        most ``budget_s``; of those within ``tolerance`` of it, the smallest (less waiting for a batch to fill,
        lower latency). On a CPU that is a small batch (attention's N x N maps leave the cache as the batch
        grows); on a GPU, a large one."""
        best = self.best_time_per_image(budget_s)
        return min(n for n, t in self._fitting(budget_s).items() if t / n <= best * (1 + tolerance))

    def best_time_per_image(self, budget_s: float) -> float:
        """The lowest time per image among the batch sizes within ``budget_s`` (the smallest batch's, when
        none is)."""
        return min(t / n for n, t in self._fitting(budget_s).items())

    def _fitting(self, budget_s: float) -> dict[int, float]:
        smallest = min(self.batch_s)
        return {n: t for n, t in self.batch_s.items() if t <= budget_s} or {smallest: self.batch_s[smallest]}


def warmup_batch_sizes(max_batch_size: int, every_size: bool = False) -> list[int]:
    """The batch shapes to run before ready. On CUDA every size the batcher can form (1..max), since cuDNN
    picks its algorithms per shape and the first batch of a new shape is slow; on the CPU, where nothing is
    tuned per shape, powers of two and the maximum cover the allocations."""
    if every_size:
        return list(range(1, max_batch_size + 1))
    sizes = [1]
    while sizes[-1] * 2 < max_batch_size:
        sizes.append(sizes[-1] * 2)
    if max_batch_size not in sizes:
        sizes.append(max_batch_size)
    return sizes
