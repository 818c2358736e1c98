"""A new aggregation rule in a few lines, on umbel's federations: FedAvg of updates clipped to
the round's median update norm, so a few clients that scale their updates cannot drag the
model. It runs beside FedAvg and clustered-fedavg on the default federation, where 10% of
the clients send updates scaled by 10. Usage: python examples/own_strategy.py [ROUNDS]"""

import sys

import numpy as np
from flwr.app import Array, ArrayRecord
from flwr.serverapp.strategy import FedAvg

from umbel import simulate


class MedianNormFedAvg(FedAvg):
    """FedAvg on one reply per client, each update clipped to the median update norm."""

    def configure_train(self, server_round, arrays, config, grid):
        self.current = {k: v.numpy() for k, v in arrays.items()}
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round, replies):
        replies = [r for r in replies if not r.has_error()]
        updates = [{k: r.content["arrays"][k].numpy() - c for k, c in self.current.items()} for r in replies]
        norms = np.array([np.sqrt(sum((u ** 2).sum() for u in up.values())) for up in updates])
        scale = np.minimum(1.0, np.median(norms) / np.maximum(norms, 1e-12))
        n = np.array([r.content["metrics"]["num-examples"] for r in replies], float)
        new = {k: c + sum(w * s * up[k] for w, s, up in zip(n, scale, updates)) / n.sum()
               for k, c in self.current.items()}
        return ArrayRecord({k: Array(v) for k, v in new.items()}), None


def main(rounds: int = 150, ray_address: str | None = None, out: str = "runs"):
    return simulate("default", strategies={"median-norm": MedianNormFedAvg()}, out=out, ray_address=ray_address,
                    overrides=[f"run.rounds={rounds}", 'run.strategies=["fedavg", "clustered-fedavg"]',
                               "federation.scaled_update_fraction=0.1", "federation.scaled_update_factor=10.0"])


if __name__ == "__main__":
    print(main(int(sys.argv[1]) if len(sys.argv) > 1 else 150).table())
