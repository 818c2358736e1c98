"""What a ClientApp on a real device reads and keeps on disk.

A SuperNode's ``node_config`` names the device's data and state:

- ``data-path``: one client's data file, or a folder of them (one device hosting several
  clients). The format is the workload's (``Workload.read_device_file``); ``umbel data
  export`` writes the exact files of a simulated federation.
- ``state-dir``: where the device keeps what must survive a SuperNode restart (Flower's
  ``context.state`` lives in the SuperNode's memory only): the rounds it has taken part
  in and the cluster it chose last, per arm (``DeviceState``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from workloads.device_files import DeviceDataError

DEVICE_DATA_ERROR = 1001  # Error.code of a reply whose device data could not be read
STATE_FILE = "umbel-device-state.json"


def data_files(data_path: str) -> list[Path]:
    """The client files at ``data-path``: the file itself, or a folder's ``*.npz``."""
    path = Path(data_path).expanduser()
    if path.is_dir():
        files = sorted(path.glob("*.npz"))
        if not files:
            raise DeviceDataError(f"data-path {path}: the folder holds no .npz files")
        return files
    if not path.exists():
        raise DeviceDataError(f"data-path {path}: no such file or folder")
    return [path]


class DeviceState:
    """Per-arm progress of a device, in ``<state-dir>/umbel-device-state.json``.

    Written atomically after every reply, read back when the SuperNode (re)starts: a device
    that went down rejoins knowing its rounds and its last cluster.
    """

    def __init__(self, state_dir: str) -> None:
        self.path = Path(state_dir).expanduser() / STATE_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def read(self) -> dict[str, Any]:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError):  # a damaged state file: start over, never crash
            return {}

    def arm(self, arm: str) -> dict[str, Any]:
        return self.read().get(arm, {})

    def record_round(self, arm: str, round_: int, clusters: dict[int, int] | None) -> dict[str, Any]:
        """After a reply: one more round taken part in, and the clients' chosen clusters."""
        state = self.read()
        entry = state.setdefault(arm, {"rounds": 0})
        entry["rounds"] = int(entry.get("rounds", 0)) + 1
        entry["last_round"] = int(round_)
        if clusters is not None:
            entry["clusters"] = {str(c): int(k) for c, k in clusters.items()}
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=1, sort_keys=True))
        os.replace(tmp, self.path)
        return entry
