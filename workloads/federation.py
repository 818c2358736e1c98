"""Who holds what: client-size laws and deterministic per-client random streams.

Every client's draws depend only on (seed, client id): clients are generated in fixed
blocks of ``BLOCK`` ids, each block from its own ``SeedSequence``, so a cohort of any size
(one client or ten thousand) sees exactly the same data for the same client.
"""

from __future__ import annotations

import numpy as np

BLOCK = 2048  # clients per generation block; fixed so data never depend on the cohort size

# Stream tags keep independent draws apart (sizes, labels, features...) for the same block.
STREAM_TRUTH = 1
STREAM_BLOCK = 2

SIZE_LAWS = ("fixed", "uniform", "zipf")


def block_rng(seed: int, block: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, STREAM_BLOCK, block]))


def draw_sizes(
    rng: np.random.Generator,
    count: int,
    law: str,
    min_size: int,
    max_size: int,
    zipf_exponent: float,
) -> np.ndarray:
    """Local dataset sizes under a size law, always within [min_size, max_size].

    - ``fixed``: every client holds ``min_size`` points;
    - ``uniform``: integers uniform on [min_size, max_size];
    - ``zipf``: ``min_size - 1 + Zipf(zipf_exponent)`` capped at ``max_size`` (heavy tail:
      with exponent 1.6 and min_size 1 about 60% of clients hold one or two points).
    """
    if law == "fixed":
        return np.full(count, min_size, dtype=np.int64)
    if law == "uniform":
        return rng.integers(min_size, max_size + 1, size=count, dtype=np.int64)
    if law == "zipf":
        return np.minimum(min_size - 1 + rng.zipf(zipf_exponent, size=count), max_size).astype(
            np.int64
        )
    raise ValueError(f"unknown size law {law!r}; expected one of {SIZE_LAWS}")


def cohort_slice(partition_id: int, num_partitions: int, num_clients: int) -> np.ndarray:
    """Client ids hosted by node ``partition_id`` of ``num_partitions``: a contiguous slice."""
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition-id {partition_id} outside [0, {num_partitions})")
    lo = partition_id * num_clients // num_partitions
    hi = (partition_id + 1) * num_clients // num_partitions
    return np.arange(lo, hi, dtype=np.int64)


def num_nodes(num_clients: int, cohort_size: int) -> int:
    """Nodes needed to host every client in cohorts of at most ``cohort_size``."""
    return -(-num_clients // cohort_size)


STREAM_PARTICIPATION = 3
STREAM_DROPOUT = 4
STREAM_INIT = 5
_MASK64 = (1 << 64) - 1


def _splitmix64(z: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser: a well-mixed 64-bit hash (vectorised, wraps mod 2^64)."""
    z = np.array(z, dtype=np.uint64, ndmin=1)
    with np.errstate(over="ignore"):  # multiplication modulo 2^64 is the point
        z = z + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def client_uniform(seed: int, stream: int, client_ids: np.ndarray, round_: int) -> np.ndarray:
    """A uniform [0, 1) draw per client, a pure function of (seed, stream, client id, round).

    Counter-based, so a cohort of any size draws the same value for the same client, and a
    million clients cost one vectorised pass.
    """
    key = _splitmix64(np.uint64(seed & _MASK64) ^ _splitmix64(np.uint64(stream)))
    key = _splitmix64(key ^ np.uint64(round_ & _MASK64))
    bits = _splitmix64(key ^ np.asarray(client_ids, dtype=np.uint64))
    return (bits >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def active_clients(
    seed: int, client_ids: np.ndarray, round_: int, participation: float, dropout: float
) -> np.ndarray:
    """Clients that train this round: sampled with probability ``participation`` and then
    not dropping out (probability ``dropout``)."""
    sampled = client_uniform(seed, STREAM_PARTICIPATION, client_ids, round_) < participation
    stays = client_uniform(seed, STREAM_DROPOUT, client_ids, round_) >= dropout
    return sampled & stays
