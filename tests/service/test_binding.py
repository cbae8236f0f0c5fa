"""The GPU path's code on the CPU provider: IO binding (preallocated buffers, bound outputs), batches padded
to their bucket, CUDA graph and TensorRT settings, and a provider fallback that is reported, not silent."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from deepvit.artifact.session import open_session
from deepvit.service.binding import BoundSession, bucket_for
from deepvit.service.config import Settings
from deepvit.service.runtime import ModelRuntime


def images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


def test_bucket_is_the_smallest_that_holds_the_batch() -> None:
    buckets = [1, 2, 4, 8, 16, 32]
    assert [bucket_for(n, buckets) for n in (1, 2, 3, 5, 8, 9, 32)] == [1, 2, 4, 8, 8, 16, 32]
    assert bucket_for(33, buckets) == 33  # over the largest: run as it is, never truncated


@pytest.mark.parametrize("buckets", [None, [1, 2, 4, 8]], ids=["own-size", "padded"])
def test_bound_session_answers_as_session_run_and_reuses_its_buffers(
    exported_tiny_patch: Path, buckets: list[int] | None
) -> None:
    session = open_session(exported_tiny_patch)
    bound = BoundSession(session, 32, 10, "cpu", buckets=buckets)
    for n in (1, 3, 5, 3, 8, 11):
        x = images(n, seed=n)
        (want,) = session.run(None, {"image": x})
        got = bound.run(x)
        assert got.shape == (n, 10)
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)  # padding never leaks into the answers
    # One slot per shape that ran: 1, 3, 5, 8, 11 each at their own size; padded, the buckets 1, 4, 8 and 11.
    assert sorted(bound._slots) == ([1, 3, 5, 8, 11] if buckets is None else [1, 4, 8, 11])
    host = bound._slots[8].host
    bound.run(images(7))
    assert bound._slots[8].host is host  # the same buffer, batch after batch


def test_the_caller_owns_the_logits(exported_tiny_patch: Path) -> None:
    bound = BoundSession(open_session(exported_tiny_patch), 32, 10, "cpu")
    first = bound.run(images(2, seed=1))
    kept = first.copy()
    bound.run(images(2, seed=2))  # the next batch overwrites the bound output, not what was returned
    np.testing.assert_array_equal(first, kept)


def test_runtime_with_io_binding_and_buckets_warms_only_the_buckets(exported_tiny_patch: Path) -> None:
    plain = ModelRuntime(exported_tiny_patch, Settings(providers=["cpu"]))
    settings = Settings(providers=["cpu"], io_binding=True, pad_to_buckets=True, max_batch_size=8)
    rt = ModelRuntime(exported_tiny_patch, settings)
    assert rt.bound is not None
    assert rt.buckets == [1, 2, 4, 8]
    warm = rt.warmup(8)
    assert sorted(warm.batch_s) == [1, 2, 4, 8]
    batch = [images(1, seed=i)[0] for i in range(5)]
    got = np.stack([p.logits for p in rt.predict(batch)])
    want = np.stack([p.logits for p in plain.predict(batch)])
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_cuda_graph_needs_cuda_among_the_providers() -> None:
    with pytest.raises(ValidationError, match="cuda_graph is set but cuda is not among the providers"):
        Settings(providers=["cpu"], cuda_graph=True)
    s = Settings(providers=["cuda", "cpu"], cuda_graph=True)
    assert s.binds_io
    assert s.pads_to_buckets
    assert s.ort_providers()[0][1]["enable_cuda_graph"] == "1"  # type: ignore[index]


def test_tensorrt_gets_fp16_its_caches_and_a_profile_over_the_buckets(tmp_path: Path) -> None:
    s = Settings(providers=["tensorrt", "cuda", "cpu"], tensorrt_cache_dir=tmp_path)
    name, opts = s.ort_providers({1: "image:1x224x224x3", 8: "image:8x224x224x3"})[0]  # type: ignore[misc]
    assert name == "TensorrtExecutionProvider"
    assert opts["trt_fp16_enable"] == "True"
    assert opts["trt_engine_cache_path"] == opts["trt_timing_cache_path"] == str(tmp_path)
    assert opts["trt_engine_cache_enable"] == opts["trt_timing_cache_enable"] == "True"
    assert (opts["trt_profile_min_shapes"], opts["trt_profile_max_shapes"]) == (
        "image:1x224x224x3",
        "image:8x224x224x3",
    )
    with pytest.raises(ValidationError, match="require_gpu"):
        Settings(providers=["cpu"], require_gpu=True)


@pytest.mark.parametrize(
    ("providers", "wanted"),
    [(["tensorrt", "cuda", "cpu"], "TensorrtExecutionProvider"), (["cuda", "cpu"], "CUDAExecutionProvider")],
)
def test_a_gpu_provider_that_is_not_used_is_reported(
    exported_tiny_patch: Path, caplog: pytest.LogCaptureFixture, providers: list[str], wanted: str
) -> None:
    with caplog.at_level(logging.WARNING, logger="deepvit.runtime"):
        rt = ModelRuntime(exported_tiny_patch, Settings(providers=providers, cuda_graph="cuda" in providers))
    if rt.provider == wanted:
        pytest.skip(f"{wanted} runs here: no fallback to report")
    fallback = [r for r in caplog.records if getattr(r, "event", None) == "provider_fallback"]
    assert fallback, caplog.text
    assert f"{wanted} was requested but ONNX Runtime runs this model on {rt.provider}" in fallback[0].getMessage()
    assert rt.cuda_graph is False  # no CUDA graphs off CUDA
    assert rt.bound is not None  # cuda_graph still binds: on the CPU, host buffers
    assert rt.predict([images(1)[0]])[0].logits.shape == (10,)
