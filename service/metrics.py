"""Prometheus metrics in an explicit registry (no global state, so tests and several apps don't collide).

Names and labels are a contract (docs/architecture.md, Metrics): dashboards and alerts use them. Buckets are
chosen for this workload: preprocessing and CPU/GPU batches run from sub-millisecond to seconds.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

# Sub-millisecond to 10 s: a tiny model's batch on a GPU to a large batch of deepvit_L on a CPU.
LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 256)

CONTENT_TYPE = CONTENT_TYPE_LATEST
REJECTION_REASONS = (
    "overloaded",
    "queue_full",
    "draining",
    "deadline",
    "not_ready",
    "unloading",
    "body_too_large",
    "header_timeout",
    "body_timeout",
)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        self.http_requests = Counter(
            "deepvit_http_requests", "HTTP requests answered", ["route", "method", "status"], registry=r
        )
        self.request_duration = Histogram(
            "deepvit_request_duration_seconds",
            "Time from request start to response, per route",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.preprocess = Histogram(
            "deepvit_preprocess_seconds",
            "Decode, resize and crop of one image",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "deepvit_queue_wait_seconds",
            "Time an image waited in the batching queue before its batch started",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.inference = Histogram(
            "deepvit_inference_seconds",
            "ONNX Runtime time of one batch",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "deepvit_batch_size", "Images per ONNX Runtime call", ["model"], buckets=BATCH_BUCKETS, registry=r
        )
        self.queue_depth = Gauge("deepvit_queue_depth", "Images waiting to be batched", ["model"], registry=r)
        self.inflight = Gauge(
            "deepvit_inflight_requests",
            "Inference requests whose body is in, until answered (uploads, probes and scrapes not counted)",
            registry=r,
        )
        self.images = Counter(
            "deepvit_images",
            "Images classified (a failed batch or non-finite logits count no image)",
            ["model"],
            registry=r,
        )
        self.rejected = Counter(
            "deepvit_rejected_requests",
            "Requests refused before inference, by reason",
            ["reason"],
            registry=r,
        )
        # Known reasons exist at 0 from the start, so rate() sees the first rejection.
        for reason in REJECTION_REASONS:
            self.rejected.labels(reason)
        self.model_ready = Gauge(
            "deepvit_model_ready", "1 when the model version serves traffic", ["model", "version"], registry=r
        )
        self.model_info = Gauge(
            "deepvit_model_info",
            "Loaded model versions: provider actually used, precision, weights (random_init = untrained)",
            ["model", "version", "provider", "precision", "weights"],
            registry=r,
        )
        self.model_load_failures = Counter(
            "deepvit_model_load_failures",
            "Model versions that failed to load",
            ["model", "version"],
            registry=r,
        )
        self.draining = Gauge("deepvit_draining", "1 while the server drains before exiting", registry=r)
        self.max_batch_size = Gauge(
            "deepvit_max_batch_size",
            "Most images in one ONNX Runtime call: measured at warm-up unless DEEPVIT_MAX_BATCH_SIZE fixes it",
            ["model", "version"],
            registry=r,
        )
        self.instances = Gauge(
            "deepvit_instances",
            "ONNX Runtime sessions of a model version sharing its queue: measured unless DEEPVIT_INSTANCES is set",
            ["model", "version"],
            registry=r,
        )
        # The gRPC front end's calls (service/grpc/): their own families, as HTTP's are by route and status;
        # everything from the pipeline on (queue, batches, images, rejections) is shared by both protocols.
        self.grpc_requests = Counter(
            "deepvit_grpc_requests", "gRPC calls answered, by method and status code", ["method", "code"], registry=r
        )
        self.grpc_duration = Histogram(
            "deepvit_grpc_request_duration_seconds",
            "Time from a gRPC call's start to its answer, per method",
            ["method"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        # Admission (service/admission.py), read at each scrape.
        self.pending_images = Gauge(
            "deepvit_pending_images", "Images admitted and not yet answered, decoding included", registry=r
        )
        self.estimated_wait = Gauge(
            "deepvit_admission_estimated_wait_seconds",
            "Estimated wait of a new one-image request (pending images times the measured cost of one)",
            registry=r,
        )
        self.image_cost = Gauge(
            "deepvit_admission_image_seconds",
            "Measured time per image of the whole pipeline while busy (moving average)",
            registry=r,
        )

        # Request bodies (service/bodies.py) and the memory budget (service/budget.py), read at each scrape.
        self.upload_bytes = Gauge(
            "deepvit_upload_bytes", "Bytes reserved by request bodies being uploaded or still in use", registry=r
        )
        self.uploads_in_transit = Gauge(
            "deepvit_uploads_in_transit", "Request bodies not yet wholly received", registry=r
        )
        self.memory_budget = Gauge(
            "deepvit_memory_budget_bytes",
            "The memory budget's parts (process, sessions, decode, uploads); their sum must fit the limit",
            ["part"],
            registry=r,
        )
        self.memory_limit = Gauge(
            "deepvit_memory_limit_bytes", "The memory limit the budget is checked against (0: none known)", registry=r
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
