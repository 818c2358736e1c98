"""Aggregation strategies: pure numpy cores (``aggregation``) under thin Flower classes.

``build_strategy`` maps a scenario's strategy name to a configured Flower ``Strategy``. The
clustered mixed-regression strategy (Su, Xu, Yang 2022), IFCA and the oracle register here
next to FedAvg and FedProx.
"""

from __future__ import annotations

from flwr.serverapp.strategy import Strategy

from strategies.fedavg import CohortFedAvg, CohortFedProx

STRATEGIES = ("fedavg", "fedprox")


def build_strategy(name: str, num_nodes: int, proximal_mu: float) -> Strategy:
    """A strategy that waits for, and trains on, all ``num_nodes`` cohorts every round."""
    nodes = dict(
        fraction_train=1.0,
        fraction_evaluate=1.0,
        min_train_nodes=num_nodes,
        min_evaluate_nodes=num_nodes,
        min_available_nodes=num_nodes,
    )
    if name == "fedavg":
        return CohortFedAvg(**nodes)
    if name == "fedprox":
        return CohortFedProx(proximal_mu=proximal_mu, **nodes)
    raise ValueError(f"unknown strategy {name!r}; expected one of {list(STRATEGIES)}")
