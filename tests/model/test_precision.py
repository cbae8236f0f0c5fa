"""Reduced precisions: the artifact clean for ONNX tooling, ``deepvit export --precision int8`` (dynamic, or
static with ``--calibration``), and the accuracy gate on natural images that fp16 and int8 must pass."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from onnxruntime.quantization import quantize_dynamic

import deepvit.model.accuracy
from deepvit.artifact.session import read_metadata
from deepvit.model.config import DeepViTConfig
from deepvit.model.export import ImageClassifier, fold_reattention_norm, rewrite_for_inference
from deepvit.model.net import DeepViT

DATA = Path(__file__).resolve().parents[1] / "data"
TINY_CNN = [
    "--model-config",
    DATA / "tiny_cnn.json",
    "--checkpoint",
    DATA / "conformance" / "official_tiny_cnn.pth.tar",
]
PHOTO_VIEWS = 5 * 38  # the shipped photographs, 38 views each


def ops(path: Path) -> set[str]:
    return {n.op_type for n in onnx.load(str(path)).graph.node}


@pytest.fixture(scope="module")
def int8_dynamic(tmp_path_factory: pytest.TempPathFactory, run_deepvit: Any) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("int8_dynamic") / "model.onnx"
    result = run_deepvit("export", *TINY_CNN, "--ema", "--precision", "int8", "--output", out)
    assert result.code == 0, result.stderr
    return out, result.stderr


# ---------------------------------------------------------------- the artifact, clean for ONNX tooling


def test_the_artifact_passes_strict_shape_inference_and_onnx_runtimes_quantizer(
    exported_tiny_patch: Path, tmp_path: Path
) -> None:
    proto = onnx.load(str(exported_tiny_patch))
    onnx.checker.check_model(proto, full_check=True)
    onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True)
    initializers = {t.name for t in proto.graph.initializer}
    assert not initializers & {v.name for v in proto.graph.value_info}
    quantize_dynamic(exported_tiny_patch, tmp_path / "int8.onnx", op_types_to_quantize=["MatMul"])
    assert "MatMulInteger" in ops(tmp_path / "int8.onnx")


def test_reattention_batchnorm_is_folded_into_the_head_mixing_convolution(exported_tiny_patch: Path) -> None:
    # tiny_patch applies Re-attention in all four blocks: four 1x1 convolutions over heads, no BatchNorm left.
    assert "BatchNormalization" not in ops(exported_tiny_patch)
    model = DeepViT(DeepViTConfig.from_json(DATA / "tiny_cnn.json")).eval()
    for m in model.modules():  # statistics far from the identity, so that a wrong fold shows
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.2, 3.0)
            m.weight.data.uniform_(0.5, 1.5)
    folded = fold_reattention_norm(model)
    assert not any(isinstance(m.var_norm, torch.nn.BatchNorm2d) for m in folded.modules() if hasattr(m, "var_norm"))
    images = torch.randint(0, 256, (4, 64, 64, 3), dtype=torch.uint8)
    with torch.inference_mode():
        torch.testing.assert_close(ImageClassifier(folded)(images), ImageClassifier(model)(images), atol=1e-5, rtol=0)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())  # the original untouched


def test_the_exported_mlp_gelu_is_one_fused_op_in_onnx_runtime(exported_tiny_patch: Path, tmp_path: Path) -> None:
    """The graph writes GELU in the form ONNX Runtime fuses: after its optimisation no Erf is left (nn.GELU's own
    export left five element-wise ops per block), and the model's answer is the same function."""
    import onnxruntime as ort

    assert "Erf" in ops(exported_tiny_patch)  # the graph itself holds standard ops only
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    opts.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(exported_tiny_patch), opts, providers=["CPUExecutionProvider"])
    optimized = ops(tmp_path / "optimized.onnx")
    assert "Erf" not in optimized
    assert optimized & {"Gelu", "BiasGelu"}
    model = DeepViT(DeepViTConfig.from_json(DATA / "tiny_cnn.json")).eval()
    images = torch.randint(0, 256, (4, 64, 64, 3), dtype=torch.uint8)
    with torch.inference_mode():
        rewritten = ImageClassifier(rewrite_for_inference(model))(images)
        torch.testing.assert_close(rewritten, ImageClassifier(model)(images), atol=1e-5, rtol=0)
    assert any(isinstance(m, torch.nn.GELU) for m in model.modules())  # the original untouched


# ---------------------------------------------------------------- int8


def test_int8_dynamic_is_recorded_gated_on_natural_images_and_timed(int8_dynamic: tuple[Path, str]) -> None:
    path, stderr = int8_dynamic
    meta = read_metadata(path)
    assert meta.precision == "int8"
    assert "MatMulInteger" in ops(path)
    assert "Conv" in ops(path)  # the head-mixing convolution stays float
    q = meta.quantization
    assert (q["method"], q["op_types"], q["per_channel"], q["weight_type"]) == ("dynamic", ["MatMul"], True, "int8")
    assert q["calibration"] == {}
    assert [s["batch_size"] for s in q["speed"]] == [1, 8]
    assert all(s["fp32_ms"] > 0 and s["int8_ms"] > 0 for s in q["speed"])
    acc = meta.accuracy
    assert acc["passed"] is True
    assert acc["images"] == PHOTO_VIEWS
    assert acc["top1_agreement"] >= 0.99
    assert 0 <= acc["mean_abs_prob_diff"] <= acc["max_abs_prob_diff"] < 0.2
    assert meta.parity["precision"] == "fp32"  # the float graph that was quantized, held to PyTorch
    assert meta.parity["passed"] is True
    assert "int8 speed on this CPU" in stderr or "WARNING: int8 does not pay on this CPU" in stderr
    assert "accuracy int8 on natural images: top-1 agreement" in stderr
    assert "WARNING:root" not in stderr
    public = meta.to_public_dict()
    assert public["accuracy"] == acc
    assert public["quantization"] == q


def test_int8_static_calibrates_on_the_folder_and_gates_on_it_too(
    tmp_path: Path, run_deepvit: Any, small_shapes: Path
) -> None:
    out = tmp_path / "model.onnx"
    calibration = small_shapes / "train"  # an image folder: 8 classes x 4 images
    result = run_deepvit("export", *TINY_CNN, "--precision", "int8", "--calibration", calibration, "--output", out)
    assert result.code == 0, result.stderr
    meta = read_metadata(out)
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops(out)
    assert meta.quantization["method"] == "static"
    assert meta.quantization["quant_format"] == "QDQ"
    assert meta.quantization["activation_type"] == "int8 symmetric"
    assert meta.quantization["calibration"] == {"images": 32, "source": "train", "method": "MinMax"}
    assert meta.accuracy["images"] == PHOTO_VIEWS + 32
    assert meta.accuracy["sources"][-1] == "32 images of train/"


def test_verify_gates_an_int8_artifact_on_accuracy(int8_dynamic: tuple[Path, str], run_deepvit: Any) -> None:
    path, _ = int8_dynamic
    result = run_deepvit("verify", path, "--checkpoint", TINY_CNN[3], "--ema")
    assert result.code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["precision"] == "int8"
    assert report["passed"] is True
    assert report["accuracy"]["top1_agreement"] >= 0.99
    assert "accuracy ok" in result.stderr

    wrong = run_deepvit("verify", path, "--checkpoint", TINY_CNN[3])  # not the EMA weights it was made from
    assert wrong.code == 1
    assert "accuracy FAILED" in wrong.stderr


def test_verify_on_cuda_where_it_is_not_used_is_a_clear_error(int8_dynamic: tuple[Path, str], run_deepvit: Any) -> None:
    from deepvit.artifact.session import open_session, providers_for

    if open_session(int8_dynamic[0], providers_for("cuda")).get_providers()[0] == "CUDAExecutionProvider":
        pytest.skip("this machine runs ONNX Runtime on CUDA: the error is for machines without it")
    result = run_deepvit("verify", int8_dynamic[0], "--checkpoint", TINY_CNN[3], "--ema", "--provider", "cuda")
    assert result.code == 2
    assert "--provider cuda: ONNX Runtime runs" in result.stderr
    assert "on CPUExecutionProvider, not CUDA" in result.stderr


# ---------------------------------------------------------------- the gate refuses


@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_a_failing_accuracy_gate_writes_nothing(
    tmp_path: Path, run_deepvit: Any, monkeypatch: pytest.MonkeyPatch, precision: str
) -> None:
    monkeypatch.setattr(deepvit.model.accuracy, "MIN_TOP1_AGREEMENT", 1.01)
    out = tmp_path / "models" / "tiny" / "1" / "model.onnx"
    out.parent.mkdir(parents=True)
    out.write_bytes(b"the artifact in service")
    result = run_deepvit("export", *TINY_CNN, "--precision", precision, "--output", out)
    assert result.code == 2
    assert "deepvit export: error: accuracy gate failed, nothing written" in result.stderr
    assert [p.name for p in out.parent.iterdir()] == ["model.onnx"]
    assert out.read_bytes() == b"the artifact in service"


def test_the_gate_is_recorded_but_not_enforced_for_random_weights(
    tmp_path: Path, run_deepvit: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Untrained, so that such an artifact can still be benchmarked; what the gate found is kept with it.
    monkeypatch.setattr(deepvit.model.accuracy, "MIN_TOP1_AGREEMENT", 1.01)
    out = tmp_path / "model.onnx"
    result = run_deepvit(
        "export", "--model-config", TINY_CNN[1], "--random-init", "--precision", "int8", "--output", out
    )
    assert result.code == 0, result.stderr
    assert "WARNING: the accuracy gate fails" in result.stderr
    assert "not enforced: random weights" in result.stderr
    meta = read_metadata(out)
    assert meta.untrained
    assert meta.accuracy["passed"] is False


def test_without_natural_images_a_reduced_precision_is_refused(
    tmp_path: Path, run_deepvit: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "model.onnx"
    empty = tmp_path / "empty"
    empty.mkdir()
    result = run_deepvit("export", *TINY_CNN, "--precision", "int8", "--gate-images", empty, "--output", out)
    assert result.code == 2
    assert f"{empty} holds no images" in result.stderr
    # An installed package ships no photographs: it asks for some rather than gating on noise.
    monkeypatch.setattr(deepvit.model.accuracy, "PROJECT_PHOTOS", tmp_path / "absent")
    result = run_deepvit("export", *TINY_CNN, "--precision", "fp16", "--output", out)
    assert result.code == 2
    assert "gated on natural images and none were found: give --gate-images DIR" in result.stderr
    assert not out.exists()


def test_fp16_is_gated_on_natural_images_too(tmp_path: Path, run_deepvit: Any) -> None:
    out = tmp_path / "model.onnx"
    result = run_deepvit("export", *TINY_CNN, "--precision", "fp16", "--output", out)
    assert result.code == 0, result.stderr
    meta = read_metadata(out)
    assert meta.parity["precision"] == "fp16"
    assert meta.accuracy["images"] == PHOTO_VIEWS
    assert meta.accuracy["passed"] is True
    assert meta.quantization == {}


def test_gate_views_are_natural_crops_through_the_pixel_path() -> None:
    spec = DeepViTConfig.from_json(DATA / "tiny_cnn.json").preprocessing
    views = deepvit.model.accuracy.photo_views(DATA / "photos", spec)
    assert views.images.shape == (PHOTO_VIEWS, 64, 64, 3)
    assert views.images.dtype == np.uint8
    assert len({v.tobytes() for v in views.images}) == PHOTO_VIEWS  # every view a different picture


def test_inspect_shows_how_int8_was_made(int8_dynamic: tuple[Path, str], run_deepvit: Any) -> None:
    result = run_deepvit("inspect", int8_dynamic[0])
    assert result.code == 0, result.stderr
    assert "classes, int8" in result.stdout
    assert "quantized    dynamic QOperator, MatMul, no calibration" in result.stdout
    assert "natural images (passed)" in result.stdout
    assert "int8 speed   batch 1:" in result.stdout
    assert "int8 speed   batch 8:" in result.stdout


def test_int8_by_nncf_is_gated_and_timed_on_the_openvino_engine(
    tmp_path: Path, run_deepvit: Any, small_shapes: Path
) -> None:
    """NNCF's post-training quantization (transformer scheme) of the float32 graph, calibrated on a folder:
    QDQ that ONNX Runtime's OpenVINO execution provider computes in int8; its gate and its speed are taken
    there, and the service lets that engine compute it."""
    from deepvit.artifact.engines import CPU_ENGINE, OPENVINO_ENGINE, gate_verdict

    out = tmp_path / "model.onnx"
    calibration = small_shapes / "train"
    args = ["--precision", "int8", "--int8-recipe", "nncf", "--calibration", calibration, "--output", out]
    result = run_deepvit("export", *TINY_CNN, "--ema", *args)
    if result.code != 0:  # the gate decides: a recipe that loses decisions writes nothing and says why
        assert "accuracy gate failed, nothing written" in result.stderr
        assert not out.exists()
        return
    meta = read_metadata(out)
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops(out)
    q = meta.quantization
    assert (q["method"], q["tool"], q["engine"], q["quant_format"]) == ("nncf", "nncf", "openvino", "QDQ")
    assert q["calibration"]["images"] == 32
    assert meta.accuracy["engine"] == "openvino"
    assert meta.accuracy["provider"] == "OpenVINOExecutionProvider"
    assert meta.accuracy["passed"] is True
    assert "int8 speed on this CPU" in result.stderr or "WARNING: int8 does not pay" in result.stderr
    assert gate_verdict(meta, OPENVINO_ENGINE)[0]
    assert gate_verdict(meta, CPU_ENGINE)[0]
    verified = run_deepvit("verify", out, "--checkpoint", TINY_CNN[3], "--ema")  # re-gated on the same engine
    assert verified.code == 0, verified.stderr
    assert json.loads(verified.stdout)["accuracy"]["engine"] == "openvino"


def test_nncf_needs_calibration_images(tmp_path: Path, run_deepvit: Any) -> None:
    out = tmp_path / "model.onnx"
    result = run_deepvit("export", *TINY_CNN, "--precision", "int8", "--int8-recipe", "nncf", "--output", out)
    assert result.code != 0
    assert "--calibration" in result.stderr
    assert not out.exists()


def test_an_fp32_export_records_the_bf16_gate_of_the_engine_and_verify_reruns_it(
    tmp_path: Path, run_deepvit: Any
) -> None:
    """bf16 on the CPU's matrix engine is gated like fp16 and int8, on the engine that computes it (emulated
    where this CPU lacks bf16: --engine-gates all); the float32 artifact is written either way."""
    out = tmp_path / "model.onnx"
    result = run_deepvit("export", *TINY_CNN, "--ema", "--engine-gates", "all", "--output", out)
    assert result.code == 0, result.stderr
    meta = read_metadata(out)
    assert meta.precision == "fp32"
    gate = meta.engine_gates["openvino-bf16"]
    assert (gate["precision"], gate["engine"], gate["provider"]) == (
        "bf16",
        "openvino-bf16",
        "OpenVINOExecutionProvider",
    )
    assert gate["images"] == PHOTO_VIEWS
    assert 0 <= gate["mean_abs_prob_diff"] <= gate["max_abs_prob_diff"]
    assert gate["passed"] == (gate["top1_agreement"] >= 0.99)
    assert "openvino-bf16 gate" in result.stderr
    assert meta.to_public_dict()["engine_gates"] == meta.engine_gates  # GET /models and deepvit inspect show it
    verified = run_deepvit("verify", out, "--checkpoint", TINY_CNN[3], "--ema", "--engine-gates", "all")
    assert verified.code == 0, verified.stderr
    again = json.loads(verified.stdout)["engine_gates"]["openvino-bf16"]
    assert again["top1_agreement"] == gate["top1_agreement"]
    none = run_deepvit("export", *TINY_CNN, "--ema", "--engine-gates", "none", "--output", tmp_path / "none.onnx")
    assert none.code == 0, none.stderr
    assert read_metadata(tmp_path / "none.onnx").engine_gates == {}
