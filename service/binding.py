"""IO binding: one preallocated input buffer and bound outputs per batch-size bucket, reused every batch.

Without it ``session.run`` allocates the input on the device, copies it, allocates the output and copies
it back, per batch. With it a batch is written into the bucket's host buffer, copied to the device once
(``OrtValue.update_inplace``; on the CPU the session reads the host buffer itself), and ONNX Runtime writes
the logits (and the attention, where the artifact has it) into the bucket's bound outputs. CUDA graphs
need exactly this (fixed addresses, fixed shapes):
a batch is padded up to its bucket (the warm-up shapes) and each bucket replays its own captured graph
(``gpu_graph_id``; ONNX Runtime's CUDA graph documentation).
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass
class _Slot:
    host: np.ndarray  # (bucket, crop, crop, 3) uint8: the batch is copied in here, the rest zero
    device_input: Any  # the OrtValue the session reads (on the CPU: a view of ``host``)
    outputs: list[Any]  # the bound OrtValues ONNX Runtime writes every output into, in the graph's order
    binding: Any
    run_options: Any


def bucket_for(n: int, buckets: Sequence[int]) -> int:
    """The smallest bucket that holds ``n`` images; over the largest, ``n`` itself (never truncated)."""
    i = bisect.bisect_left(buckets, n)
    return buckets[i] if i < len(buckets) else n


class BoundSession:
    """``run(batch)`` as ``session.run`` would answer it, through IO binding. ``buckets`` (sorted) pads
    each batch up to its bucket; None runs every batch at its own size (a slot per size seen)."""

    def __init__(
        self,
        session: Any,
        crop: int,
        num_classes: int,
        device: str,
        device_id: int = 0,
        buckets: Sequence[int] | None = None,
        cuda_graph: bool = False,
    ) -> None:
        self.session = session
        self.input_name = session.get_inputs()[0].name
        # Every output is (N, width): the logits' width is the class count, the others' the graph's own.
        outs = session.get_outputs()
        self.outputs = [(o.name, num_classes if i == 0 else int(o.shape[1])) for i, o in enumerate(outs)]
        self.crop, self.num_classes = crop, num_classes
        self.device, self.device_id = device, device_id
        self.buckets = sorted(buckets) if buckets else None
        self.cuda_graph = cuda_graph
        self._slots: dict[int, _Slot] = {}
        self._lock = threading.Lock()  # a slot's buffers belong to one batch at a time

    def size_for(self, n: int) -> int:
        return bucket_for(n, self.buckets) if self.buckets else n

    def _slot(self, size: int) -> _Slot:
        import onnxruntime as ort

        if (slot := self._slots.get(size)) is not None:
            return slot
        host = np.zeros((size, self.crop, self.crop, 3), dtype=np.uint8)
        binding = self.session.io_binding()
        if self.device == "cpu":
            device_input = ort.OrtValue.ortvalue_from_numpy(host)  # shares the host buffer: no copy
        else:
            device_input = ort.OrtValue.ortvalue_from_shape_and_type(host.shape, np.uint8, self.device, self.device_id)
        outputs = [
            ort.OrtValue.ortvalue_from_shape_and_type((size, width), np.float32, self.device, self.device_id)
            for _, width in self.outputs
        ]
        binding.bind_ortvalue_input(self.input_name, device_input)
        for (name, _), output in zip(self.outputs, outputs, strict=True):
            binding.bind_ortvalue_output(name, output)
        run_options = ort.RunOptions()
        if self.cuda_graph:
            # One graph per bucket; ids are consecutive from 0 in the order the buckets are first run.
            run_options.add_run_config_entry("gpu_graph_id", str(len(self._slots)))
        slot = _Slot(host, device_input, outputs, binding, run_options)
        self._slots[size] = slot
        return slot

    def run_all(self, batch: np.ndarray) -> list[np.ndarray]:
        """uint8 (N, crop, crop, 3) → every output for the N images (the logits first), copies the caller owns."""
        n = len(batch)
        with self._lock:
            slot = self._slot(self.size_for(n))
            slot.host[:n] = batch
            slot.host[n:] = 0  # padding: a constant image, whose outputs are dropped
            if self.device != "cpu":
                slot.device_input.update_inplace(slot.host)  # the one host→device copy
            self.session.run_with_iobinding(slot.binding, slot.run_options)
            return [np.asarray(o.numpy()[:n]).copy() for o in slot.outputs]

    def run(self, batch: np.ndarray) -> np.ndarray:
        """uint8 (N, crop, crop, 3) → float32 logits (N, classes), a copy the caller owns."""
        return self.run_all(batch)[0]
