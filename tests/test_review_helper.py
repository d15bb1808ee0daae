"""Adversarial review of the start-up check shared with a forked helper (issue 11).

Each test states what must hold and fails on the code as reviewed (bfa6e46). Real
files, real capabilities, a real fork; fault injection only where the OS will not
produce the fault on demand (a helper bug, a stale read of the shared page).
"""

from __future__ import annotations

import collections
import os
import shutil
import threading
import time
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

import pytest
import structlog
from structlog.testing import capture_logs

import capkeeper.daemon as daemon_module
import capkeeper.enforce
import capkeeper.keeper as keeper_module
from capkeeper.daemon import Daemon
from capkeeper.helper import Helper
from capkeeper.settings import Settings
from tests.conftest import make_binary, setcap
from tests.test_daemon import DaemonProcess, caps_of, in_process, write_state

DECLARED = "cap_net_bind_service=+ep"
Logs = list[MutableMapping[str, Any]]


def _slow(monkeypatch: pytest.MonkeyPatch, *, daemon: float, helper: float) -> None:
    """Every check waits first: ``daemon`` seconds in this process, ``helper`` in others."""
    real = capkeeper.enforce.reconcile
    me = os.getpid()

    def check(entry: Any, **options: Any) -> Any:
        time.sleep(daemon if os.getpid() == me else helper)
        return real(entry, **options)

    monkeypatch.setattr(daemon_module, "reconcile", check)


def _one_bad_record(monkeypatch: pytest.MonkeyPatch, path: Path) -> None:
    """In the helper only, the record of ``path`` does not read (one helper bug, one entry)."""
    real = keeper_module._record
    me = os.getpid()

    def record(looked: Any) -> Any:
        if os.getpid() != me and looked.outcome.entry.path == str(path):
            return ("nonsense",)
        return real(looked)

    monkeypatch.setattr(keeper_module, "_record", record)


def _restored(logs: Logs) -> collections.Counter[str]:
    return collections.Counter(e["path"] for e in logs if e["event"] == "capability_restored")


def _silent_restores(state: Path, paths: list[Path], stripped: list[Path]) -> list[str]:
    """Start the daemon on ``state`` in this process: it must say that its helper failed
    and leave every one of ``paths`` with capabilities. The ``stripped`` ones that were
    restored without an alert."""
    with capture_logs() as logs, in_process(state, logs):
        pass
    assert [e for e in logs if e["event"] == "start_up_helper_failed"]
    assert all(caps_of(path) is not None for path in paths)
    restored = _restored(logs)
    return [str(path) for path in stripped if restored[str(path)] != 1]


def test_a_stop_during_start_up_still_reports_what_the_helper_restored(
    tree: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stop (SIGTERM: request_stop) while the helper has restored, and sent, half the
    entries: the daemon alone reports every restore it made before it stops; with the
    helper, every file restored during the start-up must still get its alert and its
    restore in the status record. As reviewed, rest() returns at once on stop and
    close() discards the urgent records waiting in the pipe: the restores are silent."""
    monkeypatch.setattr(keeper_module, "helper_worth", lambda entries: True)
    _slow(monkeypatch, daemon=0.03, helper=0.005)
    paths = [make_binary(tree / f"b{n:02}") for n in range(48)]  # all stripped
    state = write_state(tree.parent / "state.toml", dict.fromkeys(paths, DECLARED))
    settings = Settings(state=state, status_file=tree.parent / "status.json", rescan_interval=3600)
    with capture_logs() as logs:
        process = Daemon(settings, logger=structlog.get_logger(), install_signals=False)
        thread = threading.Thread(target=process.run)
        thread.start()
        deadline = time.monotonic() + 20
        # The helper (from the last entry backwards) has restored the second half.
        while not all(caps_of(path) is not None for path in paths[24:]):
            assert time.monotonic() < deadline, "the helper never restored its half"
            time.sleep(0.005)
        process.request_stop()
        thread.join(20)
    assert not thread.is_alive()
    changed = [str(path) for path in paths if caps_of(path) is not None]
    assert len(changed) >= 24
    restored = _restored(logs)
    # At most the one restore in flight when the helper is stopped may go unreported.
    silent = [path for path in changed if restored[path] != 1]
    assert len(silent) <= 1, f"{len(silent)} restores without an alert: {silent[:3]}..."
    unrecorded = [path for path in changed if process._book.entries[path].restores != 1]
    assert len(unrecorded) <= 1, f"{len(unrecorded)} restores not in the status record"


def test_one_outcome_that_does_not_read_leaves_no_entry_unchecked(
    tree: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The helper's record for one entry (the last, its first) does not read: the daemon
    abandons the helper and must check itself every entry it did not take from it. As
    reviewed, _next() moved ``lowest`` to that entry before report() rejected it, so
    the final pass (entries[len(here):lowest]) skips it: it has no verdict at READY=1
    and is missing from the rescan counts."""
    monkeypatch.setattr(keeper_module, "helper_worth", lambda entries: True)
    _slow(monkeypatch, daemon=0.002, helper=0.0)
    paths = [make_binary(tree / f"b{n:02}") for n in range(48)]
    for path in paths:
        setcap(DECLARED, path)  # in sync: nothing for anyone to write
    _one_bad_record(monkeypatch, paths[-1])
    state = write_state(tree.parent / "state.toml", dict.fromkeys(paths, DECLARED))
    with capture_logs() as logs, in_process(state, logs) as process:
        verdicts = {path: process._book.entries[str(path)].verdict for path in paths}
    (failed,) = [e for e in logs if e["event"] == "start_up_helper_failed"]
    assert "does not read" in failed["reason"]
    unchecked = [str(path) for path, verdict in verdicts.items() if verdict is None]
    assert not unchecked, f"unchecked before READY=1: {unchecked}"
    (rescan,) = [e for e in logs if e["event"] == "rescan" and e["cause"] == "startup"]
    assert rescan.get("in_sync") == len(paths)


def test_a_failed_helper_loses_at_most_the_alert_in_flight(
    tree: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """helper.py promises: "a failure can lose at most the alert of the one restore in
    flight, never the restore". One record (of one entry) does not read; every other
    record the helper sent is well formed. As reviewed, abandon() drops every record
    after it (sent, in the pipe) and leaves the helper running, restoring entries whose
    alerts nobody reads, until close(): the daemon then finds them in sync, silently."""
    monkeypatch.setattr(keeper_module, "helper_worth", lambda entries: True)
    _slow(monkeypatch, daemon=0.01, helper=0.0)
    paths = [make_binary(tree / f"b{n:02}") for n in range(48)]  # all stripped
    _one_bad_record(monkeypatch, paths[-1])
    state = write_state(tree.parent / "state.toml", dict.fromkeys(paths, DECLARED))
    silent = _silent_restores(state, paths, paths)
    assert len(silent) <= 1, f"{len(silent)} restores without an alert: {silent[:3]}..."


def test_where_both_took_an_entry_the_helpers_restore_is_reported(
    tree: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both take an entry where they meet (a stale read of the other's mark, as
    tests/test_helper.py simulates it): the daemon finds it missing, a deploy then
    creates it stripped, and the helper restores it. The restore happened, so its alert
    must be reported and counted. As reviewed, report() keeps the daemon's verdict
    unless it was "in sync": the restore is dropped, the record says "missing" with no
    restore, and the echo after READY=1 only finds it "in sync"."""
    monkeypatch.setattr(keeper_module, "helper_worth", lambda entries: True)
    monkeypatch.setattr(Helper, "claim", lambda self, index: index < self.lowest)
    paths = [tree / f"b{n:02}" for n in range(48)]
    for path in paths[1:]:
        make_binary(path)
        setcap(DECLARED, path)
    real = capkeeper.enforce.reconcile
    me = os.getpid()
    first = str(paths[0])

    def check(entry: Any, **options: Any) -> Any:
        if os.getpid() != me:
            time.sleep(0.003)  # the helper comes to the first entry well after the daemon
        outcome = real(entry, **options)
        if os.getpid() == me and entry.path == first and not paths[0].exists():
            make_binary(paths[0])  # the deploy lands between the two checks
        return outcome

    monkeypatch.setattr(daemon_module, "reconcile", check)
    state = write_state(tree.parent / "state.toml", dict.fromkeys(paths, DECLARED))
    with capture_logs() as logs, in_process(state, logs) as process:
        restores = process._book.entries[first].restores
    assert caps_of(paths[0]) is not None  # the helper restored it
    assert _restored(logs)[first] == 1, "a restore without its alert"
    assert restores == 1
    # Counted as restored, not as missing. (Not the record's last verdict: the events of
    # the deploy and of the restore may have been handled since READY=1, "in sync".)
    (rescan,) = [e for e in logs if e["event"] == "rescan" and e["cause"] == "startup"]
    assert (rescan.get("restored"), rescan.get("in_sync"), rescan.get("missing")) == (
        1,
        len(paths) - 1,
        None,
    )


def _helper_of(pid: int) -> int | None:
    """The start-up helper of daemon ``pid``: its child with the shared anonymous page
    (MAP_SHARED|MAP_ANONYMOUS shows as /dev/zero in maps; the settings child has none)."""
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return None
    for child in map(int, children):
        try:
            if "/dev/zero (deleted)" in Path(f"/proc/{child}/maps").read_text():
                return child
        except OSError:
            continue
    return None


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state in ("Z", "X")


def test_no_helper_writes_after_the_daemon_died(tmp_path: Path) -> None:
    """``capkeeper watch`` on 1,200 entries is killed (SIGKILL: the OOM killer, an admin)
    as soon as its helper is forked. Nothing of capkeeper may change a file after that:
    the admin may be about to change them by hand. As reviewed, the helper has no
    PR_SET_PDEATHSIG: it goes on through the last 200 entries (in sync, batched, so it
    writes nothing to the broken pipe) and restores the next one, after the daemon is
    gone; it notices only when it sends that outcome."""
    os.chmod(tmp_path, 0o755)
    root = tmp_path / "big"
    root.mkdir(mode=0o755)
    paths = []
    for number in range(1200):
        directory = root / f"d{number % 10}"
        directory.mkdir(mode=0o755, exist_ok=True)
        paths.append(make_binary(directory / f"b{number:04}"))
    for path in paths[1000:]:
        setcap(DECLARED, path)  # what the helper checks first: in sync, nothing sent
    target = paths[999]  # then this one, stripped: restored, then sent
    state = write_state(tmp_path / "state.toml", dict.fromkeys(paths, DECLARED))
    written_after_death = 0
    valid = 0  # start-ups killed before the helper came to the target
    for _ in range(5):
        if valid:
            break
        for path in paths[:1000]:
            if caps_of(path) is not None:
                os.removexattr(path, "security.capability")
        process = DaemonProcess(tmp_path, state, level="warning")
        helper = None
        try:
            deadline = time.monotonic() + 60
            while helper is None and process.process.poll() is None:
                assert time.monotonic() < deadline, "no helper was forked"
                helper = _helper_of(process.pid)
            process.process.kill()
            process.process.wait(10)
        finally:
            process.close()
        if helper is None or caps_of(target) is not None:
            continue  # the helper was there first (or never came): try again
        valid += 1
        deadline = time.monotonic() + 10
        while not _gone(helper) and time.monotonic() < deadline:
            time.sleep(0.01)
        written_after_death += caps_of(target) is not None
    shutil.rmtree(root)
    assert valid, "the daemon was never killed before its helper came to the target"
    assert written_after_death == 0, "the helper restored a file after the daemon died"
