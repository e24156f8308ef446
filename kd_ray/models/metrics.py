"""Classification quality, teacher-student agreement and calibration (scikit-learn where it has them)."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, recall_score


def expected_calibration_error(probs: np.ndarray, gold: np.ndarray, num_bins: int = 15) -> float:
    """ECE with equal-width confidence bins. probs: (n, classes) softmax outputs; gold: (n,) int."""
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == gold
    bins = np.minimum((confidence * num_bins).astype(int), num_bins - 1)
    ece = 0.0
    for b in range(num_bins):
        in_bin = bins == b
        if in_bin.any():
            ece += in_bin.mean() * abs(correct[in_bin].mean() - confidence[in_bin].mean())
    return float(ece)


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def classification_metrics(logits: np.ndarray, gold: np.ndarray, label_names: list[str]) -> dict:
    """logits: (n, classes) raw scores; gold: (n,) int label indices. Macro recall is TweetEval's metric."""
    pred = logits.argmax(axis=1)
    labels = list(range(len(label_names)))
    per_class = recall_score(gold, pred, labels=labels, average=None, zero_division=0)
    return {
        "n": int(len(gold)),
        "accuracy": float(accuracy_score(gold, pred)),
        "macro_f1": float(f1_score(gold, pred, labels=labels, average="macro", zero_division=0)),
        "macro_recall": float(recall_score(gold, pred, labels=labels, average="macro", zero_division=0)),
        "per_class_recall": {name: float(r) for name, r in zip(label_names, per_class)},
        "ece": expected_calibration_error(softmax(logits), gold),
        "confusion_matrix": confusion_matrix(gold, pred, labels=labels).tolist(),
    }


def agreement(student_logits: np.ndarray, teacher_logits: np.ndarray) -> float:
    """Fraction of rows where student and teacher predict the same class."""
    return float((student_logits.argmax(axis=1) == teacher_logits.argmax(axis=1)).mean())
