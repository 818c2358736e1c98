"""One writer at a time: a lock file holding its owner's pid.

A run record (``run.lock`` in the run directory) and each process of a deployment home
(``pids/<process>.pid``) are owned by one live process. A second writer is refused with the
holder's pid; a lock whose process is gone (killed, crashed) is stale and taken over, with a
warning. The lock file also lists the temp folders its owner made, so whoever takes over a
stale lock removes what a killed owner left behind.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable


class LockHeld(RuntimeError):
    """Another live process holds the lock."""

    def __init__(self, path: Path, pid: int, what: str) -> None:
        self.path, self.pid = path, pid
        super().__init__(f"{what} is in use by process {pid} (lock {path}); wait for it to end or stop it "
                         f"(`kill {pid}`)")


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie is not)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except (OSError, IndexError):
        return True


def read_lock(path: Path) -> dict[str, Any] | None:
    """A lock file's content (``pid``, ``temp_dirs``); None when absent, ``{"pid": 0}`` when
    unreadable (a torn write: its owner is unknown, so it counts as stale)."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return None
    except OSError:
        return {"pid": 0}
    if text.strip().isdigit():  # a plain pid file (a deployment process's)
        return {"pid": int(text)}
    try:
        content = json.loads(text)
    except ValueError:
        return {"pid": 0}
    return content if isinstance(content, dict) and isinstance(content.get("pid"), int) else {"pid": 0}


def holder(path: Path) -> int | None:
    """The live pid holding the lock at ``path``, or None."""
    content = read_lock(path)
    return content["pid"] if content and pid_alive(content["pid"]) else None


class Lock:
    """The lock file at ``path`` for ``what`` (named in messages)."""

    def __init__(self, path: str | Path, what: str) -> None:
        self.path, self.what = Path(path), what
        self.temp_dirs: list[str] = []
        self.held = False

    def acquire(self, warn: Callable[[str], None] | None = None) -> None:
        """Take the lock; ``LockHeld`` when a live process has it. A stale one is taken over
        (``warn`` is told) and the temp folders its owner listed are removed."""
        content = read_lock(self.path)
        if content is None:
            try:  # the usual case, atomic: two writers starting together cannot both win
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                content = read_lock(self.path) or {"pid": 0}
            else:
                os.write(fd, self._content().encode())
                os.close(fd)
                self.held = True
                return
        if content is not None:
            pid = content["pid"]
            if pid == os.getpid():
                raise LockHeld(self.path, pid, self.what + " (by this very process)")
            if pid_alive(pid):
                raise LockHeld(self.path, pid, self.what)
            left = [d for d in content.get("temp_dirs", []) if Path(d).exists()]
            for d in left:
                shutil.rmtree(d, ignore_errors=True)
            if warn is not None:
                removed = f"; removed its temp folders {', '.join(left)}" if left else ""
                warn(f"{self.what}: took over a stale lock of process {pid}, which no longer runs{removed}")
        self.held = True
        self._write()

    def add_temp_dir(self, path: str | Path) -> None:
        """A folder to remove if this owner dies before it does."""
        self.temp_dirs.append(str(path))
        self._write()

    def release(self) -> None:
        if self.held:
            self.held = False
            try:
                if (read_lock(self.path) or {}).get("pid") == os.getpid():
                    self.path.unlink()
            except OSError:
                pass

    def _content(self) -> str:
        return json.dumps({"pid": os.getpid(), "temp_dirs": self.temp_dirs})

    def _write(self) -> None:
        tmp = self.path.with_name(self.path.name + f".{os.getpid()}.tmp")
        tmp.write_text(self._content())
        os.replace(tmp, self.path)
