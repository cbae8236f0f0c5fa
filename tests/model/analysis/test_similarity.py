"""The paper's cross-block similarity (Eq. 2) on constructed maps whose answer is known by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from deepvit.model.analysis.similarity import (
    SimilarityAccumulator,
    cosine_sums,
    similar_blocks,
    similarity_next,
)


def softmax_maps(images: int, heads: int, tokens: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(images, heads, tokens, tokens, generator=g).mul(3).softmax(-1)


def mean_matrix(*batches: list[torch.Tensor]) -> np.ndarray:
    acc = SimilarityAccumulator(len(batches[0]))
    for maps in batches:
        acc.add(maps)
    return acc.mean()


def test_identical_maps_are_similar_one_and_count_as_similar_blocks() -> None:
    a = softmax_maps(2, 3, 5, seed=0)
    m = mean_matrix([a, a.clone(), a.clone(), a.clone()])
    np.testing.assert_allclose(m, np.ones((4, 4)), atol=1e-6)
    assert similarity_next(m) == pytest.approx([1.0, 1.0, 1.0], abs=1e-6)
    assert similar_blocks(similarity_next(m), 0.9) == 3


def test_scale_does_not_matter_and_the_matrix_is_symmetric_with_a_unit_diagonal() -> None:
    a, b = softmax_maps(2, 4, 6, seed=1), softmax_maps(2, 4, 6, seed=2)
    m = mean_matrix([a, 3.0 * a, b])
    assert m[0, 1] == pytest.approx(1.0, abs=1e-6)
    np.testing.assert_allclose(m, m.T, atol=1e-12)
    np.testing.assert_allclose(np.diag(m), 1.0, atol=1e-6)
    assert m[0, 2] < 0.99


def test_a_two_token_case_by_hand() -> None:
    # Columns of A: (1, 0) and (0, 1); of B: (1, 0) and (1, 1). Cosines 1 and 1/√2, mean (1 + 1/√2) / 2.
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).reshape(1, 1, 2, 2)
    b = torch.tensor([[1.0, 1.0], [0.0, 1.0]]).reshape(1, 1, 2, 2)
    assert mean_matrix([a, b])[0, 1] == pytest.approx((1 + 1 / math.sqrt(2)) / 2, abs=1e-7)


def test_columns_are_compared_not_rows() -> None:
    # Every row of A is v, every row of B is w: the rows differ, but every column is a constant vector, so
    # each column of A is parallel to the same column of B (column t: how token t feeds every output).
    v = torch.tensor([0.7, 0.2, 0.1])
    w = torch.tensor([0.1, 0.1, 0.8])
    a = v.expand(3, 3).reshape(1, 1, 3, 3)
    b = w.expand(3, 3).reshape(1, 1, 3, 3)
    assert mean_matrix([a, b])[0, 1] == pytest.approx(1.0, abs=1e-6)
    assert float(torch.nn.functional.cosine_similarity(v, w, dim=0)) < 0.5  # what comparing rows would say
    # And disjoint columns (the identity against a cyclic shift) are orthogonal.
    eye = torch.eye(3).reshape(1, 1, 3, 3)
    shifted = torch.eye(3).roll(1, dims=0).reshape(1, 1, 3, 3)
    assert mean_matrix([eye, shifted])[0, 1] == pytest.approx(0.0, abs=1e-7)


def test_the_mean_is_over_heads_tokens_and_images_whatever_the_batches() -> None:
    a, b = softmax_maps(4, 2, 5, seed=3), softmax_maps(4, 2, 5, seed=4)
    whole = mean_matrix([a, b])
    split = mean_matrix([a[:1], b[:1]], [a[1:], b[1:]])
    np.testing.assert_allclose(split, whole, atol=1e-12)
    # Direct: cos of every column, for every head and image, then the plain mean.
    direct = torch.nn.functional.cosine_similarity(a, b, dim=-2).mean()
    assert whole[0, 1] == pytest.approx(float(direct), abs=1e-6)
    acc = SimilarityAccumulator(2)
    acc.add([a, b])
    assert acc.images == 4


def test_negative_entries_as_after_reattention_give_negative_cosines() -> None:
    a = softmax_maps(1, 2, 4, seed=5)
    assert mean_matrix([a, -a])[0, 1] == pytest.approx(-1.0, abs=1e-6)


def test_threshold_is_strict() -> None:
    assert similar_blocks([0.9, 0.91, 0.5], 0.9) == 1


def test_bad_input_is_refused() -> None:
    with pytest.raises(ValueError, match="no attention maps"):
        cosine_sums([])
    with pytest.raises(ValueError, match="one shape"):
        cosine_sums([torch.rand(1, 2, 3, 3), torch.rand(1, 2, 4, 4)])
    with pytest.raises(ValueError, match="expected 2 maps"):
        SimilarityAccumulator(2).add([torch.rand(1, 1, 2, 2)])
    with pytest.raises(ValueError, match="no images"):
        SimilarityAccumulator(2).mean()
