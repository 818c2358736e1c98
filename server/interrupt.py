"""Stopping a run on SIGINT or SIGTERM: between rounds, with nothing written after the signal.

``stop_on_signals()`` (the launcher, in the main thread) turns both signals into a request:
the handler only sets a flag. The round engine checks it while it waits for replies and
before it records a round (``check``), and raises ``Interrupted`` in the thread that runs the
rounds; Flower then stops its simulation engine and Ray the usual way, and the launcher
marks the record ``interrupted``. A second signal says the run is stopping; a third exits at
once (nothing is cleaned up then).

Ray's driver takes SIGTERM for itself when it starts: a Python handler that exits the
process mid-round, and a C++ "failure signal handler" that prints a stack dump and aborts
(code 134). While ``stop_on_signals`` is active, both are left out in this process (``RAY_HOOKS``;
Ray's own processes keep theirs), so SIGTERM stops a run the same way as Ctrl-C.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import import_module

SIGNALS = (signal.SIGINT, signal.SIGTERM)
# What Ray's driver reads when it starts (checked by tests/test_interrupt.py): the function
# that installs its SIGTERM handler, and the switch of its C++ failure signal handler.
RAY_HOOKS = {"ray._private.utils:set_sigterm_handler": lambda handler: None,
             "ray._private.ray_constants:RAY_DISABLE_FAILURE_SIGNAL_HANDLER": True}

_stop = threading.Event()
_received: list[int] = []


class Interrupted(Exception):
    """A signal asked the run to stop (an ``Exception``, so Flower's ServerApp thread hands
    it to the simulation's caller like any failure)."""

    def __init__(self, signum: int) -> None:
        self.signum, self.signal_name = signum, signal.Signals(signum).name
        super().__init__(f"interrupted by {self.signal_name}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # the shell's convention: 130 for SIGINT, 143 for SIGTERM


def request_stop(signum: int = signal.SIGINT) -> None:
    """Ask the running rounds to stop (what the signal handler does)."""
    _received.append(signum)
    _stop.set()


def requested() -> int:
    """The first signal received, or 0 when no stop was requested."""
    return _received[0] if _stop.is_set() else 0


def check() -> None:
    """Raise ``Interrupted`` when a stop was requested."""
    if _stop.is_set():
        raise Interrupted(_received[0])


def reset() -> None:
    _stop.clear()
    _received.clear()


def _handler(signum: int, frame: object) -> None:
    request_stop(signum)
    count = len(_received)
    if count == 1:
        print(f"\n{signal.Signals(signum).name}: stopping after the replies in flight "
              "(again to be told, a third time to exit at once)", file=sys.stderr, flush=True)
    elif count == 2:
        print("stopping: the round in flight is being discarded; a third signal exits at once "
              "(nothing cleaned up)", file=sys.stderr, flush=True)
    else:
        os._exit(128 + signum)


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """SIGINT and SIGTERM request a stop while the block runs (main thread only; elsewhere
    the block runs with the process's own handlers)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    reset()
    previous = {s: signal.getsignal(s) for s in SIGNALS}
    ray_hooks = _hold_ray_handlers()
    for s in SIGNALS:
        signal.signal(s, _handler)
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        ray_hooks()


def _hold_ray_handlers():
    """Keep Ray's driver from taking SIGTERM in this process; returns the undo."""
    undo = []
    for target, value in RAY_HOOKS.items():
        module_name, _, attribute = target.partition(":")
        try:
            module = import_module(module_name)
            original = getattr(module, attribute)
        except (ImportError, AttributeError):  # no Ray here, or another Ray: its handlers stay
            continue
        setattr(module, attribute, value)
        undo.append((module, attribute, original))
    return lambda: [setattr(m, a, v) for m, a, v in undo]
