"""Device data files: one client's local data in one file (``umbel data export`` writes
them; a SuperNode's ``data-path`` names them). Each workload documents its own format."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np


class DeviceDataError(ValueError):
    """The device's data file is missing, unreadable or does not fit the scenario."""


def read_npz(path: Path, required: dict[str, int]) -> dict[str, np.ndarray]:
    """The arrays of one ``.npz`` file, with the ``required`` keys at the given number of
    dimensions. Names the file and what is wrong: unreadable, truncated, missing keys."""
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as err:
        raise DeviceDataError(f"{path}: not a readable .npz file (truncated or corrupt?): {err}") from None
    for key, ndim in required.items():
        if key not in arrays:
            raise DeviceDataError(f"{path}: missing array {key!r} (has {sorted(arrays)})")
        if arrays[key].ndim != ndim:
            raise DeviceDataError(
                f"{path}: {key!r} has shape {arrays[key].shape}; expected {ndim} dimension(s)"
            )
    return arrays


def scalar_int(path: Path, arrays: dict[str, np.ndarray], key: str, low: int, high: int | None,
               what: str = "") -> int:
    """The integer scalar ``arrays[key]`` in ``[low, high)`` (``high`` None: no upper bound)."""
    value = arrays[key]
    if value.shape != () or not np.issubdtype(value.dtype, np.integer):
        raise DeviceDataError(f"{path}: {key!r} must be an integer scalar, got shape {value.shape} "
                              f"of {value.dtype}")
    v = int(value)
    if v < low or (high is not None and v >= high):
        bound = f"[{low}, {high})" if high is not None else f">= {low}"
        raise DeviceDataError(f"{path}: {key} {v} is outside {what or 'the expected range'} {bound}")
    return v


def client_id(path: Path, arrays: dict[str, np.ndarray], num_clients: int) -> int:
    """The file's ``client_id``: an integer scalar in this scenario's ``[0, clients)``."""
    return scalar_int(path, arrays, "client_id", 0, num_clients, "this scenario's")


def optional_cluster(path: Path, arrays: dict[str, np.ndarray], k: int) -> int | None:
    """The true cluster (``cluster``) of a file written by ``umbel data export --labels``;
    None for a real device's file, which has none."""
    if "cluster" not in arrays:
        return None
    return scalar_int(path, arrays, "cluster", 0, k, "the scenario's clusters")


def check_shape(path: Path, key: str, array: np.ndarray, shape: tuple[int | None, ...]) -> None:
    """``array`` has ``shape`` (None: any size on that axis) and holds finite numbers."""
    if array.ndim != len(shape) or any(s is not None and a != s for a, s in zip(array.shape, shape)):
        expected = "(" + ", ".join("n" if s is None else str(s) for s in shape) + ")"
        raise DeviceDataError(f"{path}: {key!r} has shape {array.shape}; expected {expected}")
    if not (np.issubdtype(array.dtype, np.number) or array.dtype == bool):
        raise DeviceDataError(f"{path}: {key!r} holds {array.dtype}; expected numbers")
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        raise DeviceDataError(f"{path}: {key!r} holds NaN or infinite values")


def check_classes(path: Path, key: str, values: np.ndarray, classes: int) -> None:
    """``values`` are integer class labels in ``[0, classes)``."""
    if not np.issubdtype(values.dtype, np.integer) or values.min() < 0 or values.max() >= classes:
        raise DeviceDataError(f"{path}: {key!r} must be classes 0-{classes - 1} (integers)")


def by_client(files: list[Path], clients: list[tuple]) -> list[tuple]:
    """One device's clients (tuples starting with the client id, read from ``files``),
    checked to be distinct and sorted by id."""
    distinct_ids(files, [c[0] for c in clients])
    return sorted(clients, key=lambda c: c[0])


def offsets(sizes: list[int]) -> np.ndarray:
    """Where each client's rows start in the concatenation, and the end."""
    return np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)


def rows_of(starts: np.ndarray, index: np.ndarray) -> np.ndarray:
    """The rows of the clients at positions ``index`` in a concatenation cut by ``starts``."""
    pieces = [np.arange(starts[j], starts[j + 1]) for j in index]
    return np.concatenate(pieces) if pieces else np.empty(0, np.int64)


def distinct_ids(files: list[Path], ids: list[int]) -> None:
    """A device's files hold different clients."""
    seen: dict[int, Path] = {}
    for path, cid in zip(files, ids):
        if cid in seen:
            raise DeviceDataError(f"{path}: client_id {cid} is also in {seen[cid]}")
        seen[cid] = path


TRUTH_FILE = "truth.npz"  # a reserved name in a data folder: never a client's file

_folders: dict[tuple[str, str], dict[int, Path]] = {}


def truth_path(data: dict) -> Path | None:
    """A scenario's ``data.truth``: relative to ``data.folder`` when there is one; None when unset."""
    if not data.get("truth"):
        return None
    truth = Path(data["truth"]).expanduser()
    return Path(data["folder"]).expanduser() / truth if data.get("folder") else truth


def client_files(folder: Path, truth: Path | None = None) -> list[Path]:
    """A data folder's client files: its ``.npz`` files but the truth file (``truth``, and
    any file named ``truth.npz``), sorted."""
    return sorted(p for p in Path(folder).glob("*.npz") if p != truth and p.name != TRUTH_FILE)


def folder_index(folder: Path, num_clients: int, exclude: Path | None = None) -> dict[int, Path]:
    """``data.folder``'s client files by client id (read once per process): every id
    ``0 .. num_clients - 1`` exactly once, else a ``DeviceDataError`` naming the gap."""
    key = (str(folder), str(exclude))
    if key not in _folders:
        paths = client_files(folder, exclude)
        ids = [client_id(p, read_npz(p, {"client_id": 0}), num_clients) for p in paths]
        distinct_ids(paths, ids)
        index = dict(zip(ids, paths))
        missing = sorted(set(range(num_clients)) - set(index))
        if missing:
            raise DeviceDataError(f"{folder}: no file holds client {missing[0]} ({len(missing)} of "
                                  f"{num_clients} clients missing); expected one file per client id")
        _folders[key] = index
    return _folders[key]


def folder_cohort(workload, client_ids: np.ndarray):
    """A cohort read from the scenario's data folder, as a device reads its files."""
    index = folder_index(workload.data_folder, workload.num_clients, workload.truth_file)
    return workload.read_device_files([index[int(i)] for i in client_ids])
