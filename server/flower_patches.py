"""Every patch of Flower internals umbel makes, for one Flower version only.

Each patch replaces or sets something Flower does not expose as a setting. They were read
from, and measured on, flwr ``PATCHED_FLOWER``; with any other installed version each
function logs a warning, leaves Flower as it is and returns False (umbel then runs on
Flower's own behaviour: slower, never different results). ``tests/test_flower_patches.py``
fails when the installed flwr is not ``PATCHED_FLOWER`` or when an attribute a patch
touches (``PATCHED_ATTRIBUTES``) no longer exists, so an upgrade cannot drop one silently:
re-read the Flower code each patch names, re-measure, then bump ``PATCHED_FLOWER``.

The patches:

1. ``quicker_engine_poll(nodes)`` (simulation engine; called by ``simulations.launcher``).
   *What*: replaces ``flwr.server.superlink.fleet.vce.vce_api.add_messages_to_queue``, the
   loop that moves messages from the LinkState to the Ray workers, with the same loop waiting
   0.5 ms per node (5 ms at least, 0.1 s at most) instead of a hard-coded 0.1 s per pass.
   *Why*: that wait was a floor under every round (~0.1 s), and dominated rounds of up to
   10^5 clients. *Measured*: small FedAvg rounds went from 0.098 s to 0.016 s (README,
   "Simulation throughput"); large federations of single-client nodes do not spin the driver.
2. ``supernode_timings(poll, heartbeat)`` (a deployment's SuperNode; called by
   ``deployment.supernode`` before it starts Flower's SuperNode in its own process).
   *What*: the SuperNode's idle wait between requests for messages (``time.sleep(3)`` in
   ``flwr.supernode.start_client_internal``) becomes ``poll``; the heartbeat interval it
   announces and keeps (``HEARTBEAT_DEFAULT_INTERVAL``, 30 s, in
   ``flwr.supernode.fleet_http_connection`` and ``flwr.supercore.heartbeat``) becomes
   ``heartbeat``. *Why*: the 3 s poll is most of a deployment round's latency on a LAN, and
   the SuperLink refuses a restarted node with the same key for two heartbeat intervals
   (60 s). *Measured*: ``--poll 0.5`` took a ``deploy-tiny`` round from 10.3 s to 9.1 s and
   the run from 133 s to 114 s (README, "Deployment against simulation"); ``--heartbeat 10``
   lets a crashed device rejoin after 20 s instead of 60 s. Results do not depend on either.
3. ``allow_messages_outside_a_run()`` (in-process exchanges, tests and benchmarks that build
   Flower ``Message`` objects without a ServerApp or ClientApp process).
   *What*: sets the class attributes of ``flwr.supercore.task_identity.TaskIdentity`` (run,
   node and task id) that Flower's runtime sets when it starts an app process. *Why*:
   ``Message(...)`` reads them and raises ``RuntimeError: TaskIdentity.run_id is not set``
   otherwise. *Effect*: messages built in-process carry run 1, node 0, task 1; a real Flower
   run sets its own identity when its process starts, so nothing of a run changes.
4. ``skip_forced_collections()`` (a Flower strategy aggregating umbel's per-client replies;
   called by ``server.app.strategy_for`` when it builds one). *What*: the module ``gc`` of
   ``flwr.app.message.arrayrecord`` becomes a stand-in whose ``collect`` does nothing.
   *Why*: ``ArrayRecord.to_numpy_ndarrays(keep_input=False)``, which QFedAvg and Bulyan call
   once per reply, forces a full garbage collection every call (about 40 ms here), so a
   round of 24 one-client replies spent 1 s collecting. Arrays are still freed as soon as
   nothing refers to them (reference counting), and Python's own collector still runs.
   *Measured*: QFedAvg on 24 clients, 3 rounds, in-process: 3.0 s -> 0.07 s; same results.
"""

from __future__ import annotations

import gc
import logging
import time
from typing import Any

PATCHED_FLOWER = "1.42.0"

FLOWER_POLL_S = 3.0  # Flower 1.42's SuperNode idle wait between requests for messages
FLOWER_HEARTBEAT_S = 30.0  # Flower 1.42's heartbeat interval (HEARTBEAT_DEFAULT_INTERVAL)

# What each patch replaces, sets or relies on: "module:attribute" (attributes may be dotted).
PATCHED_ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "quicker_engine_poll": ("flwr.server.superlink.fleet.vce.vce_api:add_messages_to_queue",),
    "supernode_timings": (
        "flwr.supernode.start_client_internal:time",
        "flwr.supernode.fleet_http_connection:HEARTBEAT_DEFAULT_INTERVAL",
        "flwr.supercore.heartbeat:HEARTBEAT_DEFAULT_INTERVAL",
        "flwr.common.constant:HEARTBEAT_DEFAULT_INTERVAL",
    ),
    "skip_forced_collections": ("flwr.app.message.arrayrecord:gc",),
    "allow_messages_outside_a_run": (
        "flwr.supercore.task_identity:TaskIdentity.run_id",
        "flwr.supercore.task_identity:TaskIdentity.node_id",
        "flwr.supercore.task_identity:TaskIdentity.task_id",
    ),
}


def missing_attributes() -> list[str]:
    """The entries of ``PATCHED_ATTRIBUTES`` the installed Flower lacks (empty: all there).
    Looks attributes up without reading them (``TaskIdentity``'s raise until set)."""
    import importlib

    missing = []
    for patch, targets in PATCHED_ATTRIBUTES.items():
        for target in targets:
            module_name, _, path = target.partition(":")
            try:
                obj: Any = importlib.import_module(module_name)
            except ImportError:
                missing.append(f"{patch}: {target} (no module {module_name})")
                continue
            *parents, name = path.split(".")
            try:
                for part in parents:
                    obj = getattr(obj, part)
            except AttributeError:
                missing.append(f"{patch}: {target}")
                continue
            owners = [obj, *getattr(type(obj), "__mro__", ()), *getattr(obj, "__mro__", ())]
            if not any(name in getattr(o, "__dict__", {}) for o in owners):
                missing.append(f"{patch}: {target}")
    return missing


logger = logging.getLogger("umbel.flower_patches")
_warned: set[str] = set()


def installed_flower() -> str:
    import flwr

    return str(flwr.__version__)


def flower_matches(patch: str) -> bool:
    """True when the installed flwr is the patched version; otherwise warn (once per patch)
    that ``patch`` is skipped and Flower runs unpatched."""
    version = installed_flower()
    if version == PATCHED_FLOWER:
        return True
    if patch not in _warned:
        _warned.add(patch)
        logger.warning("umbel: flwr %s is installed but the patch %s was made for flwr %s; "
                       "Flower runs unpatched (see server/flower_patches.py)", version, patch, PATCHED_FLOWER)
    return False


def quicker_engine_poll(nodes: int) -> bool:
    """Patch 1 (see the module doc): the simulation engine's message loop waits 0.5 ms per
    node (5 ms to 0.1 s) instead of 0.1 s. Returns whether Flower was patched."""
    if not flower_matches("quicker_engine_poll"):
        return False
    from flwr.server.superlink.fleet.vce import vce_api

    interval = min(0.1, max(0.005, 0.0005 * nodes))

    def add_messages_to_queue(state, queue, nodes_mapping, f_stop) -> None:  # type: ignore[no-untyped-def]
        while not f_stop.is_set():
            for node_id in nodes_mapping.keys():
                for msg in state.get_message_ins(node_id=node_id, limit=1):
                    queue.put(msg)
            f_stop.wait(interval)

    vce_api.add_messages_to_queue = add_messages_to_queue
    return True


class _PollClock:
    """``time`` for Flower's SuperNode loop, with its idle wait replaced by ``poll``."""

    def __init__(self, poll: float) -> None:
        self.poll = poll

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    def sleep(self, seconds: float) -> None:
        time.sleep(self.poll if seconds == FLOWER_POLL_S else seconds)


def supernode_timings(poll: float, heartbeat: float) -> bool:
    """Patch 2 (see the module doc): the SuperNode polls every ``poll`` seconds and
    announces (and keeps) a ``heartbeat``-second heartbeat. Returns whether Flower was
    patched; call it in the SuperNode's process before Flower's SuperNode starts."""
    if not flower_matches("supernode_timings"):
        return False
    from flwr.supercore import heartbeat as sender
    from flwr.supernode import fleet_http_connection, start_client_internal

    if poll != FLOWER_POLL_S:
        start_client_internal.time = _PollClock(poll)
    # The interval announced to the SuperLink and the one the sender keeps must agree.
    fleet_http_connection.HEARTBEAT_DEFAULT_INTERVAL = heartbeat
    sender.HEARTBEAT_DEFAULT_INTERVAL = heartbeat
    return True


def allow_messages_outside_a_run(run_id: int = 1, node_id: int = 0, task_id: int = 1) -> bool:
    """Patch 3 (see the module doc): the task identity Flower's runtime would set, so that
    ``flwr.app.Message`` objects can be built in this process. Returns whether it was set."""
    if not flower_matches("allow_messages_outside_a_run"):
        return False
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = run_id, node_id, task_id
    return True


class _NoCollect:
    """``gc`` with ``collect`` a no-op (see patch 4)."""

    def __getattr__(self, name: str) -> Any:
        return getattr(gc, name)

    @staticmethod
    def collect(generation: int = 2) -> int:
        return 0


def skip_forced_collections() -> bool:
    """Patch 4 (see the module doc): ``ArrayRecord`` conversions no longer force a garbage
    collection. Returns whether Flower was patched."""
    if not flower_matches("skip_forced_collections"):
        return False
    from flwr.app.message import arrayrecord

    arrayrecord.gc = _NoCollect()
    return True
