"""``deepvit export`` / ``verify`` / ``inspect``: the one self-describing artifact of ``deepvit.artifact``,
gated on parity with PyTorch, written whole or not at all."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import deepvit.model.parity
from deepvit.artifact.session import read_metadata
from deepvit.model.checkpoint import load_checkpoint
from deepvit.model.config import DeepViTConfig
from deepvit.model.labels import imagenet_labels
from deepvit.model.net import DeepViT

CNN_LABELS = ["red", "orange", "yellow", "green", "blue", "indigo", "violet"]
METADATA_KEYS = {
    "deepvit.schema",
    "deepvit.name",
    "deepvit.arch",
    "deepvit.config",
    "deepvit.num_classes",
    "deepvit.labels",
    "deepvit.preprocessing",
    "deepvit.weights",
    "deepvit.checkpoint_sha256",
    "deepvit.precision",
    "deepvit.parity",
    "deepvit.versions",
    "deepvit.exported_at",
    "deepvit.outputs",
}


@dataclass(frozen=True)
class Case:
    config: str  # tiny_patch | tiny_cnn
    precision: str
    weights: str  # state_dict | ema
    labels: list[str] | None = None

    @property
    def id(self) -> str:
        return f"{self.config}-{self.precision}-{self.weights}"


# Both tiny configs from their official checkpoints, in both precisions; tiny_cnn through --ema and --labels.
CASES = [
    Case("tiny_patch", "fp32", "state_dict"),
    Case("tiny_patch", "fp16", "state_dict"),
    Case("tiny_cnn", "fp32", "ema", CNN_LABELS),
    Case("tiny_cnn", "fp16", "ema", CNN_LABELS),
]


@dataclass(frozen=True)
class Exported:
    case: Case
    path: Path
    checkpoint: Path
    config: DeepViTConfig

    def meta(self) -> dict[str, str]:
        proto = onnx.load(str(self.path), load_external_data=False)
        return {p.key: p.value for p in proto.metadata_props}

    def reference(self) -> DeepViT:
        """The PyTorch model with the same official weights, loaded by the test, not by the exporter."""
        net = DeepViT(self.config).eval()
        load_checkpoint(net, self.checkpoint, self.case.weights, self.case.config)
        return net


def ort_session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def uint8_images(n: int, size: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def pytorch_logits(net: DeepViT, images: np.ndarray) -> np.ndarray:
    # The reference preprocessing (ToTensor, then Normalize with mean = std = 0.5), written out here.
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    with torch.inference_mode():
        return net((x - 0.5) / 0.5).numpy()


@pytest.fixture(scope="module", params=CASES, ids=lambda c: c.id)
def exported(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    data_dir: Path,
    run_deepvit: Any,
    exported_tiny_patch: Path,
) -> Exported:
    case: Case = request.param
    checkpoint = data_dir / "conformance" / f"official_{case.config}.pth.tar"
    config = DeepViTConfig.from_json(data_dir / f"{case.config}.json")
    if case == CASES[0]:  # already exported once for the whole session
        return Exported(case, exported_tiny_patch, checkpoint, config)
    out_dir = tmp_path_factory.mktemp(case.id)
    args: list[object] = ["export", "--model-config", data_dir / f"{case.config}.json", "--checkpoint", checkpoint]
    args += ["--precision", case.precision, "--output", out_dir / "model.onnx"]
    if case.weights == "ema":
        args.append("--ema")
    if case.labels:
        labels = tmp_path_factory.mktemp("labels") / "labels.txt"
        labels.write_text("\n".join(case.labels) + "\n")
        args += ["--labels", labels]
    result = run_deepvit(*args)
    assert result.code == 0, result.stderr
    return Exported(case, out_dir / "model.onnx", checkpoint, config)


# ---------------------------------------------------------------- the artifact


def test_artifact_is_one_file_with_weights_inside(exported: Exported) -> None:
    assert [p.name for p in exported.path.parent.iterdir()] == ["model.onnx"]  # no temp file, no sidecar
    proto = onnx.load(str(exported.path), load_external_data=False)
    assert proto.graph.initializer
    assert not any(onnx.external_data_helper.uses_external_data(t) for t in proto.graph.initializer)
    n_params = sum(p.numel() for p in DeepViT(exported.config).parameters())
    bytes_per_weight = 4 if exported.case.precision == "fp32" else 2
    assert exported.path.stat().st_size > n_params * bytes_per_weight


def test_input_is_uint8_nhwc_with_a_dynamic_batch_and_output_float32_logits(exported: Exported) -> None:
    session = ort_session(exported.path)
    (inp,), (out,) = session.get_inputs(), session.get_outputs()
    size, classes = exported.config.img_size, exported.config.num_classes
    assert inp.type == "tensor(uint8)"
    assert inp.shape[1:] == [size, size, 3]
    assert not isinstance(inp.shape[0], int)  # a named, dynamic axis
    assert out.type == "tensor(float)"
    assert out.shape[1:] == [classes]
    for batch in (1, 3, 5):
        (logits,) = session.run(None, {inp.name: uint8_images(batch, size)})
        assert logits.shape == (batch, classes)
        assert logits.dtype == np.float32


def test_artifact_agrees_with_pytorch_on_uint8_images(exported: Exported) -> None:
    # The official vectors' inputs are already normalised floats that are not on the uint8 grid, so the
    # artifact is compared with the PyTorch model (itself checked against those vectors to 1e-5) instead.
    images = uint8_images(6, exported.config.img_size)
    want = pytorch_logits(exported.reference(), images)
    session = ort_session(exported.path)
    (got,) = session.run(None, {session.get_inputs()[0].name: images})
    diff = float(np.abs(got - want).max())
    if exported.case.precision == "fp32":
        assert diff <= 1e-4
    else:
        assert diff <= 2e-2  # half precision: small, and the decisions must hold
    assert (got.argmax(1) == want.argmax(1)).all()


def test_metadata_describes_the_model(exported: Exported) -> None:
    meta, case, cfg = exported.meta(), exported.case, exported.config
    assert set(meta) >= METADATA_KEYS
    assert meta["deepvit.schema"] == "2"
    assert json.loads(meta["deepvit.outputs"]) == {"logits": {"dtype": "float32", "shape": ["N", cfg.num_classes]}}
    assert meta["deepvit.name"] == case.config  # the config file's name
    assert DeepViTConfig.from_dict(json.loads(meta["deepvit.config"])) == cfg
    assert int(meta["deepvit.num_classes"]) == cfg.num_classes
    assert json.loads(meta["deepvit.labels"]) == (case.labels or [f"class_{i}" for i in range(cfg.num_classes)])
    assert json.loads(meta["deepvit.preprocessing"]) == {
        "resize_shorter": int(cfg.img_size / 0.9),  # 32 -> 35, 64 -> 71, as timm's crop_pct 0.9
        "crop_size": cfg.img_size,
        "crop_pct": 0.9,
        "interpolation": "bicubic",
        "mean": [0.5, 0.5, 0.5],
        "std": [0.5, 0.5, 0.5],
        "input_layout": "NHWC",
        "input_dtype": "uint8",
        "color": "RGB",
    }
    assert meta["deepvit.weights"] == case.weights
    assert meta["deepvit.checkpoint_sha256"] == hashlib.sha256(exported.checkpoint.read_bytes()).hexdigest()
    assert meta["deepvit.precision"] == case.precision


def test_metadata_records_the_parity_figures_and_tool_versions(exported: Exported) -> None:
    meta = exported.meta()
    parity = json.loads(meta["deepvit.parity"])
    assert parity["passed"] is True
    assert parity["precision"] == exported.case.precision
    assert parity["batch_sizes"][0] == 1
    assert max(parity["batch_sizes"]) > 1
    if exported.case.precision == "fp32":
        assert parity["max_abs_logit_diff"] <= 1e-4
        assert parity["top1_agreement"] == 1.0
    else:
        assert parity["top1_agreement"] >= 0.99
    versions = json.loads(meta["deepvit.versions"])
    assert versions["torch"] == metadata.version("torch")
    assert versions["onnx"] == onnx.__version__
    assert ort.__version__ in (versions.get("onnxruntime"), versions.get("onnxruntime-gpu"))


def test_the_service_reads_the_artifact(exported: Exported) -> None:
    meta = read_metadata(exported.path)
    assert meta.num_classes == exported.config.num_classes
    assert meta.preprocess.crop_size == exported.config.img_size
    assert meta.weights == exported.case.weights
    assert not meta.untrained


def test_inspect_prints_the_metadata(exported: Exported, run_deepvit: Any) -> None:
    result = run_deepvit("inspect", exported.path)
    assert result.code == 0, result.stderr
    cfg = exported.config
    sha = hashlib.sha256(exported.checkpoint.read_bytes()).hexdigest()
    for text in (
        f"{exported.case.config} (custom), {cfg.num_classes} classes, {exported.case.precision}",
        f"weights      {exported.case.weights}",
        f"sha256 {sha}",
        f"uint8 [N, {cfg.img_size}, {cfg.img_size}, 3] RGB",
        f"shorter side -> {int(cfg.img_size / 0.9)} (bicubic), centre crop {cfg.img_size}",
        "(passed)",
        f"torch {metadata.version('torch')}",
    ):
        assert text in result.stdout
    assert "UNTRAINED" not in result.stdout

    as_json = json.loads(run_deepvit("inspect", "--json", exported.path).stdout)
    assert as_json["checkpoint_sha256"] == sha
    assert as_json["parity"]["passed"] is True


def test_verify_passes_on_a_good_artifact(exported: Exported, run_deepvit: Any) -> None:
    args = ["verify", exported.path, "--checkpoint", exported.checkpoint]
    result = run_deepvit(*args, *(["--ema"] if exported.case.weights == "ema" else []))
    assert result.code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["passed"] is True
    assert report["precision"] == exported.case.precision
    assert "parity ok" in result.stderr


# ---------------------------------------------------------------- one-off cases


def test_verify_catches_an_artifact_that_is_not_the_checkpoint(
    exported_tiny_patch: Path, data_dir: Path, run_deepvit: Any
) -> None:
    # Exported from state_dict; checked against the EMA weights it was not made from.
    checkpoint = data_dir / "conformance" / "official_tiny_patch.pth.tar"
    result = run_deepvit("verify", exported_tiny_patch, "--checkpoint", checkpoint, "--ema")
    assert result.code == 1
    assert json.loads(result.stdout)["passed"] is False
    assert "parity FAILED" in result.stderr


def test_verify_of_a_file_that_is_not_onnx_is_one_clear_line(tmp_path: Path, data_dir: Path, run_deepvit: Any) -> None:
    bogus = tmp_path / "model.onnx"
    bogus.write_bytes(b"not a protobuf at all \xff\xfe")
    checkpoint = data_dir / "conformance" / "official_tiny_patch.pth.tar"
    for artifact in (bogus, tmp_path / "absent.onnx"):
        result = run_deepvit("verify", artifact, "--checkpoint", checkpoint)
        assert result.code == 1
        why = "is not a loadable ONNX model" if artifact == bogus else "does not exist or is not a file"
        assert f"deepvit verify: {artifact} {why}" in result.stderr
        assert "Traceback" not in result.stderr


def test_export_takes_the_class_names_a_training_checkpoint_carries(
    tmp_path: Path, data_dir: Path, run_deepvit: Any
) -> None:
    official = torch.load(data_dir / "conformance" / "official_tiny_patch.pth.tar", weights_only=False)
    names = [f"shape_{i}" for i in range(10)]
    ours = tmp_path / "best.pth.tar"
    torch.save({"state_dict": official["state_dict"], "class_names": names}, ours)
    out = tmp_path / "model.onnx"
    result = run_deepvit(
        "export", "--model-config", data_dir / "tiny_patch.json", "--checkpoint", ours, "--output", out
    )
    assert result.code == 0, result.stderr
    assert read_metadata(out).labels == tuple(names)
    assert "class names saved in the checkpoint" in result.stderr


def test_random_init_is_explicit_and_recorded(tmp_path: Path, data_dir: Path, run_deepvit: Any) -> None:
    out = tmp_path / "model.onnx"
    config = data_dir / "tiny_patch.json"
    refused = run_deepvit("export", "--model-config", config, "--output", out)
    assert refused.code == 2  # no weights named: argparse refuses rather than exporting random weights
    assert "one of the arguments --checkpoint --random-init is required" in refused.stderr
    assert not out.exists()

    result = run_deepvit("export", "--model-config", config, "--random-init", "--output", out)
    assert result.code == 0, result.stderr
    assert "WARNING: random initial weights" in result.stderr
    for step in ("building", "exporting", "checking parity", "wrote"):  # progress for the slow steps
        assert f"deepvit: {step}" in result.stderr
    meta = read_metadata(out)
    assert meta.weights == "random_init"
    assert meta.untrained
    assert meta.checkpoint_sha256 == ""
    shown = run_deepvit("inspect", out).stdout
    assert "UNTRAINED" in shown
    assert "sha256 -" in shown


@pytest.mark.parametrize(
    ("precision", "gate", "failing_value"),
    [("fp32", "FP32_MAX_ABS_DIFF", -1.0), ("fp16", "FP16_MIN_TOP1_AGREEMENT", 1.01)],
)
def test_failing_parity_gate_writes_nothing(
    tmp_path: Path,
    data_dir: Path,
    run_deepvit: Any,
    monkeypatch: pytest.MonkeyPatch,
    precision: str,
    gate: str,
    failing_value: float,
) -> None:
    monkeypatch.setattr(deepvit.model.parity, gate, failing_value)
    # The model already being served stays untouched: the new file would only appear by a rename.
    out = tmp_path / "models" / "tiny" / "1" / "model.onnx"
    out.parent.mkdir(parents=True)
    out.write_bytes(b"the artifact in service")
    result = run_deepvit(
        "export",
        "--model-config",
        data_dir / "tiny_patch.json",
        "--checkpoint",
        data_dir / "conformance" / "official_tiny_patch.pth.tar",
        "--precision",
        precision,
        "--output",
        out,
    )
    assert result.code == 2
    assert "deepvit export: error: parity gate failed, nothing written" in result.stderr
    assert [p.name for p in out.parent.iterdir()] == ["model.onnx"]  # no temp file either
    assert out.read_bytes() == b"the artifact in service"


@pytest.mark.slow
def test_full_size_deepvit_s_exports_and_passes_the_gate(tmp_path: Path, run_deepvit: Any) -> None:
    out = tmp_path / "deepvit_S" / "1" / "model.onnx"
    result = run_deepvit("export", "--arch", "deepvit_S", "--random-init", "--output", out)
    assert result.code == 0, result.stderr
    meta = read_metadata(out)
    assert (meta.name, meta.arch, meta.num_classes, meta.weights) == ("deepvit_S", "deepvit_S", 1000, "random_init")
    assert meta.labels == tuple(imagenet_labels())  # the ImageNet-1k names are the default for 1000 classes
    assert (meta.preprocess.resize_shorter, meta.preprocess.crop_size) == (248, 224)
    assert meta.parity["passed"] is True
    assert meta.parity["max_abs_logit_diff"] <= 1e-4
    assert meta.parity["top1_agreement"] == 1.0
    session = ort_session(out)
    (logits,) = session.run(None, {session.get_inputs()[0].name: uint8_images(2, 224)})
    assert logits.shape == (2, 1000)
    assert out.stat().st_size > 25_000_000 * 4  # 25.5M float32 weights inside the one file
