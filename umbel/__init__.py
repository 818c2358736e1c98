"""umbel: federated learning with clients that fall into clusters, built on Flower.

The command line is ``umbel`` (``umbel.cli``); from Python, ``umbel.simulate`` runs a
scenario with your own strategy objects and returns its record (``umbel.api``).
"""

from umbel.api import RunResult, simulate

__all__ = ["RunResult", "simulate"]
