"""Findings of the adversarial review of the issue-8 hardening (items 1, 2, 4, 5, 10).

Each test reproduces one confirmed finding and FAILS on the code it was written
against (wip/review at e2d8f89); it passes once the finding is fixed. Most severe
first. The attacker is uid 4242 (no passwd entry) run through ``setpriv``;
capkeeper runs as root, as ``apply`` in ``ExecStartPre=+`` does.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import require_root
from tests.test_attacks import (
    capkeeper,
)
from tests.test_daemon import REPO, DaemonProcess


@pytest.fixture
def arena() -> Iterator[Path]:
    """A root-owned 0755 directory directly in /tmp that the attacker can reach."""
    require_root()
    base = Path(tempfile.mkdtemp(prefix="capkeeper-review-", dir="/tmp"))
    try:
        os.chmod(base, 0o755)
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Callable[..., DaemonProcess]]:
    """Start ``capkeeper watch`` daemons as root; all are stopped at the end."""
    started: list[DaemonProcess] = []

    def start(state: Path, **options: Any) -> DaemonProcess:
        workdir = tmp_path / f"d{len(started)}"
        workdir.mkdir()
        daemon = DaemonProcess(workdir, state, **options)
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        daemon.close()


# -- finding 4: a dangling state.d symlink is silently "no drop-ins" ------------------------


def test_dangling_state_d_symlink_is_reported(tmp_path: Path) -> None:
    """state.d as a symlink to a directory that is not there (an unmounted file system, a
    removed release) reads as "no drop-ins": every entry they declared silently stops
    being enforced at the next reload. A dangling drop-in symlink is reported (item 10);
    a dangling state.d must be too."""
    state = tmp_path / "state.toml"
    state.write_text("")
    (tmp_path / "state.d").symlink_to(tmp_path / "missing" / "state.d")
    result = capkeeper("validate", "--state", str(state))
    assert result.returncode == 78, result.stdout


# -- finding 5: item 10 faults still open after the merge -----------------------------------


def _watch(*argv: str, early_hup: bool = False) -> int | None:
    """Run ``capkeeper watch`` for at most 20 s (5 s after an early SIGHUP) and return its
    exit status, negative for a signal (Popen's convention); None while still running."""
    with tempfile.TemporaryDirectory() as tmp:
        state = Path(tmp) / "state.toml"
        state.write_text("")
        process = subprocess.Popen(
            [sys.executable, "-m", "capkeeper", "watch", "--state", str(state), *argv,
             "--status-file", str(Path(tmp) / "status.json")],
            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        if early_hup:
            time.sleep(0.05)
            process.send_signal(signal.SIGHUP)
        try:
            return process.wait(20 if not early_hup else 5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            return None


@pytest.mark.parametrize("interval", ["inf", "1e308", "1e-9"])
def test_rescan_interval_out_of_bounds_is_a_usage_error(interval: str) -> None:
    """Item 10: ``inf``/``1e308`` die later with ``internal error: OverflowError`` and
    ``1e-9`` is accepted (a rescan loop burning a core); exit 64 at once is asked for."""
    assert _watch("--rescan-interval", interval) == 64  # None: still running after 20 s


def test_sighup_right_after_start_does_not_kill_the_daemon() -> None:
    """Item 10: SIGHUP 50 ms after start kills the daemon (exit 129: the default
    disposition, handlers installed only after the state is loaded)."""
    assert _watch(early_hup=True) is None  # still running when the 5 s wait ends
