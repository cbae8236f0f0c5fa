"""The model is the official DeepViT: same state-dict keys, shapes and dtypes for the six registered
variants, and the same logits as the official code on its own checkpoints (tests/data/conformance)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from deepvit.model.checkpoint import load_checkpoint, load_weights
from deepvit.model.config import VARIANTS, DeepViTConfig
from deepvit.model.net import DeepViT, build_model

TINY = ("tiny_patch", "tiny_cnn")
# Parameter counts of the two tiny models built with the official class (conformance README).
OFFICIAL_TINY_PARAMS = {"tiny_patch": 132_970, "tiny_cnn": 262_319}

Row = tuple[str, tuple[int, ...], str]


def official_rows(data_dir: Path) -> dict[str, list[Row]]:
    rows: dict[str, list[Row]] = {}
    with open(data_dir / "conformance" / "official_state_dict_keys.tsv", newline="") as f:
        for r in csv.DictReader(f, delimiter="\t"):
            shape = () if r["shape"] == "scalar" else tuple(int(s) for s in r["shape"].split("x"))
            rows.setdefault(r["arch"], []).append((r["key"], shape, r["dtype"]))
    return rows


@pytest.fixture(scope="module")
def official(data_dir: Path) -> dict[str, list[Row]]:
    return official_rows(data_dir)


@pytest.fixture(scope="module")
def expected(data_dir: Path) -> dict[str, np.ndarray]:
    with np.load(data_dir / "conformance" / "official_expected_logits.npz") as npz:
        return {k: npz[k] for k in npz.files}


def tiny_model(data_dir: Path, name: str) -> DeepViT:
    return DeepViT(DeepViTConfig.from_json(data_dir / f"{name}.json")).eval()


def official_checkpoint(data_dir: Path, name: str) -> Path:
    return data_dir / "conformance" / f"official_{name}.pth.tar"


def test_the_six_official_variants_are_registered_by_their_official_names(official: dict[str, list[Row]]) -> None:
    assert sorted(VARIANTS) == sorted(official)
    assert len(official) == 6


@pytest.mark.parametrize("arch", sorted(official_rows(Path(__file__).parents[1] / "data")))
def test_state_dict_keys_shapes_and_dtypes_are_the_official_ones(arch: str, official: dict[str, list[Row]]) -> None:
    with torch.device("meta"):
        model = build_model(arch)
    ours = [(k, tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in model.state_dict().items()]
    # Keys first (same keys, same order), then the full rows, so a failure says which part differs.
    assert [k for k, _, _ in ours] == [k for k, _, _ in official[arch]]
    assert ours == official[arch]


@pytest.mark.parametrize("arch", ["deepvit_S", "deepvit_L_384", "deepvit_patch16_224_re_attn_24b"])
def test_a_state_dict_with_the_official_keys_loads_strictly(arch: str, official: dict[str, list[Row]]) -> None:
    # What a released official checkpoint holds, as shapes only (meta tensors: no memory, no time).
    dtypes = {"float32": torch.float32, "int64": torch.int64}
    with torch.device("meta"):
        model = build_model(arch)
        sd = {k: torch.empty(shape, dtype=dtypes[dtype]) for k, shape, dtype in official[arch]}
    load_weights(model, sd, arch)  # compare_keys, then load_state_dict(strict=True)


@pytest.mark.parametrize("name", TINY)
def test_tiny_test_configs_are_the_official_tiny_models(data_dir: Path, name: str) -> None:
    official_cfg = json.loads((data_dir / "conformance" / "official_tiny_configs.json").read_text())[name]
    cfg = DeepViTConfig.from_json(data_dir / f"{name}.json")
    assert cfg == DeepViTConfig.from_dict(official_cfg)
    assert sum(p.numel() for p in DeepViT(cfg).parameters()) == OFFICIAL_TINY_PARAMS[name]


@pytest.mark.parametrize("weights", ["state_dict", "ema"])
@pytest.mark.parametrize("name", TINY)
def test_official_checkpoint_gives_the_official_logits(
    data_dir: Path, expected: dict[str, np.ndarray], name: str, weights: str
) -> None:
    model = tiny_model(data_dir, name)
    load_checkpoint(model, official_checkpoint(data_dir, name), weights, name)
    with torch.inference_mode():
        logits = model(torch.from_numpy(expected[f"{name}_input"])).numpy()
    want = expected[f"{name}_logits" + ("_ema" if weights == "ema" else "")]
    np.testing.assert_allclose(logits, want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", TINY)
def test_state_dict_and_ema_vectors_differ_so_the_choice_is_tested(expected: dict[str, np.ndarray], name: str) -> None:
    assert np.abs(expected[f"{name}_logits"] - expected[f"{name}_logits_ema"]).max() > 1e-2


@pytest.mark.parametrize("name", TINY)
def test_forward_with_attention_returns_the_same_logits_and_one_map_per_block(
    data_dir: Path, expected: dict[str, np.ndarray], name: str
) -> None:
    model = tiny_model(data_dir, name)
    load_checkpoint(model, official_checkpoint(data_dir, name), "state_dict", name)
    x = torch.from_numpy(expected[f"{name}_input"])
    with torch.inference_mode():
        logits, maps = model.forward_with_attention(x)
    np.testing.assert_allclose(logits.numpy(), expected[f"{name}_logits"], rtol=0, atol=1e-5)

    cfg = model.cfg
    tokens = 1 + cfg.num_patches
    assert len(maps) == cfg.depth
    for attn in maps:
        assert tuple(attn.shape) == (x.shape[0], cfg.num_heads, tokens, tokens)
    # Plain MHSA blocks return softmax maps (rows are distributions); Re-attention blocks return the maps
    # after Θ, BatchNorm and the scale, whose rows no longer sum to one.
    for i, attn in enumerate(maps):
        row_sums = attn.sum(-1)
        if i in cfg.reattention_blocks:
            assert not torch.allclose(row_sums, torch.ones_like(row_sums), atol=1e-3), f"block {i}"
        else:
            assert torch.allclose(row_sums, torch.ones_like(row_sums), atol=1e-5), f"block {i}"
            assert attn.min() >= 0


def test_official_preprocessing_of_the_registered_models() -> None:
    # Shorter side to int(crop / 0.9) with bicubic, centre crop, mean = std = 0.5; crop_pct 1.0 at 384 px.
    s = VARIANTS["deepvit_S"].preprocessing
    assert (s.resize_shorter, s.crop_size, s.interpolation) == (248, 224, "bicubic")
    assert s.mean == s.std == (0.5, 0.5, 0.5)
    big = VARIANTS["deepvit_L_384"].preprocessing
    assert (big.resize_shorter, big.crop_size) == (384, 384)
