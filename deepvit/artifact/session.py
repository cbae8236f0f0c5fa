"""ONNX Runtime sessions over an artifact: the one place they are built, for the service, verify and evaluate.

ONNX Runtime falls back from CUDA to CPU silently when the CUDA libraries are missing; the only trustworthy
answer is ``session.get_providers()`` after creation, which callers that asked for CUDA must check.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .engines import Engine, add_engine
from .errors import ArtifactError
from .metadata import ArtifactMetadata

# A provider by name, or (name, options) as ONNX Runtime takes it.
Provider = str | tuple[str, dict[str, Any]]
CPU: tuple[Provider, ...] = ("CPUExecutionProvider",)


def providers_for(name: str) -> tuple[Provider, ...]:
    """``cuda`` (falling back to the CPU) or ``cpu``, as the command line says it."""
    return ("CUDAExecutionProvider", *CPU) if name == "cuda" else CPU


def open_session(
    model: str | Path | bytes,
    providers: Sequence[Provider] = CPU,
    *,
    intra_op_threads: int = 0,
    inter_op_threads: int = 0,
    optimize: bool = True,
    spinning: bool = True,
    engine: Engine | None = None,
) -> Any:
    """An ``onnxruntime.InferenceSession``; providers that this onnxruntime lacks are left out (the CPU always
    remains). Anything ONNX Runtime cannot load is an ArtifactError with its first line.

    ``spinning=False``: the session's pool threads stop spinning when a run ends (they still spin between the
    parallel sections of a run, where it saves their wake-ups). ONNX Runtime's default spins them on for some
    25 ms after every run: a core busy for nothing while a server waits for its next request.

    ``engine`` (:mod:`.engines`): a plugin execution provider, such as OpenVINO's, in place of ``providers``
    (with the CPU provider for any node it does not take), computing over ``intra_op_threads`` cores."""
    import onnxruntime as ort

    source = "the ONNX model" if isinstance(model, bytes) else str(model)
    if not isinstance(model, bytes):
        if not Path(model).is_file():
            raise ArtifactError(f"{model} does not exist or is not a file")
        model = str(model)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    opts.intra_op_num_threads = intra_op_threads
    opts.inter_op_num_threads = inter_op_threads
    if not spinning:
        opts.add_session_config_entry("session.force_spinning_stop", "1")
    available = set(ort.get_available_providers())
    usable = [p for p in providers if (p[0] if isinstance(p, tuple) else p) in available] or list(CPU)
    plugin = engine is not None and add_engine(opts, engine, intra_op_threads)
    try:
        if plugin:
            return ort.InferenceSession(model, sess_options=opts)
        return ort.InferenceSession(model, sess_options=opts, providers=usable)
    except Exception as exc:  # onnxruntime's exception types are not part of its public API
        first = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
        raise ArtifactError(f"{source} is not a loadable ONNX model: {first}") from None


def metadata_of(session: Any, source: str) -> ArtifactMetadata:
    return ArtifactMetadata.from_props(dict(session.get_modelmeta().custom_metadata_map), source)


def read_metadata(path: str | Path) -> ArtifactMetadata:
    """An artifact's metadata, read through ONNX Runtime without optimising or running the graph."""
    return metadata_of(open_session(path, optimize=False), str(path))
