"""One ONNX Runtime session per model version: providers (TensorRT, CUDA, CPU), the fallback check, IO
binding and CUDA graphs (:mod:`.binding`), warm-up.

The session is built by the artifact contract (:func:`deepvit.artifact.session.open_session`); ONNX Runtime
falls back from CUDA to CPU silently, so ``provider`` reports ``session.get_providers()`` after creation.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from deepvit.artifact import ATTENTION_NAME, INPUT_NAME, ArtifactError, ArtifactMetadata
from deepvit.artifact.batching import Warmup, warmup_batch_sizes
from deepvit.artifact.engines import CPU_ENGINE, ENGINES, OPENVINO, Engine
from deepvit.artifact.session import metadata_of, open_session, read_metadata

from .binding import BoundSession
from .config import Settings
from .errors import InferenceError

log = logging.getLogger("deepvit.runtime")


class LoadCancelledError(Exception):
    """The server began to drain while a model was being built: it is not put into service."""


class GpuRequiredError(Exception):
    """CUDA was required but the session runs on the CPU."""


@dataclass(frozen=True)
class Prediction:
    logits: np.ndarray  # (classes,) float32
    batch_size: int  # size of the ONNX Runtime call this image was part of
    attention: np.ndarray | None = None  # (grid * grid,) float32, when the artifact has the attention output


_preloaded = False


def _preload_cuda_libraries(ort: Any) -> None:
    """Load CUDA and cuDNN from the NVIDIA pip wheels when they are installed (onnxruntime >= 1.21), so a pip
    install without system CUDA still gets the GPU. Harmless without them: the check below reports fallback."""
    global _preloaded
    if _preloaded or not hasattr(ort, "preload_dlls"):
        return
    _preloaded = True
    try:
        ort.preload_dlls()
    except Exception as exc:  # a missing wheel is not an error here; the provider check decides
        log.debug("onnxruntime.preload_dlls() failed: %s", exc)


GPU_PROVIDERS = {"tensorrt": "TensorrtExecutionProvider", "cuda": "CUDAExecutionProvider"}
GPU_ENGINES = {provider: Engine(label, provider, "artifact", label) for label, provider in GPU_PROVIDERS.items()}


class ModelRuntime:
    def __init__(self, path: str | Path, settings: Settings) -> None:
        import onnxruntime as ort

        # A plugin engine (deepvit.artifact.engines) computes on the CPU in place of the provider list.
        plugin = ENGINES.get(settings.engine)
        plugin = plugin if plugin is not None and plugin.provider == OPENVINO else None
        if plugin is not None:
            settings = settings.model_copy(update={"providers": ["cpu"], "cuda_graph": False, "io_binding": False})
        if settings.gpu_providers:
            _preload_cuda_libraries(ort)
        self.path = Path(path)
        self.buckets = warmup_batch_sizes(settings.max_batch_size) if settings.pads_to_buckets else None
        shapes = None
        if "tensorrt" in settings.providers:  # its optimisation profile needs the input's shape
            crop = read_metadata(self.path).preprocess.crop_size
            sizes = self.buckets or [1, settings.max_batch_size]
            shapes = {n: f"{INPUT_NAME}:{n}x{crop}x{crop}x3" for n in sizes}
        self.cuda_graph = settings.cuda_graph
        self.session = self._open(settings, shapes, plugin)
        self.meta: ArtifactMetadata = metadata_of(self.session, str(self.path))
        self.provider = str(self.session.get_providers()[0])
        self.engine: Engine = plugin or GPU_ENGINES.get(self.provider, CPU_ENGINE)
        self.wanted = GPU_PROVIDERS[settings.gpu_providers[0]] if settings.gpu_providers else None
        if self.wanted is not None and self.provider != self.wanted:
            msg = (
                f"{self.path}: {self.wanted} was requested but ONNX Runtime runs this model on {self.provider} "
                f"(available providers: {sorted(ort.get_available_providers())}); check the GPU, the driver and "
                "the CUDA/cuDNN (and TensorRT) libraries onnxruntime-gpu needs"
            )
            if settings.require_gpu and self.provider == "CPUExecutionProvider":
                raise GpuRequiredError(msg + "; DEEPVIT_REQUIRE_GPU=true makes this fatal")
            log.warning(msg + f"; serving on {self.provider}", extra={"event": "provider_fallback"})
        self._check_io()
        self.input_name = self.session.get_inputs()[0].name
        self.has_attention = self.meta.attention is not None
        on_gpu = self.provider in GPU_PROVIDERS.values()
        self.cuda_graph = self.cuda_graph and self.provider == "CUDAExecutionProvider"
        self.bound: BoundSession | None = None
        if settings.binds_io:
            self.bound = BoundSession(
                self.session,
                self.meta.preprocess.crop_size,
                self.meta.num_classes,
                "cuda" if on_gpu else "cpu",
                settings.gpu_device_id,
                self.buckets,
                self.cuda_graph,
            )

    def _open(self, settings: Settings, shapes: dict[int, str] | None, engine: Engine | None) -> Any:
        def session(s: Settings) -> Any:
            return open_session(
                self.path,
                s.ort_providers(shapes),
                intra_op_threads=s.intra_op_threads,
                inter_op_threads=s.inter_op_threads,
                spinning=s.intra_op_spinning,
                engine=engine,
            )

        if not settings.cuda_graph:
            return session(settings)
        try:
            return session(settings)
        except ArtifactError as exc:
            # ONNX Runtime refuses CUDA graphs when any node is placed off CUDA (shape arithmetic on the CPU,
            # say): serve without them, and say so.
            log.warning(
                f"{self.path}: CUDA graphs are not possible for this model ({exc.message}); serving without them",
                extra={"event": "cuda_graph_unavailable"},
            )
            self.cuda_graph = False
            return session(settings.model_copy(update={"cuda_graph": False}))

    @property
    def provider_label(self) -> str:
        return self.engine.label

    @property
    def precision(self) -> str:
        """What it computes in: the artifact's precision, or its engine's (bf16)."""
        return self.engine.computes(self.meta)

    def _check_io(self) -> None:
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        crop = self.meta.preprocess.crop_size
        attention = self.meta.attention
        expected = 1 if attention is None else 2
        if len(inputs) != 1 or len(outputs) != expected:
            what = "logits" if attention is None else "logits and attention, as its metadata says"
            raise ArtifactError(
                f"{self.path}: expected one input and {expected} output{'s' if expected > 1 else ''} ({what}); "
                f"the graph has {len(inputs)} and {len(outputs)}"
            )
        if attention is not None:
            a, cells = outputs[1], attention.grid * attention.grid
            if a.name != ATTENTION_NAME or a.type != "tensor(float)" or len(a.shape) != 2 or a.shape[1] != cells:
                raise ArtifactError(
                    f"{self.path}: output {a.name} is {a.type} {a.shape}, expected {ATTENTION_NAME} float [N, {cells}]"
                )
        i, o = inputs[0], outputs[0]
        if i.type != "tensor(uint8)" or len(i.shape) != 4 or list(i.shape[1:]) != [crop, crop, 3]:
            raise ArtifactError(
                f"{self.path}: input {i.name} is {i.type} {i.shape}, expected uint8 [N, {crop}, {crop}, 3]"
            )
        if o.type != "tensor(float)" or len(o.shape) != 2 or o.shape[1] != self.meta.num_classes:
            raise ArtifactError(
                f"{self.path}: output {o.name} is {o.type} {o.shape}, expected float [N, {self.meta.num_classes}]"
            )

    def run_all(self, batch: np.ndarray) -> list[np.ndarray]:
        """uint8 (N, crop, crop, 3) → every output: float32 logits (N, classes), then the attention (N, grid²)
        where the artifact has it. ONNX Runtime computes every node of the graph whichever outputs are asked
        for (measured: asking for the logits alone is not faster), so the attention is always fetched."""
        try:
            if self.bound is not None:
                return self.bound.run_all(batch)
            outs = self.session.run(None, {self.input_name: batch})
        except Exception as exc:
            raise InferenceError(f"inference failed in ONNX Runtime on a batch of {len(batch)}: {exc}") from exc
        return [np.asarray(o, dtype=np.float32) for o in outs]

    def run(self, batch: np.ndarray) -> np.ndarray:
        """uint8 (N, crop, crop, 3) → float32 logits (N, classes)."""
        return self.run_all(batch)[0]

    def predict(self, images: Sequence[np.ndarray]) -> list[Prediction]:
        """The batcher's predict function: runs off the event loop."""
        batch = np.stack(images)
        if not self.has_attention:
            return [Prediction(row, len(images)) for row in self.run(batch)]
        logits, attention = self.run_all(batch)
        return [Prediction(row, len(images), att) for row, att in zip(logits, attention, strict=True)]

    def release_warmup_memory(self, batch_size: int) -> None:
        """Give back what the warm-up's largest batches left in ONNX Runtime's CPU arena, which keeps its
        high-water mark: one run at the serving batch size that shrinks the arena afterwards. A session that
        serves batches of one holds what they need, not what a batch of 32 needed once."""
        if self.provider != "CPUExecutionProvider" or self.bound is not None:
            return
        import onnxruntime as ort

        options = ort.RunOptions()
        options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
        crop = self.meta.preprocess.crop_size
        self.session.run(None, {self.input_name: np.zeros((batch_size, crop, crop, 3), np.uint8)}, options)

    def warmup(self, max_batch_size: int, cancelled: Callable[[], bool] = lambda: False) -> Warmup:
        """Run every batch shape twice, timing the second run (the first allocates and tunes); ``cancelled``
        is asked between shapes, so that a drain does not wait for a warm-up (tens of seconds for a large
        model on the CPU) whose model will never serve."""
        crop = self.meta.preprocess.crop_size
        started = time.perf_counter()
        timings: dict[int, float] = {}
        on_gpu = self.provider in GPU_PROVIDERS.values()
        # Padded batches only ever run at the buckets' shapes (and capture one CUDA graph each).
        sizes = [b for b in self.buckets if b <= max_batch_size] if self.buckets else None
        for n in sizes or warmup_batch_sizes(max_batch_size, every_size=on_gpu):
            if cancelled():
                raise LoadCancelledError(f"warm-up of {self.path} stopped: the server is shutting down")
            batch = np.random.default_rng(n).integers(0, 256, (n, crop, crop, 3), dtype=np.uint8)
            self.run(batch)
            t0 = time.perf_counter()
            self.run(batch)
            timings[n] = time.perf_counter() - t0
        return Warmup(time.perf_counter() - started, timings)
