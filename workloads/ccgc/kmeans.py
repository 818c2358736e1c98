"""K-means pieces: sklearn's k-means for the centralised paths, and federated k-means whose
centres stay exact under FedAvg's example-weighted average.

Federated Lloyd step: client c (n_c nodes) assigns its embeddings to the global centres and
sends its per-cluster sums S_c and counts m_c divided by n_c. FedAvg weights client c by
n_c / sum(n), so the average is (sum_c S_c) / N and (sum_c m_c) / N, and their ratio is the
pooled per-cluster mean, exactly (the 1/N cancels, also when only some clients take part).
"""

from __future__ import annotations

import numpy as np
from sklearn.cluster import KMeans, kmeans_plusplus

N_INIT = 10  # sklearn restarts, as the spec's CPU replacement of the paper's GPU k-means


def kmeans(points: np.ndarray, clusters: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(labels, centres) of seeded sklearn k-means (``N_INIT`` restarts)."""
    model = KMeans(n_clusters=clusters, n_init=N_INIT, random_state=seed).fit(np.asarray(points, np.float64))
    return model.labels_.astype(np.int64), model.cluster_centers_


def assign(points: np.ndarray, centres: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(nearest centre, Euclidean distance to it) of every point; ties to the lower index."""
    points, centres = np.asarray(points, np.float64), np.asarray(centres, np.float64)
    d2 = (points**2).sum(1)[:, None] - 2 * points @ centres.T + (centres**2).sum(1)[None, :]
    labels = np.argmin(d2, axis=1)
    return labels, np.sqrt(np.maximum(d2[np.arange(len(points)), labels], 0.0))


def cluster_sums(points: np.ndarray, labels: np.ndarray, clusters: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-cluster sums (K, dims) and counts (K,) of the points."""
    points = np.asarray(points, np.float64)
    sums = np.zeros((clusters, points.shape[1]))
    np.add.at(sums, labels, points)
    return sums, np.bincount(labels, minlength=clusters).astype(np.float64)


def client_statistics(points: np.ndarray, centres: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """What a client sends for one Lloyd step: its per-cluster sums and counts under the
    global ``centres``, each divided by its number of nodes (see the module docstring)."""
    labels, _ = assign(points, centres)
    sums, counts = cluster_sums(points, labels, len(centres))
    return sums / len(points), counts / len(points)


def centres_from(centre_sum: np.ndarray, centre_count: np.ndarray, previous: np.ndarray) -> np.ndarray:
    """The averaged statistics' centres: sum / count, keeping the previous centre of a
    cluster nobody assigned a node to."""
    centre_sum, centre_count = np.asarray(centre_sum, np.float64), np.asarray(centre_count, np.float64)
    out = np.array(previous, dtype=np.float64, copy=True)
    filled = centre_count > 0
    out[filled] = centre_sum[filled] / centre_count[filled, None]
    return out


def seed_centres(points: np.ndarray, clusters: int, seed: int) -> np.ndarray:
    """Seeded k-means++ seeds (sklearn's greedy k-means++)."""
    centres, _ = kmeans_plusplus(np.asarray(points, np.float64), n_clusters=clusters, random_state=seed)
    return centres
