"""Clustering metrics of the deep-graph-clustering literature: ACC and macro-F1 after the
best one-to-one matching of clusters to classes (Hungarian), NMI (arithmetic mean, as the
paper's code) and ARI."""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment
from sklearn.metrics import adjusted_rand_score, f1_score, normalized_mutual_info_score

UNMATCHED = -1  # a predicted cluster left without a class (more clusters than classes)


def contingency(truth: np.ndarray, predicted: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(classes, clusters, counts[class, cluster])."""
    classes, t = np.unique(truth, return_inverse=True)
    clusters, p = np.unique(predicted, return_inverse=True)
    counts = np.zeros((len(classes), len(clusters)), np.int64)
    np.add.at(counts, (t, p), 1)
    return classes, clusters, counts


def matched_labels(truth: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    """Each node's predicted cluster renamed to the class it is matched to by the
    assignment that maximises agreement; clusters left unmatched become ``UNMATCHED``."""
    truth, predicted = np.asarray(truth), np.asarray(predicted)
    classes, clusters, counts = contingency(truth, predicted)
    rows, cols = linear_sum_assignment(counts, maximize=True)
    names = np.full(len(clusters), UNMATCHED, dtype=np.int64)
    names[cols] = classes[rows]
    return names[np.searchsorted(clusters, predicted)]


def clustering_accuracy(truth: np.ndarray, predicted: np.ndarray) -> float:
    return float(np.mean(matched_labels(truth, predicted) == np.asarray(truth)))


def matched_f1(truth: np.ndarray, predicted: np.ndarray) -> float:
    """Macro-F1 over the true classes after the matching."""
    truth = np.asarray(truth)
    return float(f1_score(truth, matched_labels(truth, predicted), labels=np.unique(truth), average="macro",
                          zero_division=0))


def clustering_scores(truth: np.ndarray, predicted: np.ndarray) -> dict[str, float]:
    """ACC, NMI, ARI and macro-F1 of a clustering against the truth."""
    truth, predicted = np.asarray(truth), np.asarray(predicted)
    return {
        "acc": clustering_accuracy(truth, predicted),
        "nmi": float(normalized_mutual_info_score(truth, predicted, average_method="arithmetic")),
        "ari": float(adjusted_rand_score(truth, predicted)),
        "f1": matched_f1(truth, predicted),
    }
