"""Label inference from the gradients a server sees (Li et al. 2022, "Label Leakage and
Protection in Two-party Split Learning").

In a U-shaped split the server receives, for each sample, the gradient of the loss with
respect to its outputs; with the labels on the server it computes the gradient of its
inputs itself. Both carry the label: for a binary task the gradient of the logit is
`p - y`, so the gradients of the two classes differ in norm and point in opposite
directions after the tail's Jacobian.

* `norm_attack`: score = the gradient's L2 norm (the rarer, positive class has the larger
  gradients once the model leans to the common class).
* `cosine_attack`: score = cosine with the batch's principal direction (the top right
  singular vector of the batch's gradients), oriented so that the side holding most of
  the batch is the common class. It needs no labelled example, only the class prior.
* Both are scored per step by AUC (`auc`, Mann-Whitney) and averaged over the steps whose
  batch holds both classes; the attack's sense is then chosen once for the run (`max(AUC,
  1 - AUC)`: one labelled example tells it), so a defence cannot score by inverting it.
* `cluster_attack` (multi-class): k-means (cosine) on the gradients, each cluster named by
  its most frequent true label (the accuracy an attacker reaches with one labelled
  example per cluster), against the same for random clusters of the same sizes (chance).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["auc", "norm_attack", "cosine_attack", "cluster_attack", "binary_attacks"]


def auc(scores: Any, positives: Any) -> float:
    """Area under the ROC curve of `scores` for the boolean `positives` (ties count half).

    Example:
        >>> auc([0.1, 0.4, 0.35, 0.8], [False, False, True, True])
        0.75
    """
    scores, positives = np.asarray(scores, np.float64), np.asarray(positives, bool)
    pos, neg = scores[positives], scores[~positives]
    if not len(pos) or not len(neg):
        raise ValueError("auc needs both classes among the samples.")
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(greater / (len(pos) * len(neg)))


def _rows(gradients: Any) -> np.ndarray:
    g = np.asarray(gradients, np.float64)
    return g.reshape(len(g), -1)


def norm_attack(gradients: Any) -> np.ndarray:
    """Each sample's score: its gradient's L2 norm."""
    return np.linalg.norm(_rows(gradients), axis=1)


def cosine_attack(gradients: Any) -> np.ndarray:
    """Each sample's score: minus its cosine with the batch's principal direction, oriented
    so that most of the batch (the common class) scores low."""
    g = _rows(gradients)
    norms = np.linalg.norm(g, axis=1)
    if not np.any(norms > 0):
        return np.zeros(len(g))
    direction = np.linalg.svd(g, full_matrices=False)[2][0]
    cosine = g @ direction / np.where(norms > 0, norms, 1.0)
    return -cosine if np.mean(cosine > 0) >= 0.5 else cosine


def binary_attacks(gradients_per_step: Sequence[Any], labels_per_step: Sequence[Any],
                   positive: int) -> dict[str, float]:
    """Mean per-step AUC of the norm and cosine attacks, `positive` the rarer class."""
    norm, cosine = [], []
    for g, y in zip(gradients_per_step, labels_per_step):
        truth = np.asarray(y).reshape(len(y)) == positive
        if truth.all() or not truth.any():
            continue
        norm.append(auc(norm_attack(g), truth))
        cosine.append(auc(cosine_attack(g), truth))
    if not norm:
        raise ValueError("no step held both classes: the label attacks need batches with both.")
    # the attack's sense (which end of the score is the positive class) is chosen once per
    # run, as an attacker who knows one labelled example would
    norm_auc, cosine_auc = (float(max(np.mean(s), 1.0 - np.mean(s))) for s in (norm, cosine))
    return {"norm_auc": norm_auc, "cosine_auc": cosine_auc, "label_auc": max(norm_auc, cosine_auc)}


def _kmeans(points: np.ndarray, k: int, random: np.random.Generator, iterations: int = 50) -> np.ndarray:
    centres = [points[random.integers(len(points))]]
    for _ in range(1, k):  # k-means++
        distance = np.min(((points[:, None] - np.array(centres)[None]) ** 2).sum(-1), axis=1)
        total = distance.sum()
        centres.append(points[random.choice(len(points), p=distance / total)] if total > 0
                       else points[random.integers(len(points))])
    centre = np.array(centres)
    assignment = np.zeros(len(points), int)
    for _ in range(iterations):
        assignment = np.argmin(((points[:, None] - centre[None]) ** 2).sum(-1), axis=1)
        moved = np.array([points[assignment == c].mean(0) if np.any(assignment == c) else centre[c]
                          for c in range(k)])
        if np.allclose(moved, centre):
            break
        centre = moved
    return assignment


def _purity(assignment: np.ndarray, labels: np.ndarray) -> float:
    hits = sum(np.bincount(labels[assignment == c]).max() for c in np.unique(assignment))
    return float(hits / len(labels))


def cluster_attack(gradients: Any, labels: Any, classes: int, seed: int = 0) -> dict[str, float]:
    """Label recovery accuracy of k-means on the gradient directions, and chance."""
    g = _rows(gradients)
    g = g / np.maximum(np.linalg.norm(g, axis=1, keepdims=True), 1e-30)
    labels = np.asarray(labels).reshape(len(g)).astype(int)
    random = np.random.default_rng(seed)
    assignment = _kmeans(g, classes, random)
    accuracy = _purity(assignment, labels)
    chance = float(np.mean([_purity(random.permutation(assignment), labels) for _ in range(20)]))
    return {"recovery_accuracy": accuracy, "chance": chance,
            "majority_class": float(np.bincount(labels).max() / len(labels))}
