"""Attention collapse measured on the official tiny checkpoints equals a direct computation.

The direct computation re-derives every block's maps from the weights with the official formulas (paper Eq. 3,
official ``models/layers.py``), independently of the model's forward and of the analysis' hooks, checks
itself against the official logits, then takes the paper's Eq. 2 literally: the cosine of column t of
head h of blocks p and q, image by image, averaged.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from deepvit.model.analysis.collapse import measure_collapse, premixing_maps
from deepvit.model.checkpoint import load_checkpoint
from deepvit.model.config import DeepViTConfig
from deepvit.model.net import DeepViT

TINY = ("tiny_patch", "tiny_cnn")


def official_tiny(data_dir: Path, name: str, weights: str = "state_dict") -> DeepViT:
    model = DeepViT(DeepViTConfig.from_json(data_dir / f"{name}.json")).eval()
    load_checkpoint(model, data_dir / "conformance" / f"official_{name}.pth.tar", weights, name)
    return model


@pytest.fixture(scope="module")
def inputs(data_dir: Path) -> dict[str, np.ndarray]:
    with np.load(data_dir / "conformance" / "official_expected_logits.npz") as npz:
        return {k: npz[k] for k in npz.files}


def direct_maps(model: DeepViT, x: Tensor) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    """Logits, and per block the softmax map and the applied map (B, H, T, T), from the weights."""
    cfg = model.cfg
    H, r = cfg.num_heads, cfg.scale_adjustment
    h = model.patch_embed(x)
    h = torch.cat((model.cls_token.expand(x.shape[0], -1, -1), h), dim=1) + model.pos_embed
    softmaxes, applied = [], []
    for i, blk in enumerate(model.blocks):
        a = blk.attn
        y = blk.norm1(h * r)
        B, T, C = y.shape
        q, k, v = a.qkv(y).reshape(B, T, 3, H, C // H).permute(2, 0, 3, 1, 4)
        s = (q @ k.transpose(-2, -1) * (C // H) ** -0.5).softmax(-1)
        m = s
        if i in cfg.reattention_blocks:
            scale = (C // H) ** -0.5 if cfg.transform_scale else 1.0
            m = a.var_norm(a.reatten_matrix(s)) * scale
        softmaxes.append(s)
        applied.append(m)
        h = h + a.proj((m @ v).transpose(1, 2).reshape(B, T, C)) / r
        h = h + blk.mlp(blk.norm2(h * r)) / r
    return model.head(model.norm(h)[:, 0]), softmaxes, applied


def eq2(maps_p: Tensor, maps_q: Tensor) -> float:
    """Mean over images of the mean over heads and tokens of cos(A^p[h,:,t], A^q[h,:,t])."""
    per_image = [F.cosine_similarity(maps_p[b], maps_q[b], dim=-2).mean() for b in range(maps_p.shape[0])]
    return float(torch.stack(per_image).mean())


@pytest.mark.parametrize("weights", ["state_dict", "ema"])
@pytest.mark.parametrize("name", TINY)
def test_official_tiny_checkpoints_against_a_direct_computation(
    data_dir: Path, inputs: dict[str, np.ndarray], name: str, weights: str
) -> None:
    model = official_tiny(data_dir, name, weights)
    x = torch.from_numpy(inputs[f"{name}_input"])
    with torch.no_grad():
        logits, softmaxes, applied = direct_maps(model, x)
    want = inputs[f"{name}_logits" + ("_ema" if weights == "ema" else "")]
    np.testing.assert_allclose(logits.numpy(), want, rtol=0, atol=1e-5)  # the direct maps are the official ones

    # Two batches (2 + 1 images) to hold the averaging over images to the per-image mean.
    report = measure_collapse(model, [x[:2], x[2:]], threshold=0.9)
    cfg = model.cfg
    L, R = cfg.depth, tuple(sorted(cfg.reattention_blocks))
    assert (report.blocks, report.heads, report.tokens, report.images) == (L, cfg.num_heads, cfg.num_patches + 1, 3)
    assert report.reattention_blocks == R
    premix = [softmaxes[i] if i in R else applied[i] for i in range(L)]
    direct = np.array([[eq2(applied[p], applied[q]) for q in range(L)] for p in range(L)])
    direct_premix = np.array([[eq2(premix[p], premix[q]) for q in range(L)] for p in range(L)])
    np.testing.assert_allclose(report.applied.matrix, direct, rtol=0, atol=1e-5)
    assert report.premixing is not None
    np.testing.assert_allclose(report.premixing.matrix, direct_premix, rtol=0, atol=1e-5)
    np.testing.assert_allclose(report.applied_vs_premixing, [eq2(applied[i], softmaxes[i]) for i in R], atol=1e-5)
    # Re-attention changed these maps, so the two sets of figures differ; the report says both.
    assert not np.allclose(report.applied.matrix, report.premixing.matrix, atol=1e-2)
    d = report.to_dict()
    assert d["blocks"] == L
    assert d["threshold"] == 0.9
    assert d["similarity_next"] == pytest.approx([direct[p, p + 1] for p in range(L - 1)], abs=1e-5)
    assert d["similar_blocks"] == sum(direct[p, p + 1] > 0.9 for p in range(L - 1))
    assert np.array(d["matrix"]).shape == (L, L)
    assert d["premixing"]["similarity_next"] == pytest.approx([direct_premix[p, p + 1] for p in range(L - 1)], abs=1e-5)
    assert len(d["premixing"]["applied_vs_premixing"]) == len(R)


def test_the_hooks_read_the_softmax_maps_and_leave_the_model_as_it_was(
    data_dir: Path, inputs: dict[str, np.ndarray]
) -> None:
    model = official_tiny(data_dir, "tiny_cnn")
    x = torch.from_numpy(inputs["tiny_cnn_input"])
    with torch.no_grad():
        _, softmaxes, _ = direct_maps(model, x)
        with premixing_maps(model) as seen:
            logits, _ = model.forward_with_attention(x)
        assert sorted(seen) == sorted(model.cfg.reattention_blocks) == [3, 4]
        for i, got in seen.items():
            torch.testing.assert_close(got, softmaxes[i], rtol=0, atol=1e-6)
            torch.testing.assert_close(got.sum(-1), torch.ones_like(got.sum(-1)))  # rows are distributions
        after = model(x)
    np.testing.assert_allclose(logits.numpy(), inputs["tiny_cnn_logits"], rtol=0, atol=1e-5)
    torch.testing.assert_close(after, logits)
    assert all(not blk.attn.reatten_matrix._forward_pre_hooks for blk in model.blocks if blk.attn.reattention)


def test_a_model_without_reattention_has_one_set_of_figures(data_dir: Path) -> None:
    cfg = DeepViTConfig.from_json(data_dir / "tiny_shapes_plain.json")
    assert cfg.reattention_blocks == ()
    torch.manual_seed(0)
    model = DeepViT(cfg)
    model.train()  # measured in eval mode, handed back as it came
    report = measure_collapse(model, [torch.randn(2, 3, cfg.img_size, cfg.img_size)])
    assert model.training
    assert report.premixing is None
    assert report.applied_vs_premixing == ()
    assert report.to_dict()["premixing"] is None
    np.testing.assert_allclose(np.diag(report.applied.matrix), 1.0, atol=1e-5)


def test_a_model_whose_blocks_all_attend_alike_is_fully_collapsed(data_dir: Path) -> None:
    # With q = k = 0 every softmax map is uniform (1/T everywhere) in every block: identical maps, M = 1.
    cfg = DeepViTConfig.from_json(data_dir / "tiny_shapes_plain.json")
    model = DeepViT(cfg)
    with torch.no_grad():
        for blk in model.blocks:
            blk.attn.qkv.weight.zero_()
            blk.attn.qkv.bias.zero_()
    report = measure_collapse(model, [torch.randn(3, 3, cfg.img_size, cfg.img_size)], threshold=0.9)
    np.testing.assert_allclose(report.applied.matrix, np.ones((cfg.depth, cfg.depth)), atol=1e-6)
    assert report.to_dict()["similar_blocks"] == cfg.depth - 1
