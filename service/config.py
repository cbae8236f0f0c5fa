"""Settings: one pydantic-settings object, environment prefix ``DEEPVIT_``, built once at start-up and
passed down. Nothing reads the environment at import time."""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

Provider = Literal["tensorrt", "cuda", "cpu"]

PROVIDER_NAMES: dict[str, str] = {
    "tensorrt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "cpu": "CPUExecutionProvider",
}


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DEEPVIT_", extra="ignore", frozen=True)

    # Model repository: <repository>/<name>/<version>/model.onnx
    model_repository: Path = Field(Path("models"), description="root of the model repository")
    default_model: str | None = Field(None, description="model that /classify uses when none is named")
    version_policy: str = Field("latest:1", description="which versions to serve: latest:N, all, or specific:1,3")
    repository_poll_s: float = Field(0.0, ge=0, description="poll the repository every N s for changes (0: off)")
    repository_control: bool = Field(
        False, description="allow the repository extension's load and unload endpoints (no authentication of their own)"
    )

    host: str = Field("127.0.0.1", description="address to bind")
    port: int = Field(8000, ge=0, le=65535, description="port to bind")
    listen_backlog: int = Field(
        4096,
        ge=1,
        description="connections the kernel holds for the server to accept (capped by net.core.somaxconn): when a "
        "burst of new connections overflows it, their first bytes are dropped and resent a second or more later",
    )
    grpc_port: int = Field(
        8001, ge=0, le=65535, description="port of the Open Inference Protocol over gRPC, on the same address (0: off)"
    )

    # ONNX Runtime
    # NoDecode: the environment gives "cuda,cpu", not JSON.
    providers: Annotated[list[Provider], NoDecode] = Field(
        ["cuda", "cpu"], description="execution providers, in order of preference"
    )
    require_gpu: bool = Field(False, description="exit at start-up if CUDA is asked for but not used")
    engine: Literal["auto", "cpu", "openvino", "openvino-bf16"] = Field(
        "auto",
        description="the CPU's engine (execution provider and the precision it computes in): auto measures those "
        "this host offers and the artifact's gate allows and serves the fastest; a name fixes it (where the host "
        "or the gate refuses it: today's cpu, saying why, or fatal with require_engine)",
    )
    require_engine: bool = Field(False, description="exit at start-up if the engine set is not the one computing")
    gpu_device_id: int = Field(0, ge=0, description="CUDA device for the sessions")
    cudnn_conv_algo_search: Literal["HEURISTIC", "EXHAUSTIVE", "DEFAULT"] = Field(
        "HEURISTIC", description="cuDNN convolution algorithm search (EXHAUSTIVE stalls the first batches)"
    )
    gpu_mem_limit_bytes: int = Field(0, ge=0, description="CUDA memory arena cap (0: no cap)")
    arena_extend_strategy: Literal["kNextPowerOfTwo", "kSameAsRequested"] = Field(
        "kSameAsRequested", description="how the CUDA arena grows"
    )
    io_binding: bool = Field(
        False, description="bind a preallocated input buffer and the outputs per batch size (one copy to the device)"
    )
    pad_to_buckets: bool = Field(
        False, description="pad each batch up to the next warm-up shape, so that only those shapes ever run"
    )
    cuda_graph: bool = Field(
        False, description="CUDA graphs, one per warm-up shape (implies io_binding and pad_to_buckets; CUDA only)"
    )
    tensorrt_cache_dir: Path | None = Field(
        None, description="writable directory for TensorRT's engine and timing caches (provider tensorrt)"
    )
    tensorrt_fp16: bool = Field(True, description="let TensorRT run layers in fp16 (provider tensorrt)")
    intra_op_threads: int = Field(0, ge=0, description="ONNX Runtime intra-op threads (0: its default)")
    inter_op_threads: int = Field(1, ge=0, description="ONNX Runtime inter-op threads")
    intra_op_spinning: bool = Field(
        False,
        description="let ONNX Runtime's pool threads spin on after a run, its default: a session over several cores "
        "then keeps them busy some 25 ms after each run (off: they spin only while a run lasts)",
    )
    warmup: bool = Field(True, description="run every batch size once before reporting ready")
    instances: int = Field(
        0, ge=0, le=64, description="ONNX Runtime sessions per model version sharing its queue (0: by measurement)"
    )

    # Dynamic batching
    max_batch_size: int = Field(32, ge=1, le=1024, description="most images in one ONNX Runtime call")
    max_queue_delay_ms: float = Field(5.0, ge=0, description="longest wait for a batch to fill after its first image")
    max_queue_size: int = Field(256, ge=1, description="queued images per model before 503")
    request_timeout_s: float = Field(
        10.0, gt=0, description="deadline of a request from its complete body; queued past it: 504"
    )

    # Admission over the whole pipeline (service/admission.py)
    admission_max_wait_s: float = Field(
        0.0, ge=0, description="refuse (503) a request whose estimated wait exceeds this (0: half the request timeout)"
    )
    max_pending_images: int = Field(
        512, ge=1, description="most images admitted and not yet answered, decoding included (then 503)"
    )
    header_timeout_s: float = Field(
        20.0, gt=0, description="longest a request's head (request line and headers) may take to arrive (then 408)"
    )
    body_timeout_s: float = Field(
        30.0, gt=0, description="longest a request body may take to arrive (then 408): slow clients are cut off"
    )

    # Input limits
    max_body_bytes: int = Field(20 * 1024 * 1024, ge=1, description="largest request body")
    max_upload_bytes: int = Field(
        0,
        ge=0,
        description="bytes request bodies may hold at once, over all requests, reserved from their Content-Length "
        "before they are read (then 503); 0: an eighth of the memory limit, between the largest body and 512 MiB "
        "(256 MiB where no limit is known)",
    )
    max_uploads: int = Field(256, ge=1, description="request bodies in transit at once (then 503)")
    memory_limit_bytes: int = Field(
        0,
        ge=0,
        description="memory the process may hold, which the memory budget must fit (0: the container's limit, "
        "from its cgroup; none: the budget is reported, not enforced)",
    )
    max_json_body_bytes: int = Field(
        8 * 1024 * 1024, ge=1, description="largest JSON of a /v2 inference request, decompressed (JSON tensors)"
    )
    max_image_pixels: int = Field(40_000_000, ge=1, description="largest width x height of one image")
    max_request_pixels: int = Field(
        250_000_000, ge=1, description="largest width x height of all the images of one request together"
    )
    max_aspect_ratio: float = Field(
        20.0, ge=1, description="largest long side / short side of one image (the resize cost grows with it)"
    )
    max_images_per_request: int = Field(64, ge=1, description="most images in one multipart request")
    decode_threads: int = Field(0, ge=0, description="threads for image decoding (0: CPU count)")
    jpeg_draft: bool = Field(
        False,
        description="decode JPEGs at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling, never below the resize's "
        "size): far cheaper decoding of large photographs, pixels slightly off the reference transform",
    )
    worker_niceness: int = Field(
        0, ge=0, le=19, description="nice value of the decode and inference threads (above 0: the event loop first)"
    )
    max_decode_memory_bytes: int = Field(
        512 * 1024 * 1024,
        ge=1,
        description="memory image decoding may hold at once, over all requests (8 bytes per pixel claimed)",
    )

    # Operations
    log_format: Literal["json", "text"] = Field("json", description="access and event log format")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="log level")
    grace_period_s: float = Field(30.0, ge=0, description="longest drain on SIGTERM before exiting")

    @field_validator("providers", mode="before")
    @classmethod
    def _split_providers(cls, v: object) -> object:
        if isinstance(v, str):
            return [p.strip().lower() for p in v.split(",") if p.strip()]
        return v

    @field_validator("providers")
    @classmethod
    def _providers_not_empty(cls, v: list[Provider]) -> list[Provider]:
        if not v:
            raise ValueError("at least one provider is needed (tensorrt, cuda, cpu)")
        if len(set(v)) != len(v):
            raise ValueError("a provider is listed twice")
        return v

    @field_validator("version_policy")
    @classmethod
    def _policy(cls, v: str) -> str:
        parse_version_policy(v)
        return v

    @model_validator(mode="after")
    def _gpu_consistent(self) -> Settings:
        if self.require_gpu and not self.gpu_providers:
            raise ValueError("require_gpu is set but neither cuda nor tensorrt is among the providers")
        if self.require_engine and self.engine == "auto":
            raise ValueError("require_engine is set but no engine is named (engine=auto)")
        if self.cuda_graph and "cuda" not in self.providers:
            raise ValueError("cuda_graph is set but cuda is not among the providers")
        if self.max_decode_memory_bytes < 8 * self.max_image_pixels:
            raise ValueError(
                f"max_decode_memory_bytes ({self.max_decode_memory_bytes}) must hold the largest image allowed: "
                f"8 bytes x max_image_pixels ({self.max_image_pixels}) = {8 * self.max_image_pixels}"
            )
        if self.max_upload_bytes and self.max_upload_bytes < self.max_body_bytes:
            raise ValueError(
                f"max_upload_bytes ({self.max_upload_bytes}) must hold the largest body allowed "
                f"(max_body_bytes, {self.max_body_bytes})"
            )
        if self.max_queue_size < max(self.max_batch_size, self.max_images_per_request):
            raise ValueError(
                f"max_queue_size ({self.max_queue_size}) must hold at least one full batch "
                f"({self.max_batch_size}) and one full request ({self.max_images_per_request} images)"
            )
        return self

    @property
    def gpu_providers(self) -> list[str]:
        return [p for p in self.providers if p != "cpu"]

    @property
    def binds_io(self) -> bool:
        return self.io_binding or self.cuda_graph

    @property
    def pads_to_buckets(self) -> bool:
        return self.pad_to_buckets or self.cuda_graph

    @property
    def admission_wait_s(self) -> float:
        return self.admission_max_wait_s or self.request_timeout_s / 2

    @property
    def batch_budget_s(self) -> float:
        """The longest one batch may compute for the warm-up's choice of batch size: an eighth of the
        deadline, so that a request can wait for a batch or two and still be answered in time."""
        return self.request_timeout_s / 8

    @property
    def max_queue_delay_s(self) -> float:
        return self.max_queue_delay_ms / 1000.0

    def ort_providers(self, input_shapes: dict[int, str] | None = None) -> list[str | tuple[str, dict[str, str]]]:
        """ONNX Runtime's provider list. ``input_shapes`` (batch size → the input's ``name:NxHxWxC``) gives
        TensorRT its optimisation profile: the smallest and largest warm-up shapes, optimised for the largest."""
        out: list[str | tuple[str, dict[str, str]]] = []
        for p in self.providers:
            if p == "tensorrt":
                trt = {"device_id": str(self.gpu_device_id), "trt_fp16_enable": str(self.tensorrt_fp16)}
                if self.tensorrt_cache_dir is not None:
                    cache = str(self.tensorrt_cache_dir)
                    trt |= {"trt_engine_cache_enable": "True", "trt_engine_cache_path": cache}
                    trt |= {"trt_timing_cache_enable": "True", "trt_timing_cache_path": cache}
                if input_shapes:
                    sizes = sorted(input_shapes)
                    trt["trt_profile_min_shapes"] = input_shapes[sizes[0]]
                    trt["trt_profile_opt_shapes"] = input_shapes[sizes[-1]]
                    trt["trt_profile_max_shapes"] = input_shapes[sizes[-1]]
                out.append((PROVIDER_NAMES[p], trt))
            elif p == "cuda":
                opts = {
                    "device_id": str(self.gpu_device_id),
                    "cudnn_conv_algo_search": self.cudnn_conv_algo_search,
                    "arena_extend_strategy": self.arena_extend_strategy,
                }
                if self.gpu_mem_limit_bytes:
                    opts["gpu_mem_limit"] = str(self.gpu_mem_limit_bytes)
                if self.cuda_graph:
                    opts["enable_cuda_graph"] = "1"
                out.append((PROVIDER_NAMES[p], opts))
            else:
                out.append(PROVIDER_NAMES[p])
        return out


def parse_version_policy(policy: str) -> tuple[str, int | tuple[int, ...] | None]:
    """``latest:N`` | ``all`` | ``specific:1,3`` -> (kind, argument)."""
    kind, _, arg = policy.strip().partition(":")
    try:
        if kind == "all" and not arg:
            return "all", None
        if kind == "latest":
            n = int(arg or "1")
            if n >= 1:
                return "latest", n
        if kind == "specific":
            versions = tuple(int(v) for v in arg.split(",") if v.strip())
            if versions and all(v >= 1 for v in versions):
                return "specific", versions
    except ValueError:
        pass
    raise ValueError(f"version policy {policy!r}: use latest:N, all, or specific:1,3")


def unknown_environment(environ: Mapping[str, str]) -> list[str]:
    """``DEEPVIT_*`` variables that are no setting (a typo is otherwise silently ignored), with the closest
    setting's name when one is close."""
    known = {f"DEEPVIT_{name.upper()}" for name in Settings.model_fields}
    out = []
    for var in sorted(v for v in environ if v.upper().startswith("DEEPVIT_") and v.upper() not in known):
        close = difflib.get_close_matches(var.upper(), known, n=1, cutoff=0.85)
        out.append(f"{var} is not a setting" + (f" (did you mean {close[0]}?)" if close else ""))
    return out
