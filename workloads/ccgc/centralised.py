"""CCGC on one machine holding the whole graph (the spec's CPU recipe), and the baselines
every comparison includes: k-means on the raw and on the smoothed features, and spectral
clustering on the adjacency.

The centralised recipe: one Adam over ``epochs`` full-batch epochs; the first
``warmup_epochs`` minimise the warm-up loss; afterwards the cluster-guided loss, with
k-means (sklearn, 10 restarts, seeded) on the fused embedding refreshed every
``refresh_every`` epochs; the clustering scored is k-means on the final epoch's embedding
(never the best epoch picked with labels).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from functools import partial

import numpy as np
import scipy.sparse as sp
import torch
from sklearn.cluster import SpectralClustering

from workloads import torch_train
from workloads.ccgc.kmeans import assign, kmeans
from workloads.ccgc.model import Encoders, cluster_guided_terms, confident_nodes, embed, fused, warmup_loss


def new_encoders(features: int, dims: int, seed: int) -> Encoders:
    """Encoders initialised from ``seed`` without touching torch's global generator."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Encoders(features, dims)


@dataclass
class CentralisedRun:
    labels: np.ndarray  # (N,) k-means clusters of the final embedding
    embedding: np.ndarray  # (N, dims) fused embedding after the last epoch


def train_ccgc(
    smoothed: np.ndarray, *, clusters: int, dims: int = 128, lr: float = 1e-3, epochs: int = 200,
    warmup_epochs: int = 50, refresh_every: int = 10, tau: float = 0.5, alpha: float = 0.5, seed: int = 0,
) -> CentralisedRun:
    """CCGC on the smoothed features of the whole graph (module docstring)."""
    x = torch.as_tensor(np.asarray(smoothed, np.float32))
    model = new_encoders(x.shape[1], dims, seed)
    rng = np.random.default_rng(np.random.SeedSequence([seed, 1]))
    epoch, clustering = 0, {}

    def objective(model: Encoders, x: torch.Tensor) -> torch.Tensor:
        nonlocal epoch
        epoch += 1
        z1, z2 = model(x)
        if epoch <= warmup_epochs:
            return warmup_loss(z1, z2)
        if (epoch - warmup_epochs - 1) % refresh_every == 0:  # k-means on the current embedding
            points = fused(z1, z2).detach().double().numpy()
            labels, centres = kmeans(points, clusters, seed)
            clustering["labels"] = labels
            clustering["confident"] = confident_nodes(assign(points, centres)[1], tau)
        terms = cluster_guided_terms(z1, z2, clustering["labels"], clustering["confident"], clusters=clusters,
                                     rng=rng)
        return terms.loss(alpha)

    torch_train.train_steps(model, objective, torch_train.minibatches((x,), torch_train.full_batch()),
                            steps=epochs, optimizer=partial(torch.optim.Adam, lr=lr))
    embedding = embed(model, x)
    return CentralisedRun(kmeans(embedding, clusters, seed)[0], embedding)


# ---- baselines ----------------------------------------------------------------------------------


def kmeans_labels(features: np.ndarray, clusters: int, seed: int) -> np.ndarray:
    """k-means on the given features (raw, or smoothed by ``model.smooth_features``)."""
    return kmeans(features, clusters, seed)[0]


def spectral_labels(adjacency: sp.spmatrix, clusters: int, seed: int) -> np.ndarray:
    """Spectral clustering on A as a precomputed affinity (k-means on the eigenvectors)."""
    with warnings.catch_warnings():  # "graph is not fully connected": a few isolated nodes are fine
        warnings.simplefilter("ignore", UserWarning)
        model = SpectralClustering(n_clusters=clusters, affinity="precomputed", random_state=seed,
                                   assign_labels="kmeans", n_init=10)
        return model.fit_predict(sp.csr_matrix(adjacency, dtype=np.float64)).astype(np.int64)
