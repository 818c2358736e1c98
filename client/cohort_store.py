"""Cohort data on the machine's disk, memory-mapped by every worker that serves the node.

Flower's Ray backend hands each message to whichever actor is idle: without a shared copy,
every actor would regenerate (and hold) every cohort it ever serves. Here the first actor
to need a cohort writes its arrays once (``np.save``, then an atomic rename of the folder);
every later use, by any actor on the machine, maps the same files read-only, so the pages
are shared through the page cache and nothing is generated twice.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np

from workloads.base import CohortData

META = "cohort.json"


def save(data: CohortData, path: Path) -> None:
    """Write a dataclass cohort's constructor arrays to ``path`` (atomically)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=path.parent))
    # Unset optional fields (None) keep their defaults when loaded.
    names = [f.name for f in dataclasses.fields(data) if f.init and getattr(data, f.name) is not None]
    for name in names:
        np.save(tmp / f"{name}.npy", np.asarray(getattr(data, name)))
    cls = type(data)
    (tmp / META).write_text(json.dumps({"class": f"{cls.__module__}:{cls.__qualname__}", "fields": names}))
    try:
        os.rename(tmp, path)
    except OSError:  # another worker wrote it first: theirs is identical
        shutil.rmtree(tmp, ignore_errors=True)


def load(path: Path) -> CohortData:
    meta = json.loads((path / META).read_text())
    module, _, name = meta["class"].partition(":")
    cls = getattr(importlib.import_module(module), name)
    return cls(**{f: np.load(path / f"{f}.npy", mmap_mode="r") for f in meta["fields"]})


def _canonical(a: np.ndarray) -> bool:
    """Whether an array has the strides ``np.load`` gives it (C order, size-1 axes included)."""
    expected = [a.itemsize * int(np.prod(a.shape[i + 1:])) for i in range(a.ndim)]
    return list(a.strides) == expected


def as_stored(data: CohortData) -> CohortData:
    """An in-memory cohort laid out as the store loads it: every array field with canonical
    strides (copied only where they differ). A ``[:, None]`` view's channel axis reads as
    channels-last to torch's convolutions, which then round differently from the same values
    memory-mapped here: a node without a data cache (the in-process engine) would train other
    bits than a Flower node with one."""
    if not dataclasses.is_dataclass(data):
        return data
    odd = {f.name: np.copy(v) for f in dataclasses.fields(data) if f.init
           for v in [getattr(data, f.name)] if isinstance(v, np.ndarray) and not _canonical(v)}
    return dataclasses.replace(data, **odd) if odd else data


def cached(path: Path, make: Callable[[], CohortData]) -> tuple[CohortData, bool]:
    """(the cohort stored at ``path``, whether this call generated it)."""
    if (path / META).is_file():
        return load(path), False
    save(make(), path)
    return load(path), True
