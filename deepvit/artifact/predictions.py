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
    k = min(k, len(probs))
    if not np.isfinite(probs).all():  # a faulty model's answer: no threshold to partition by
        order = np.argsort(-probs, kind="stable")[:k]
        return [Scored(label=labels[i], class_id=int(i), score=float(probs[i])) for i in order]
    # The k largest, then in order: ties in class order, so equal answers are reproducible. Partitioning
    # first keeps this cheap for 1000 classes (it runs on the event loop, once per image).
    top = np.argpartition(-probs, k - 1)[:k] if k < len(probs) else np.arange(len(probs))
    threshold = probs[top].min()
    top = np.flatnonzero(probs >= threshold)  # every class tied with the k-th too, so none is left out by order
    order = top[np.lexsort((top, -probs[top]))][:k]
    return [Scored(label=labels[i], class_id=int(i), score=float(probs[i])) for i in order]
