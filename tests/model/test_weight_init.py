"""A fresh DeepViT starts where the official code starts (``DeepVisionTransformer.__init__`` and
``_init_weights`` in zhoudaquan/dvit_repo): timm's ``trunc_normal_(std=.02)`` for every Linear weight, the
position embedding and the cls token; zero Linear biases; LayerNorm as identity; convolutions (the stems and
Re-attention's Θ) and BatchNorm left at PyTorch's defaults.

Note on "truncated": timm's ``trunc_normal_(t, std=.02)`` keeps its default bounds a=-2, b=2, which are
absolute values, not multiples of std. The official weights are therefore cut at ±2.0 = ±100 std, i.e. they
are normal in practice, with the normal's 4.55% beyond 2 std. The tests check that shape, not a cut at
±0.04, because a cut at ±0.04 would not be the official initialisation.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from deepvit.model.net import DeepViT, build_model

QUANTILES = [0.001, 0.01, 0.1, 0.5, 0.9, 0.99, 0.999]


@pytest.fixture(scope="module")
def model() -> DeepViT:
    torch.manual_seed(0)
    return build_model("deepvit_S")  # 25.5M Linear weights: statistics are tight


def modules_of(model: nn.Module, kind: type[nn.Module]) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, kind)]


def test_every_linear_weight_has_std_002_and_zero_mean(model: DeepViT) -> None:
    linears = modules_of(model, nn.Linear)
    assert len(linears) == 4 * 16 + 1  # qkv, proj, fc1, fc2 per block, and the head
    for name, m in linears:
        w = m.weight.detach()
        assert w.std().item() == pytest.approx(0.02, rel=0.02), name
        assert abs(w.mean().item()) < 2e-4, name


def test_linear_weights_follow_the_official_trunc_normal(model: DeepViT) -> None:
    timm_layers = pytest.importorskip("timm.layers")
    with torch.no_grad():
        ours = torch.cat([m.weight.flatten() for _, m in modules_of(model, nn.Linear)]).numpy()
    reference = torch.empty(4_000_000)
    timm_layers.trunc_normal_(reference, std=0.02)  # exactly the official call
    np.testing.assert_allclose(
        np.quantile(ours, QUANTILES), np.quantile(reference.numpy(), QUANTILES), rtol=0.03, atol=3e-4
    )
    # Normal tails (bounds at ±2.0, not ±2 std): 4.55% of weights lie beyond 2 std, none beyond the bounds.
    beyond_2_std = float((np.abs(ours) > 0.04).mean())
    assert beyond_2_std == pytest.approx(math.erfc(2 / math.sqrt(2)), abs=0.002)
    assert np.abs(ours).max() <= 2.0


def test_linear_biases_are_zero(model: DeepViT) -> None:
    for name, m in modules_of(model, nn.Linear):
        assert m.bias is not None, name  # qkv_bias=True in every official variant
        assert torch.count_nonzero(m.bias) == 0, name


def test_position_embedding_and_cls_token_are_trunc_normal_not_zero(model: DeepViT) -> None:
    # The constructor makes them zeros; the official code then draws them with std 0.02.
    pos, cls = model.pos_embed.detach(), model.cls_token.detach()
    assert pos.std().item() == pytest.approx(0.02, rel=0.03)
    assert cls.std().item() == pytest.approx(0.02, rel=0.15)  # 396 values: a looser estimate
    assert torch.count_nonzero(pos) == pos.numel()
    assert torch.count_nonzero(cls) == cls.numel()


def test_layernorms_start_as_identity(model: DeepViT) -> None:
    norms = modules_of(model, nn.LayerNorm)
    assert len(norms) == 2 * 16 + 1
    for name, m in norms:
        assert torch.equal(m.weight, torch.ones_like(m.weight)), name
        assert torch.equal(m.bias, torch.zeros_like(m.bias)), name
        assert m.eps == 1e-6, name


def test_convolutions_keep_pytorch_defaults(model: DeepViT) -> None:
    # PyTorch's Conv2d default: kaiming_uniform(a=√5), i.e. U(±1/√fan_in) for weight and bias, whose std is
    # bound/√3. Θ (reatten_matrix, fan_in 12) therefore has std ≈ 0.17, far from the 0.02 of the Linears.
    convs = modules_of(model, nn.Conv2d)
    assert {n for n, _ in convs} >= {"patch_embed.conv1", "patch_embed.conv2", "blocks.11.attn.reatten_matrix"}
    for name, m in convs:
        bound = 1 / math.sqrt(m.weight[0].numel())
        w = m.weight.detach()
        assert w.abs().max().item() <= bound, name
        assert w.abs().max().item() > 0.9 * bound, name
        assert w.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.15), name
        if m.bias is not None:
            assert m.bias.abs().max().item() <= bound, name
            assert torch.count_nonzero(m.bias) == m.bias.numel(), name


def test_batchnorms_keep_pytorch_defaults(model: DeepViT) -> None:
    norms = modules_of(model, nn.BatchNorm2d)
    assert len(norms) == 2 + 5  # the stem's two and the var_norm of the five Re-attention blocks of deepvit_S
    for name, m in norms:
        assert torch.equal(m.weight, torch.ones_like(m.weight)), name
        assert torch.equal(m.bias, torch.zeros_like(m.bias)), name
        assert torch.equal(m.running_mean, torch.zeros_like(m.running_mean)), name
        assert torch.equal(m.running_var, torch.ones_like(m.running_var)), name
        assert m.num_batches_tracked.item() == 0, name


def test_the_same_seed_gives_the_same_model() -> None:
    # --random-init --seed N must be reproducible.
    torch.manual_seed(7)
    a = build_model("deepvit_patch16_224_re_attn_16b", depth=2, reattention_blocks=(0, 1))
    torch.manual_seed(7)
    b = build_model("deepvit_patch16_224_re_attn_16b", depth=2, reattention_blocks=(0, 1))
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(va, vb), k
