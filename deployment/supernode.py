"""Flower's SuperNode with two of its hard-coded timings made settable, and a rejoin loop.

``python -m deployment.supernode [--poll S] [--heartbeat S] [--rejoin S] -- ARGS`` runs
``flower-supernode ARGS`` (the same code, in this process) with

- ``--poll``: seconds between the node's requests for new messages. Flower 1.42 sleeps a
  fixed 3 s, which is most of a deployment round's latency; edge devices on metered links
  may prefer it, a LAN or a test does not.
- ``--heartbeat``: the interval the node announces to the SuperLink (Flower's fixed 30 s;
  10 s at least). The SuperLink holds a silent node online for two intervals, and refuses
  a restarted node with the same key until then.
- ``--rejoin``: after a crash, keep restarting the node for this many seconds while the
  SuperLink still holds its old session (Flower exits at once when refused). 0: off, so a
  node refused for good (unregistered key) fails fast.

The timings are a patch of Flower internals (``server.flower_patches.supernode_timings``):
only the Flower version it was made for is patched; others run unchanged, with a warning.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

from server.flower_patches import FLOWER_HEARTBEAT_S, FLOWER_POLL_S, PATCHED_FLOWER, supernode_timings


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m deployment.supernode")
    p.add_argument("--poll", type=float, default=FLOWER_POLL_S)
    p.add_argument("--heartbeat", type=float, default=FLOWER_HEARTBEAT_S)
    p.add_argument("--rejoin", type=float, default=0.0)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    own, flower = (argv[: argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    args = _parser().parse_args(own)
    if not 0.05 <= args.poll <= 60:
        raise SystemExit(f"--poll {args.poll}: expected seconds in [0.05, 60]")
    if not 10 <= args.heartbeat <= 1800:
        raise SystemExit(f"--heartbeat {args.heartbeat}: Flower accepts [10, 1800] seconds")
    if args.rejoin > 0:  # a child per attempt: Flower's SuperNode exits the process when refused
        child = [sys.executable, "-m", "deployment.supernode", "--poll", str(args.poll),
                 "--heartbeat", str(args.heartbeat), "--", *flower]
        deadline = time.monotonic() + args.rejoin
        while True:
            code = subprocess.call(child)
            if code == 0 or time.monotonic() > deadline:
                return code
            print(f"umbel: SuperNode exited ({code}); the SuperLink may still hold this node's "
                  "old session: retrying in 2 s", flush=True)
            time.sleep(2)
    if not supernode_timings(args.poll, args.heartbeat):
        print(f"umbel: this flwr is not {PATCHED_FLOWER}: --poll and --heartbeat are ignored", flush=True)
    from flwr.supernode.cli.flower_supernode import flower_supernode

    sys.argv = ["flower-supernode", *flower]
    flower_supernode()
    return 0


if __name__ == "__main__":
    sys.exit(main())
