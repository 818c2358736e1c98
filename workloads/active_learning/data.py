"""Who holds which digits: a held-out test set, a Dirichlet label-skewed split of the rest,
each client's labeled seed set, and its share of the label budget.

Everything is a pure function of (seed, number of clients, alpha, sizes), computed for the
whole federation at once (the Dirichlet split needs every client's draw) and cached, so a
cohort of any size sees the same pool for the same client.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from workloads import streams
from workloads.digits import digits  # noqa: F401  (re-exported: the workload's data)

STREAM_SPLIT = streams.AL_SPLIT
STREAM_SEED_SET = streams.AL_SEED_SET
MIN_POOL = 2  # every client holds at least this many samples
SPLIT_ATTEMPTS = 100


class SplitError(ValueError):
    """The federation cannot be split as asked (names the scenario field to change)."""


def apportion(total: int, weights: np.ndarray, minimum: int = 0) -> np.ndarray:
    """Integers summing to ``total``, proportional to ``weights`` (largest remainders),
    each at least ``minimum``; ties go to the lower index."""
    n = len(weights)
    rest = total - minimum * n
    if rest < 0:
        raise ValueError(f"cannot give {n} clients at least {minimum} of {total}")
    exact = rest * weights / weights.sum()
    share = np.floor(exact).astype(np.int64)
    left = rest - int(share.sum())
    share[np.argsort(-(exact - share), kind="stable")[:left]] += 1
    return share + minimum


@dataclass(frozen=True)
class Split:
    test: np.ndarray  # indices into digits() of the held-out test set
    pools: tuple[np.ndarray, ...]  # per client: indices into digits() of its pool
    seed_sets: tuple[np.ndarray, ...]  # per client: positions in its pool labeled at start
    budget: np.ndarray  # (clients,) labels each client reveals per query cycle


@lru_cache(maxsize=8)
def split_federation(
    seed: int, clients: int, alpha: float, test_size: int, initial_labels: int, budget: int
) -> Split:
    """Hold out ``test_size`` images, split the rest over ``clients`` with a per-class
    Dirichlet(alpha) (redrawn until every client holds at least ``MIN_POOL`` images), and
    apportion the initial labels (at least one each) and the per-cycle budget by pool size."""
    images, targets = digits()
    rng = np.random.default_rng(np.random.SeedSequence([seed, STREAM_SPLIT]))
    order = rng.permutation(len(targets))
    test, pool = np.sort(order[:test_size]), order[test_size:]
    if len(pool) < clients * MIN_POOL:
        raise SplitError(
            f"federation.clients: {clients} clients cannot each hold {MIN_POOL} of the "
            f"{len(pool)} pool images (lower clients or active_learning.test_size)"
        )
    for _ in range(SPLIT_ATTEMPTS):
        owners = np.empty(len(pool), np.int64)
        for c in range(targets.max() + 1):
            members = pool[targets[pool] == c]
            cuts = (np.cumsum(rng.dirichlet(np.full(clients, alpha))) * len(members)).astype(int)[:-1]
            owners[np.isin(pool, members)] = np.repeat(np.arange(clients), np.diff([0, *cuts, len(members)]))
        sizes = np.bincount(owners, minlength=clients)
        if sizes.min() >= MIN_POOL:
            break
    else:
        raise SplitError(
            f"active_learning.alpha: after {SPLIT_ATTEMPTS} Dirichlet draws some client still "
            f"held fewer than {MIN_POOL} images (raise alpha or lower federation.clients)"
        )
    pools = tuple(np.sort(pool[owners == i]) for i in range(clients))
    initial = apportion(initial_labels, sizes.astype(float), minimum=1)
    initial = np.minimum(initial, sizes)
    seed_sets = tuple(
        np.sort(
            np.random.default_rng(np.random.SeedSequence([seed, STREAM_SEED_SET, i]))
            .choice(sizes[i], initial[i], replace=False)
        )
        for i in range(clients)
    )
    return Split(test, pools, seed_sets, apportion(budget, sizes.astype(float)))
