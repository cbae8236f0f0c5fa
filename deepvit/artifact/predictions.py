"""Logits → the top-k answer: softmax probabilities in descending order, with labels. The same objects
answer ``/classify`` and fill ``deepvit evaluate --predictions``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypedDict

import numpy as np


class Scored(TypedDict):
    label: str
    class_id: int
    score: float


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    z = np.exp(z - z.max(axis=-1, keepdims=True))
    return np.asarray(z / z.sum(axis=-1, keepdims=True))


def top_k(logits: np.ndarray, k: int, labels: Sequence[str]) -> list[Scored]:
    probs = softmax(logits)
    # A stable sort keeps ties in class order, so equal answers are reproducible.
    order = np.argsort(-probs, kind="stable")[:k]
    return [Scored(label=labels[i], class_id=int(i), score=float(probs[i])) for i in order]
