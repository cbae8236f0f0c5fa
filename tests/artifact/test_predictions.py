"""The top-k answer: softmax scores in descending order, ties in class order (reproducible answers)."""

from __future__ import annotations

import numpy as np
import pytest

from deepvit.artifact.predictions import softmax, top_k

LABELS = [f"class_{i}" for i in range(1000)]


def _reference(logits: np.ndarray, k: int) -> list[int]:
    return [int(i) for i in np.argsort(-softmax(logits), kind="stable")[:k]]


@pytest.mark.parametrize("seed", range(20))
def test_top_k_is_the_stable_sort_of_the_scores(seed: int) -> None:
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=1000).astype(np.float32)
    if seed % 2:
        logits = np.round(logits, 1)  # many ties
    k = int(rng.integers(1, 25))
    got = top_k(logits, k, LABELS)
    assert [s["class_id"] for s in got] == _reference(logits, k)
    assert [s["label"] for s in got] == [LABELS[s["class_id"]] for s in got]
    scores = [s["score"] for s in got]
    assert scores == sorted(scores, reverse=True)


def test_ties_come_in_class_order_and_k_over_the_classes_is_every_class() -> None:
    assert [s["class_id"] for s in top_k(np.zeros(1000, np.float32), 5, LABELS)] == [0, 1, 2, 3, 4]
    got = top_k(np.array([0.0, 2.0, 1.0], np.float32), 5, LABELS[:3])
    assert [s["class_id"] for s in got] == [1, 2, 0]
    assert sum(s["score"] for s in got) == pytest.approx(1.0)


def test_a_faulty_models_non_finite_logits_still_give_k_answers() -> None:
    logits = np.zeros(10, np.float32)
    logits[3] = np.nan
    got = top_k(logits, 3, LABELS[:10])
    assert [s["class_id"] for s in got] == _reference(logits, 3)
