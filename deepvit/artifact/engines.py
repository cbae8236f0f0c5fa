"""Engines: an execution provider and the precision it computes in, and which of them a host offers and an
artifact's gates allow. The service chooses among them by measurement, ``deepvit export`` and ``verify``
gate the reduced ones; both ask this module, so that they cannot disagree on what an engine is.

- ``cpu``: ONNX Runtime's CPU execution provider, in the artifact's own precision (today's path; always there);
- ``openvino``: ONNX Runtime's OpenVINO execution provider (the ``onnxruntime-ep-openvino`` plugin) on
  the CPU, in the artifact's precision (``INFERENCE_PRECISION_HINT`` f32: OpenVINO's default on a CPU with
  AMX is bf16; an int8 QDQ graph computes in int8);
- ``openvino-bf16``: the same in bf16, on the CPU's matrix engine (AMX, or AVX-512 BF16). A reduced precision:
  served only for an artifact whose gate passed for it (:func:`gate_verdict`). Offered where OpenVINO reports
  the CPU's BF16 capability; elsewhere OpenVINO emulates bf16 some 20 times slower than float32 (measured on
  an AVX-512 Xeon without it), which only a gate on a small model may ask for (``emulated=True``).

One scheduler: each session gets OpenVINO's ``INFERENCE_NUM_THREADS`` = the session's threads and one stream,
without pinning, so that the service's instances × threads decide how the cores are shared, as with the CPU
provider; OpenVINO's own streams and its throughput hint would schedule a second time behind them.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass, field
from typing import Any

from .metadata import ArtifactMetadata

OPENVINO = "OpenVINOExecutionProvider"
PLUGIN = "onnxruntime_ep_openvino"


@dataclass(frozen=True)
class Engine:
    name: str
    provider: str  # ONNX Runtime's execution provider
    precision: str  # what it computes in: "fp32", "bf16", or "artifact" (the artifact's own precision)
    label: str  # the provider as deepvit_model_info and the demo page name it

    @property
    def reduced(self) -> bool:
        """Computes in a precision below the artifact's float32: gated on natural images."""
        return self.precision == "bf16"

    def computes(self, meta: ArtifactMetadata) -> str:
        return meta.precision if self.precision == "artifact" else self.precision


CPU_ENGINE = Engine("cpu", "CPUExecutionProvider", "artifact", "cpu")
OPENVINO_ENGINE = Engine("openvino", OPENVINO, "artifact", "openvino")
OPENVINO_BF16 = Engine("openvino-bf16", OPENVINO, "bf16", "openvino")
ENGINES = {e.name: e for e in (CPU_ENGINE, OPENVINO_ENGINE, OPENVINO_BF16)}
REDUCED = tuple(e for e in ENGINES.values() if e.reduced)


@dataclass(frozen=True)
class HostEngines:
    """The engines this host offers, and why each other one is not offered here."""

    offered: tuple[Engine, ...]
    absent: dict[str, str] = field(default_factory=dict)


_lock = threading.Lock()
_device: tuple[Any, dict[str, str]] | None = None
_device_error: str | None = None


def openvino_device() -> tuple[Any, dict[str, str]] | str:
    """The OpenVINO plugin's CPU device for ONNX Runtime and what OpenVINO says of it (registered once per
    process), or why there is none."""
    global _device, _device_error
    with _lock:
        if _device is not None:
            return _device
        if _device_error is not None:
            return _device_error
        try:
            import onnxruntime as ort
        except ImportError:
            _device_error = "onnxruntime is not installed"
            return _device_error
        try:
            import onnxruntime_ep_openvino as plugin
        except ImportError:
            _device_error = f"the OpenVINO execution provider plugin is not installed (pip install {PLUGIN})"
            return _device_error
        try:
            if not hasattr(ort, "register_execution_provider_library"):
                raise RuntimeError(f"onnxruntime {ort.__version__} loads no plugin execution providers (1.23+ does)")
            registered = [d for d in ort.get_ep_devices() if d.ep_name == plugin.get_ep_name()]
            if not registered:
                ort.register_execution_provider_library("openvino", plugin.get_library_path())
                registered = [d for d in ort.get_ep_devices() if d.ep_name == plugin.get_ep_name()]
            cpus = [d for d in registered if d.ep_metadata.get("ov_device") == "CPU"]
            if not cpus:
                raise RuntimeError("OpenVINO found no CPU device")
        except Exception as exc:  # a plugin that does not load is the host's, not the artifact's, problem
            _device_error = f"the OpenVINO plugin did not load: {str(exc).splitlines()[0] if str(exc) else exc!r}"
            return _device_error
        _device = (cpus[0], dict(cpus[0].ep_metadata))
        return _device


def host_engines(emulated: bool = False) -> HostEngines:
    """What this host offers. ``emulated``: bf16 also where the CPU has no BF16 capability (slow; gates only)."""
    found = openvino_device()
    if isinstance(found, str):
        return HostEngines((CPU_ENGINE,), {e.name: found for e in ENGINES.values() if e.provider == OPENVINO})
    capabilities = found[1].get("OPTIMIZATION_CAPABILITIES", "").split()
    if "BF16" in capabilities or emulated:
        return HostEngines((CPU_ENGINE, OPENVINO_ENGINE, OPENVINO_BF16))
    why = (
        f"OpenVINO reports no BF16 capability on this CPU (no AMX or AVX-512 BF16; it has {' '.join(capabilities)}): "
        "bf16 would be emulated, slower than float32"
    )
    return HostEngines((CPU_ENGINE, OPENVINO_ENGINE), {OPENVINO_BF16.name: why})


def gate_verdict(meta: ArtifactMetadata, engine: Engine) -> tuple[bool, str]:
    """Whether ``engine`` may compute this artifact, and why: a reduced precision only where the artifact's
    gate for that engine passed (random weights: recorded, not enforced); OpenVINO computes a float32 graph,
    or a reduced one whose own gate ran on it (int8 by NNCF); the CPU provider, what export gated."""
    if engine.provider == OPENVINO and meta.precision != "fp32":
        if engine.reduced or meta.accuracy.get("engine") != engine.name:
            where = meta.accuracy.get("engine") or "the CPU provider"
            return False, f"the artifact is {meta.precision}, gated on {where}, not on {engine.name}"
        return True, f"its {meta.precision} gate ran on {engine.name} at export"
    if not engine.reduced:
        return True, f"{meta.precision}: gated at export"
    gate = meta.engine_gates.get(engine.name)
    if not isinstance(gate, dict) or "passed" not in gate:
        return False, f"the artifact records no {engine.precision} gate for {engine.name} (export or verify it there)"
    figures = f"top-1 agreement {float(gate.get('top1_agreement', 0.0)):.2%} on natural images"
    if gate["passed"]:
        return True, f"its {engine.precision} gate passed ({figures})"
    if meta.untrained:
        return True, f"its {engine.precision} gate failed ({figures}) but is not enforced: random weights"
    return False, f"its {engine.precision} gate failed ({figures})"


@dataclass(frozen=True)
class Candidates:
    """The engines that may compute an artifact on this host, and why each other one may not: the service
    and ``deepvit predict`` choose among the same."""

    engines: tuple[Engine, ...]
    refused: dict[str, str] = field(default_factory=dict)


def candidates(meta: ArtifactMetadata, host: HostEngines) -> Candidates:
    allowed, refused = [], dict(host.absent)
    for engine in host.offered:
        ok, why = gate_verdict(meta, engine)
        if ok:
            allowed.append(engine)
        else:
            refused[engine.name] = why
    return Candidates(tuple(allowed), refused)


def load_config(engine: Engine, threads: int) -> dict[str, str]:
    """The OpenVINO CPU plugin's configuration for one session over ``threads`` cores (0: all)."""
    return {
        "INFERENCE_PRECISION_HINT": "bf16" if engine.precision == "bf16" else "f32",
        "INFERENCE_NUM_THREADS": str(threads or len(os.sched_getaffinity(0))),
        "NUM_STREAMS": "1",
        "ENABLE_CPU_PINNING": "NO",  # one-thread instances side by side must not be pinned to the same core
    }


def add_engine(options: Any, engine: Engine, threads: int) -> bool:
    """Put ``engine`` into ONNX Runtime ``SessionOptions``; False where it is ONNX Runtime's own provider
    (the session's provider list decides)."""
    if engine.provider != OPENVINO:
        return False
    found = openvino_device()
    if isinstance(found, str):
        raise RuntimeError(f"engine {engine.name} is not available: {found}")
    options.add_provider_for_devices([found[0]], {"load_config": json.dumps({"CPU": load_config(engine, threads)})})
    return True
