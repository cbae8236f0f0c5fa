"""Metric adapters for the batchers of the served versions (the batcher itself knows nothing of Prometheus)."""

from __future__ import annotations

from collections.abc import Sequence

from ..metrics import Metrics


class QueueDepth:
    """``deepvit_queue_depth{model}``: the images queued for a model, over all its versions. Several versions
    batch at once (``latest:N``, or the old one draining during a swap), each batcher reporting its own depth;
    the series is their sum, not the last report."""

    def __init__(self, metrics: Metrics, model: str) -> None:
        self._gauge = metrics.queue_depth.labels(model)
        self._depths: dict[object, int] = {}  # reporting batcher's observer -> its depth

    def report(self, source: object, depth: int) -> None:
        self._depths[source] = depth
        self._gauge.set(sum(self._depths.values()))

    def forget(self, source: object) -> None:
        if self._depths.pop(source, None) is not None:
            self._gauge.set(sum(self._depths.values()))


class BatchMetrics:
    """Adapts one version's batcher's observer hooks to Prometheus."""

    def __init__(self, metrics: Metrics, model: str, depth: QueueDepth) -> None:
        self._depth = depth
        self._wait = metrics.queue_wait.labels(model)
        self._inference = metrics.inference.labels(model)
        self._batch = metrics.batch_size.labels(model)

    def queue_depth(self, depth: int) -> None:
        self._depth.report(self, depth)

    def release(self) -> None:
        """The batcher is closed: its queue no longer counts."""
        self._depth.forget(self)

    def batch_done(self, size: int, queue_waits: Sequence[float], compute_s: float) -> None:
        for w in queue_waits:
            self._wait.observe(w)
        self._inference.observe(compute_s)
        self._batch.observe(size)

    def expired(self, queue_wait: float) -> None:
        # The autoscaler reads the mean queue wait: leaving out the items that waited longest would make an
        # overloaded server look idle.
        self._wait.observe(queue_wait)
