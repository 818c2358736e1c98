"""Who holds what: client-size laws and deterministic per-client random streams.

Every client's draws depend only on (seed, client id): clients are generated in fixed
blocks of ``BLOCK`` ids, each block from its own ``SeedSequence``, so a cohort of any size
(one client or ten thousand) sees exactly the same data for the same client.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.special import ndtri, zeta

from workloads import streams

BLOCK = 2048  # clients per generation block; fixed so data never depend on the cohort size

# Stream tags keep independent draws apart (sizes, labels, features...) for the same block.
STREAM_TRUTH = streams.TRUTH
STREAM_BLOCK = streams.BLOCK

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


def mean_size(law: str, min_size: int, max_size: int, zipf_exponent: float) -> float:
    """Expected local dataset size under a size law (as drawn by ``draw_sizes``)."""
    if law == "fixed":
        return float(min_size)
    if law == "uniform":
        return (min_size + max_size) / 2
    top = max_size - min_size + 1  # Zipf values above this are capped
    k = np.arange(1, top + 1, dtype=np.float64)
    pmf = k**-zipf_exponent / zeta(zipf_exponent)
    return float(((min_size - 1 + k) * pmf).sum() + max_size * max(0.0, 1 - pmf.sum()))


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


STREAM_PARTICIPATION = streams.PARTICIPATION
STREAM_DROPOUT = streams.DROPOUT
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


# ---- availability traces and stragglers (FedScale-style device behaviour) ------------------

STREAM_AVAILABILITY = streams.AVAILABILITY
STREAM_PHASE = streams.PHASE
STREAM_LATENCY = streams.LATENCY
AVAILABILITY_TRACES = ("always", "bernoulli", "diurnal")
OUTCOMES = ("unavailable", "not_sampled", "dropped_out", "late")  # why a client is not aggregated
HOURS_PER_DAY = 24.0
# The scenario schema's defaults for who takes part in a round (one source for both).
PARTICIPATION_DEFAULTS: dict[str, Any] = {
    "participation": 1.0, "dropout": 0.0, "availability": "always",
    "availability_probability": 0.8, "online_hours": 8.0, "hours_per_round": 1.0,
    "deadline_s": 0.0, "latency_median_s": 1.0, "latency_sigma": 0.5,
}


# Simulated model poisoning: a fixed share of clients scale their update (new - sent).
ATTACK_DEFAULTS: dict[str, Any] = {"scaled_update_fraction": 0.0, "scaled_update_factor": 10.0}
STREAM_SCALED_UPDATES = streams.SCALED_UPDATES


def _setting(federation: dict[str, Any], key: str) -> Any:
    return federation.get(key, {**PARTICIPATION_DEFAULTS, **ATTACK_DEFAULTS}[key])


def update_scales(federation: dict[str, Any], client_ids: np.ndarray) -> np.ndarray | None:
    """Per client, the factor its update is multiplied by before it is sent: the scenario's
    ``scaled_update_factor`` for a fixed, seeded ``scaled_update_fraction`` of the clients
    (the same clients every round), 1 for the others; None when nobody scales."""
    fraction = _setting(federation, "scaled_update_fraction")
    if fraction <= 0:
        return None
    scaling = client_uniform(federation["seed"], STREAM_SCALED_UPDATES, client_ids, 0) < fraction
    return np.where(scaling, float(_setting(federation, "scaled_update_factor")), 1.0)


def available(federation: dict[str, Any], client_ids: np.ndarray, round_: int) -> np.ndarray:
    """Which clients are online at this round under the scenario's availability trace.

    - ``always``;
    - ``bernoulli``: online with probability ``availability_probability``, independently
      per round;
    - ``diurnal``: each client is online ``online_hours`` a day from its own start hour
      (uniform, fixed per client); round r happens at hour (r - 1) * ``hours_per_round``.
    """
    trace = _setting(federation, "availability")
    seed = int(federation["seed"])
    if trace == "always":
        return np.ones(len(client_ids), dtype=bool)
    if trace == "bernoulli":
        p = float(_setting(federation, "availability_probability"))
        return client_uniform(seed, STREAM_AVAILABILITY, client_ids, round_) < p
    if trace == "diurnal":
        start = HOURS_PER_DAY * client_uniform(seed, STREAM_PHASE, client_ids, 0)
        hour = ((round_ - 1) * float(_setting(federation, "hours_per_round"))) % HOURS_PER_DAY
        return (hour - start) % HOURS_PER_DAY < float(_setting(federation, "online_hours"))
    raise ValueError(f"unknown availability trace {trace!r}; expected one of {AVAILABILITY_TRACES}")


def latency(federation: dict[str, Any], client_ids: np.ndarray, round_: int) -> np.ndarray:
    """Simulated seconds a client needs to train and reply: lognormal around
    ``latency_median_s``, half from a per-device speed (fixed per client, so slow devices
    stay slow) and half from per-round jitter."""
    seed = int(federation["seed"])
    device = ndtri(np.clip(client_uniform(seed, STREAM_LATENCY, client_ids, 0), 1e-12, 1 - 1e-12))
    jitter = ndtri(np.clip(client_uniform(seed, STREAM_LATENCY, client_ids, round_), 1e-12, 1 - 1e-12))
    sigma = float(_setting(federation, "latency_sigma"))
    return float(_setting(federation, "latency_median_s")) * np.exp(sigma * (device + jitter) / np.sqrt(2))


@dataclass(frozen=True, kw_only=True)  # built from scenario tables: keywords only
class Participation:
    """Who takes part in a round (``active``) and, for the others, why not."""

    active: np.ndarray
    unavailable: np.ndarray
    not_sampled: np.ndarray
    dropped_out: np.ndarray
    late: np.ndarray  # replied after the round's deadline: dropped and counted

    def counts(self) -> np.ndarray:
        """(4,) client counts in ``OUTCOMES`` order."""
        return np.array([int(getattr(self, name).sum()) for name in OUTCOMES], dtype=np.int64)


def round_participation(federation: dict[str, Any], client_ids: np.ndarray, round_: int) -> Participation:
    """Online (availability trace), then sampled (``participation``), then not dropping out
    (``dropout``), then on time (latency within ``deadline_s``; 0 = no deadline)."""
    seed = int(federation["seed"])
    online = available(federation, client_ids, round_)
    sampled = client_uniform(seed, STREAM_PARTICIPATION, client_ids, round_) < float(
        _setting(federation, "participation"))
    stays = client_uniform(seed, STREAM_DROPOUT, client_ids, round_) >= float(
        _setting(federation, "dropout"))
    deadline = float(_setting(federation, "deadline_s"))
    on_time = latency(federation, client_ids, round_) <= deadline if deadline > 0 else True
    return Participation(
        active=online & sampled & stays & on_time,
        unavailable=~online,
        not_sampled=online & ~sampled,
        dropped_out=online & sampled & ~stays,
        late=online & sampled & stays & ~on_time,
    )
