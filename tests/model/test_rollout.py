"""The attention output of ``deepvit export --explain``: the rollout the graph computes equals the definition
(``model/rollout.py``'s docstring) computed directly, here in float64 as a product of full matrices, on the
official tiny checkpoints and real photographs; the metadata says the output is there; the parity gate
covers it; artifacts of the first schema still load."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch

from deepvit.artifact import ArtifactMetadata
from deepvit.artifact.pixels import load_file, transform
from deepvit.artifact.session import open_session, read_metadata
from deepvit.model.checkpoint import load_checkpoint
from deepvit.model.config import DeepViTConfig
from deepvit.model.net import DeepViT
from deepvit.model.parity import ParityReport
from deepvit.model.rollout import attention_rollout

TINY = ("tiny_patch", "tiny_cnn")


def direct_rollout(maps: list[np.ndarray]) -> np.ndarray:
    """The definition, written out: Â_l from each block's map, P = Â_L ⋯ Â_1, the cls row of P without
    its cls entry, renormalised. ``maps``: per block (B, H, T, T), first block first."""
    B, _, T, _ = maps[0].shape
    out = np.zeros((B, T - 1))
    for b in range(B):
        P = np.eye(T)
        for A in maps:  # l = 1 .. L: P ← Â_l P
            a = np.maximum(A[b].astype(np.float64).mean(axis=0), 0.0)
            s = a.sum(axis=1, keepdims=True)
            a = np.where(s < 1e-6, 1.0 / T, a / np.maximum(s, 1e-6))
            a = 0.5 * a + 0.5 * np.eye(T)
            a /= a.sum(axis=1, keepdims=True)
            P = a @ P
        v = P[0, 1:]
        out[b] = v / v.sum()
    return out


def photo_crops(data_dir: Path, meta: ArtifactMetadata) -> np.ndarray:
    photos = sorted((data_dir / "photos").glob("*.jpg"))
    return np.stack([transform(load_file(p), meta.preprocess) for p in photos])  # (5, crop, crop, 3)


@pytest.fixture(scope="module", params=TINY)
def explained(
    request: pytest.FixtureRequest,
    data_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
    run_deepvit: Callable[..., Any],
) -> tuple[str, Path, DeepViT]:
    """An official tiny checkpoint exported with --explain, and the PyTorch model it came from."""
    name = request.param
    out = tmp_path_factory.mktemp(f"explain_{name}") / "model.onnx"
    result = run_deepvit(
        "export",
        "--model-config",
        data_dir / f"{name}.json",
        "--checkpoint",
        data_dir / "conformance" / f"official_{name}.pth.tar",
        "--explain",
        "--output",
        out,
    )
    assert result.code == 0, result.stderr
    assert "max |dattention|" in result.stderr  # the parity gate measured the attention output too
    model = DeepViT(DeepViTConfig.from_json(data_dir / f"{name}.json")).eval()
    load_checkpoint(model, data_dir / "conformance" / f"official_{name}.pth.tar", "state_dict", "custom")
    return name, out, model


def test_the_graphs_attention_equals_the_definition_on_official_checkpoints_and_photos(
    explained: tuple[str, Path, DeepViT], data_dir: Path
) -> None:
    _, artifact, model = explained
    meta = read_metadata(artifact)
    images = photo_crops(data_dir, meta)
    logits, attention = open_session(artifact).run(None, {"image": images})
    pre = model.cfg.preprocessing
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    x = (x - torch.tensor(pre.mean).view(1, 3, 1, 1)) / torch.tensor(pre.std).view(1, 3, 1, 1)
    with torch.inference_mode():
        want_logits, maps = model.forward_with_attention(x)
    want = direct_rollout([m.numpy() for m in maps])
    grid = model.cfg.img_size // model.cfg.patch_size
    assert attention.shape == (len(images), grid * grid)
    np.testing.assert_allclose(attention, want, atol=1e-5, rtol=0)
    np.testing.assert_allclose(attention.sum(axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(logits, want_logits.numpy(), atol=1e-4, rtol=0)  # the logits are unchanged


def test_the_metadata_records_the_attention_output_and_its_definition(explained: tuple[str, Path, DeepViT]) -> None:
    _, artifact, model = explained
    proto = onnx.load(str(artifact), load_external_data=False)
    props = {p.key: p.value for p in proto.metadata_props}
    assert props["deepvit.schema"] == "2"
    grid = model.cfg.img_size // model.cfg.patch_size
    outputs = json.loads(props["deepvit.outputs"])
    assert outputs["attention"]["grid"] == grid
    assert outputs["attention"]["shape"] == ["N", grid * grid]
    assert "rollout" in outputs["attention"]["definition"]
    assert [o.name for o in proto.graph.output] == ["logits", "attention"]
    meta = read_metadata(artifact)
    assert meta.attention is not None
    assert meta.attention.grid == grid
    assert meta.to_public_dict()["outputs"]["attention"]["grid"] == grid
    # The parity figures cover the attention output, with its own gate.
    assert meta.parity["max_abs_attention_diff"] <= 1e-5
    assert "dattention" in meta.parity["gate"]


def test_a_schema_1_artifact_still_loads_without_an_attention_output(exported_tiny_patch: Path) -> None:
    proto = onnx.load(str(exported_tiny_patch), load_external_data=False)
    props = {p.key: p.value for p in proto.metadata_props}
    props["deepvit.schema"] = "1"
    del props["deepvit.outputs"]  # what an artifact of the first schema carries
    meta = ArtifactMetadata.from_props(props, "old.onnx")
    assert meta.schema == "1"
    assert meta.attention is None
    assert meta.labels == read_metadata(exported_tiny_patch).labels


def test_an_export_without_explain_has_the_logits_only(exported_tiny_patch: Path) -> None:
    proto = onnx.load(str(exported_tiny_patch), load_external_data=False)
    assert [o.name for o in proto.graph.output] == ["logits"]
    assert read_metadata(exported_tiny_patch).attention is None


def test_rollout_of_identical_uniform_maps_is_uniform_and_of_a_peaked_map_peaks_there() -> None:
    T = 5
    uniform = torch.full((1, 3, T, T), 1.0 / T)
    np.testing.assert_allclose(attention_rollout([uniform] * 4).numpy(), np.full((1, T - 1), 0.25), atol=1e-7)
    peaked = torch.zeros(1, 2, T, T)
    peaked[..., 3] = 1.0  # every token attends to token 3 only (patch index 2)
    out = attention_rollout([peaked]).numpy()
    assert out.argmax() == 2
    assert out.sum() == pytest.approx(1.0)


def test_negative_and_empty_rows_follow_the_definition() -> None:
    T = 4
    a = torch.randn(2, 3, T, T, generator=torch.Generator().manual_seed(0))  # negatives, as Re-attention's BN
    a[1] = 0.0  # rows that sum to nothing become uniform
    got = attention_rollout([a, a.flip(-1)]).numpy()
    want = direct_rollout([a.numpy(), a.flip(-1).numpy()])
    np.testing.assert_allclose(got, want, atol=1e-6)
    np.testing.assert_allclose(got[1], np.full(T - 1, 1 / (T - 1)), atol=1e-7)


def test_the_parity_gate_fails_on_an_attention_that_differs() -> None:
    report = ParityReport("fp32", (1,), 1, 0.0, 1.0, "CPUExecutionProvider", max_abs_attention_diff=1e-3)
    assert not report.passed
    assert report.to_dict()["passed"] is False
    assert ParityReport("fp32", (1,), 1, 0.0, 1.0, "CPUExecutionProvider", max_abs_attention_diff=1e-7).passed
