"""CCGC's model and loss: parameter-free smoothing, two unshared encoders, and the
warm-up and cluster-guided contrastive losses (Yang et al., AAAI 2023).

Differences from the official code, on purpose:
- every cluster contributes its positive term and its centres (the official loop skips the
  lowest cluster label: an off-by-one in its cumulative-count slicing);
- the high-confidence set is ``dist < quantile_tau(dist)`` computed explicitly;
- gradients are zeroed every step (the official loop never calls ``zero_grad``, so its Adam
  sees the running sum of all past gradients);
- a cluster absent from a client's high-confidence set may take its centre from the
  global centres (federated clients may hold only some classes).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from torch import nn

SAMPLE_SHARE = 0.8  # share of a cluster's high-confidence nodes sampled per view (as in the paper's code)


# ---- smoothing ------------------------------------------------------------------------------


def normalized_adjacency(adjacency: sp.spmatrix) -> sp.csr_matrix:
    """Â = D^-1/2 (A + I) D^-1/2, with D the degrees of A + I (never zero)."""
    a = sp.csr_matrix(adjacency, dtype=np.float64) + sp.identity(adjacency.shape[0], format="csr")
    inv_sqrt = sp.diags(1.0 / np.sqrt(np.asarray(a.sum(axis=1)).ravel()))
    return (inv_sqrt @ a @ inv_sqrt).tocsr()


def smooth_features(adjacency: sp.spmatrix, features: np.ndarray, steps: int) -> np.ndarray:
    """Â^t X: ``steps`` applications of the low-pass filter I - L̃ = Â (float32 out)."""
    a_hat = normalized_adjacency(adjacency)
    x = np.asarray(features, dtype=np.float64)
    for _ in range(steps):
        x = a_hat @ x
    return x.astype(np.float32)


# ---- encoders ---------------------------------------------------------------------------------


class Encoders(nn.Module):
    """Two unshared linear encoders; the two views come from different weights, not from
    augmentations. Rows are L2-normalised."""

    def __init__(self, features: int, dims: int) -> None:
        super().__init__()
        self.view1 = nn.Linear(features, dims)
        self.view2 = nn.Linear(features, dims)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return F.normalize(self.view1(x), dim=1), F.normalize(self.view2(x), dim=1)


def fused(z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    """The embedding that is clustered: (Z1 + Z2) / 2 (not renormalised, as in the paper)."""
    return (z1 + z2) / 2


def embed(model: Encoders, x: np.ndarray | torch.Tensor) -> np.ndarray:
    """The fused embedding of ``x`` as float64 numpy (no gradient), on the model's device."""
    model.eval()
    device = next(model.parameters()).device
    with torch.no_grad():
        z1, z2 = model(torch.as_tensor(np.asarray(x, dtype=np.float32)).to(device))
        return fused(z1, z2).double().cpu().numpy()


# ---- losses -----------------------------------------------------------------------------------


def warmup_loss(z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    """MSE(Z1 Z2ᵀ, I): each node similar to itself across views, decorrelated from the rest."""
    s = z1 @ z2.T
    return F.mse_loss(s, torch.eye(len(s), dtype=s.dtype, device=s.device))


def confident_nodes(distance: np.ndarray, tau: float) -> np.ndarray:
    """Indices of the high-confidence nodes: distance to their centre below the tau-quantile
    (the ``int(n * tau)``-th smallest distance, as in the paper's code); tau >= 1 keeps all."""
    distance = np.asarray(distance)
    n = len(distance)
    if tau >= 1 or n == 0:
        return np.arange(n)
    threshold = np.sort(distance)[int(n * tau)]
    return np.flatnonzero(distance < threshold)


@dataclass
class ClusterTerms:
    """The parts of the cluster-guided loss (tensors keep their graph)."""

    positive: torch.Tensor  # (K,) sum over sampled pairs of 2 - 2 cos, per cluster
    centres1: torch.Tensor  # (K', dims) normalised view-1 centres of the clusters in the negatives
    centres2: torch.Tensor  # (K', dims) the same for view 2 (K' = K unless clusters are absent)
    present: np.ndarray  # (K,) bool: the cluster has high-confidence nodes here
    negative: torch.Tensor  # MSE of the zero-diagonal cross-view centre similarity

    def loss(self, alpha: float) -> torch.Tensor:
        return self.positive.sum() / len(self.positive) + alpha * self.negative


def cluster_guided_terms(
    z1: torch.Tensor, z2: torch.Tensor, labels: np.ndarray, confident: np.ndarray, *, clusters: int,
    rng: np.random.Generator | None, fallback_centres: np.ndarray | None = None,
    sample_share: float = SAMPLE_SHARE,
) -> ClusterTerms:
    """CCGC's loss after the warm-up, over ALL ``clusters`` clusters.

    For each cluster k, H_k = its high-confidence nodes (``confident`` with ``labels`` k):
    view 1 and view 2 each sample ``int(share * |H_k|)`` of them independently and the pairs
    (a-th of view 1, a-th of view 2) add 2 - 2 z1_a·z2_b; the view centres are the means of
    Z1[H_k] and Z2[H_k]. Negatives push the centres of different clusters apart across views:
    MSE(S, 0) with S = norm(C1) norm(C2)ᵀ and its diagonal zeroed.

    ``rng=None`` takes the expectation over the sampling instead (deterministic: the pairs'
    mean is the product of the view means), used to report the loss. A cluster absent here
    gets ``fallback_centres[k]`` (e.g. the global centres, no gradient) in both views, or is
    left out of the negatives when there is none.
    """
    labels = np.asarray(labels)
    confident = np.asarray(confident, dtype=np.int64)
    dims = z1.shape[1]
    positive = z1.new_zeros(clusters)
    c1, c2 = [], []
    present = np.zeros(clusters, bool)
    for k in range(clusters):
        members = confident[labels[confident] == k]
        if len(members) == 0:
            fallback = (torch.as_tensor(fallback_centres[k], dtype=z1.dtype, device=z1.device)
                        if fallback_centres is not None else z1.new_full((dims,), float("nan")))
            c1.append(fallback)
            c2.append(fallback)
            continue
        present[k] = True
        m1, m2 = z1[members].mean(0), z2[members].mean(0)
        count = int(len(members) * sample_share)
        if count > 0:
            if rng is None:  # E over independent samples: pairs of independent draws
                positive[k] = count * (2 - 2 * (m1 * m2).sum())
            else:
                a = rng.choice(members, size=count, replace=False)
                b = rng.choice(members, size=count, replace=False)
                positive[k] = (2 - 2 * (z1[a] * z2[b]).sum(1)).sum()
        c1.append(m1)
        c2.append(m2)
    keep = np.flatnonzero(present | (fallback_centres is not None)).tolist()
    centres1 = F.normalize(torch.stack([c1[k] for k in keep]), dim=1) if keep else z1.new_zeros((0, dims))
    centres2 = F.normalize(torch.stack([c2[k] for k in keep]), dim=1) if keep else z1.new_zeros((0, dims))
    if len(centres1) < 2:
        negative = z1.new_zeros(())
    else:
        s = centres1 @ centres2.T
        s = s - torch.diag_embed(torch.diagonal(s))
        negative = F.mse_loss(s, torch.zeros_like(s))
    return ClusterTerms(positive, centres1, centres2, present, negative)
