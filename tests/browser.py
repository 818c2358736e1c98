"""Headless Chromium for the tests that look at a web page (e.g. MLflow's UI).

The browser is Debian's ``chromium`` package, installed by ``ensure_chromium`` when it is
missing (as root, non-interactively: ``apt-get install -y --no-install-recommends chromium``,
after ``apt-get update`` when no package list offers it). No driver: Chromium's own
``--dump-dom`` prints the DOM once the page has rendered (its scripts ran and their fetches
came back within ``--virtual-time-budget``) and ``--screenshot`` writes a PNG of it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
INSTALL = ["apt-get", "install", "-y", "--no-install-recommends", "-o", "DPkg::Lock::Timeout=300", "chromium"]
UPDATE = ["apt-get", "update", "-o", "DPkg::Lock::Timeout=300"]
FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage", "--hide-scrollbars", "--mute-audio",
]


def _apt(cmd: list[str], timeout: float) -> subprocess.CompletedProcess:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def ensure_chromium(timeout: float = 900) -> Path:
    """``/usr/bin/chromium``, installed with apt when missing; ``pytest.fail`` saying why
    when it cannot be (not root, no apt-get, no package)."""
    if CHROMIUM.exists():
        return CHROMIUM
    why = None
    if shutil.which("apt-get") is None:
        why = "apt-get is missing (not a Debian/Ubuntu machine)"
    elif os.geteuid() != 0:
        why = "installing it needs root"
    if why:
        pytest.fail(f"headless Chromium is needed at {CHROMIUM} and {why}: install Debian's "
                    f"`chromium` package ({' '.join(INSTALL)})", pytrace=False)
    started = time.monotonic()
    done = _apt(INSTALL, timeout)
    if done.returncode != 0:  # e.g. empty or stale package lists: refresh them once
        _apt(UPDATE, timeout)
        done = _apt(INSTALL, timeout)
    if done.returncode != 0 or not CHROMIUM.exists():
        tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
        pytest.fail(f"could not install Chromium ({' '.join(INSTALL)} exited {done.returncode}): "
                    + " | ".join(tail), pytrace=False)
    print(f"installed {CHROMIUM} in {time.monotonic() - started:.0f} s")
    return CHROMIUM


def _chromium(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    profile = tempfile.mkdtemp(prefix="umbel-chromium-")
    try:
        return subprocess.run(
            [str(ensure_chromium()), *FLAGS, f"--user-data-dir={profile}", *args],
            capture_output=True, text=True, timeout=timeout,
        )
    finally:
        shutil.rmtree(profile, ignore_errors=True)


def rendered_dom(url: str, budget_ms: int = 15000, size: str = "1600,1000", timeout: float = 90) -> str:
    """The page's DOM after its scripts ran (``--virtual-time-budget`` of page time)."""
    done = _chromium([f"--window-size={size}", f"--virtual-time-budget={budget_ms}", "--dump-dom", url],
                     timeout)
    if done.returncode != 0 or not done.stdout.strip():
        raise RuntimeError(f"chromium --dump-dom {url} exited {done.returncode}: {done.stderr[-2000:]}")
    return done.stdout


def screenshot(url: str, path: Path, budget_ms: int = 15000, size: str = "1600,1000",
               timeout: float = 90) -> Path:
    """A PNG of the rendered page at ``path``."""
    path = Path(path).resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    done = _chromium([f"--window-size={size}", f"--virtual-time-budget={budget_ms}",
                      f"--screenshot={path}", url], timeout)
    if not path.is_file():
        raise RuntimeError(f"chromium --screenshot {url} wrote nothing (exit {done.returncode}): "
                           f"{done.stderr[-2000:]}")
    return path
