"""Findings of the adversarial review of the issue-8 hardening (items 1, 2, 4, 5, 10).

Each test reproduces one confirmed finding and FAILS on the code it was written
against (wip/review at e2d8f89); it passes once the finding is fixed. Most severe
first. The attacker is uid 4242 (no passwd entry) run through ``setpriv``;
capkeeper runs as root, as ``apply`` in ``ExecStartPre=+`` does.
"""

from __future__ import annotations

import os
import resource
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

from tests.conftest import make_binary, require_root
from tests.test_attacks import (
    ATTACKER,
    as_attacker,
    capkeeper,
    make_dir,
    state_text,
    write_file,
)
from tests.test_daemon import REPO, DaemonProcess, wait_caps


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


# -- finding 2: a state that fails the trust walk is still read and parsed ----------------

DEEP_TOML = "x = " + "[" * 3000 + "]" * 3000 + "\n"  # nesting tomllib recurses on


def test_reload_of_untrusted_deeply_nested_state_is_rejected_not_fatal(
    arena: Path,
    spawn: Callable[..., DaemonProcess],
) -> None:
    """Attack: the directory above the state's own directory is handed to the attacker
    (the item-1 scenario). It swaps in its own directory holding a "state" whose
    nesting makes tomllib recurse past Python's limit; root sends SIGHUP.
    Runs as: attacker uid 4242 (owns the directory, renames); the daemon as root.
    Never: the daemon dying. A state that fails the walk is an invalid state:
    reload rejected, old state kept. Today the untrusted file is parsed anyway, the
    RecursionError is not a CapkeeperError, and the daemon exits with an internal
    error (enforcement stops; a restart hits the same file at start-up).
    """
    good = make_binary(make_dir(arena / "bin") / "good")
    etc = make_dir(arena / "etc")
    state = write_file(
        make_dir(etc / "capkeeper") / "state.toml", state_text({good: "cap_net_raw=ep"})
    )
    daemon = spawn(state)
    daemon.wait_ready()
    wait_caps(good, "cap_net_raw=ep")
    os.chown(etc, ATTACKER, ATTACKER)
    evil = make_dir(etc / "evil", uid=ATTACKER)
    write_file(evil / "state.toml", DEEP_TOML, uid=ATTACKER)
    as_attacker("mv", str(etc / "capkeeper"), str(etc / "old"))
    as_attacker("mv", str(evil), str(etc / "capkeeper"))
    mark = daemon.mark()
    daemon.send(signal.SIGHUP)
    verdict = daemon.wait_event(
        lambda e: e.get("event") in ("state_rejected", "state_loaded"), mark, 15.0
    )
    assert verdict["event"] == "state_rejected"
    assert daemon.process.poll() is None


def test_apply_with_deeply_nested_state_is_an_invalid_state() -> None:
    """A state nested deeper than tomllib can recurse is an invalid state (exit 78, one
    line), not ``internal error: RecursionError`` (exit 2). Root writes it here: the
    same file reached through an attacker's directory is parsed too (previous test)."""
    with tempfile.TemporaryDirectory() as tmp:
        state = Path(tmp) / "state.toml"
        state.write_text(DEEP_TOML)
        result = capkeeper("validate", "--state", str(state))
    assert "internal error" not in result.stderr, result.stderr
    assert result.returncode == 78, result.stderr


def test_untrusted_huge_state_is_refused_without_reading_it(arena: Path) -> None:
    """Attack: the state path runs through a directory the attacker owns (item 1); the
    attacker makes the state a 4 GiB sparse file. root runs ``capkeeper apply`` with a
    1 GiB address-space limit (a stand-in for a memory-limited unit).
    Runs as: attacker uid 4242 (owns the directory, creates the file); apply as root.
    Never: anything but "invalid state" (exit 78). The walk already knows the file is
    untrusted, yet the loader reads all of it into memory (measured without a limit:
    3 GiB took 88 s and 6.3 GB of RSS) and then dies with MemoryError (exit 2).
    """
    controlled = make_dir(arena / "att", uid=ATTACKER)
    as_attacker("truncate", "-s", "4G", str(controlled / "state.toml"))

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))

    result = subprocess.run(
        [sys.executable, "-m", "capkeeper", "apply", "--state", str(controlled / "state.toml")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        preexec_fn=limit,
    )
    assert "MemoryError" not in result.stderr, result.stderr
    assert result.returncode == 78, result.stderr
    assert f"directory {controlled} is owned by uid {ATTACKER}" in result.stderr


# -- finding 3: an owner written with Unicode digits ----------------------------------------

SUPERSCRIPT_OWNER = '[[binary]]\npath = "/x"\ncaps = "cap_chown=p"\nowner = "\u00b2"\n'


def test_owner_in_superscript_digits_is_an_invalid_state(tmp_path: Path) -> None:
    """``owner = "²"``: str.isdigit() is true for it, int() is not, and the ValueError
    escapes the loader: ``internal error`` (exit 2) instead of a problem (exit 78)."""
    state = tmp_path / "state.toml"
    state.write_text(SUPERSCRIPT_OWNER)
    result = capkeeper("validate", "--state", str(state))
    assert "internal error" not in result.stderr, result.stderr
    assert result.returncode == 78, result.stderr


def test_owner_in_other_scripts_digits_is_not_a_uid(tmp_path: Path) -> None:
    """``owner = "١٢"`` (Arabic-Indic digits) is silently taken as uid 12; a user name
    or an ASCII number is what the state documents."""
    state = tmp_path / "state.toml"
    state.write_text('[[binary]]\npath = "/x"\ncaps = "cap_chown=p"\nowner = "\u0661\u0662"\n')
    result = capkeeper("validate", "--state", str(state))
    assert result.returncode == 78, result.stdout


def test_reload_with_superscript_owner_is_rejected_not_fatal(
    arena: Path, spawn: Callable[..., DaemonProcess]
) -> None:
    """SIGHUP after root saves a state with ``owner = "²"``: the reload must be rejected
    and the old state kept; today the daemon exits with an internal error."""
    good = make_binary(make_dir(arena / "bin") / "good")
    state = write_file(arena / "etc" / "state.toml", state_text({good: "cap_net_raw=ep"}))
    daemon = spawn(state)
    daemon.wait_ready()
    wait_caps(good, "cap_net_raw=ep")
    write_file(state, SUPERSCRIPT_OWNER)
    mark = daemon.mark()
    daemon.send(signal.SIGHUP)
    verdict = daemon.wait_event(
        lambda e: e.get("event") in ("state_rejected", "state_loaded"), mark, 15.0
    )
    assert verdict["event"] == "state_rejected"
    assert daemon.process.poll() is None


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
