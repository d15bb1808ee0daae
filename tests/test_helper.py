"""The start-up check shared with a forked helper process (:mod:`capkeeper.helper`).

Real files, real capabilities, a real fork: whoever checks an entry (the daemon,
the helper, both where they meet), the alerts, the status and the files come out
as when the daemon checks everything alone; a helper that dies or talks nonsense
leaves nothing unchecked; none outlives the start-up.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import fcntl
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, MutableMapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
import structlog
from structlog.testing import capture_logs

import capkeeper.daemon as daemon_module
import capkeeper.enforce
import capkeeper.helper as helper_module
import capkeeper.keeper as keeper_module
from capkeeper import files
from capkeeper.capabilities import parse
from capkeeper.daemon import Daemon
from capkeeper.helper import MIN_ENTRIES, Helper
from capkeeper.model import Entry
from capkeeper.reconcile import Outcome, Status
from capkeeper.schedule import Identity
from capkeeper.settings import Settings
from tests.conftest import elf_source, make_binary, require_root, setcap
from tests.test_daemon import DaemonProcess, caps_of, in_process, new_build, write_state

DECLARED = "cap_net_bind_service=+ep"
_STATUSES = {str(status) for status in Status}
_CACHE = "cache_ignored"  # debug: no cache directory in the tests
Logs = list[MutableMapping[str, Any]]


def _mixed(root: Path, count: int) -> Path:
    """``count`` declared entries of every kind in three directories below ``root``; the
    state file's path. The same ``count`` gives the same layout in any ``root``."""
    root.mkdir(mode=0o755)
    entries: dict[Path, str] = {}
    for number in range(count):
        directory = root / f"d{number % 3}"
        directory.mkdir(mode=0o755, exist_ok=True)
        path = directory / f"b{number:03}"
        kind = number % 6
        if kind != 4:  # 4: declared, missing
            make_binary(path, mode=0o775 if kind == 3 else 0o755)
        if kind == 0:  # in sync
            setcap(DECLARED, path)
        elif kind == 2:  # more than declared: tampering, restored
            setcap("cap_net_bind_service,cap_net_raw=+ep", path)
        elif kind == 3:  # group-writable with capabilities: refused, removed
            setcap(DECLARED, path)
        elif kind == 5:  # a script: refused
            path.write_text("#!/bin/sh\nexit 0\n")
        entries[path] = DECLARED  # 1: stripped, restored
    return write_state(root.parent / f"{root.name}.toml", entries)


def _relative(root: Path, value: object) -> object:
    return value.replace(str(root), "ROOT") if isinstance(value, str) else value


def _picture(root: Path, daemon: Daemon, logs: Logs) -> dict[str, Any]:
    """What a start-up left, with ``root`` written ROOT: the events about entries it
    logged, the counts of its rescan event, each entry's restores in the status
    record, and each file's capabilities. (Not the last status of each entry: the
    echo of a restore, a refusal held as a possible write in progress, are handled
    after READY=1, when the loop gets to them.)"""
    events = collections.Counter(
        tuple(sorted((key, str(_relative(root, value))) for key, value in event.items()))
        for event in logs
        if "path" in event and event.get("cause") == "startup"
    )
    (rescan,) = [e for e in logs if e["event"] == "rescan" and e["cause"] == "startup"]
    counts = {k: v for k, v in rescan.items() if k.replace("_", "-") in _STATUSES}
    restores = {
        _relative(root, path): record.restores for path, record in daemon._book.entries.items()
    }
    files = {
        str(path.relative_to(root)): caps_of(path)
        for path in sorted(root.rglob("b*"))
        if path.is_file()
    }
    return {"events": events, "counts": counts, "restores": restores, "files": files}


def _start_up(
    root: Path, count: int, monkeypatch: pytest.MonkeyPatch, *, helper: bool
) -> tuple[dict[str, Any], Logs]:
    """Start the daemon in this process on a fresh :func:`_mixed` tree; what it left."""
    state = _mixed(root, count)
    with monkeypatch.context() as patch:
        patch.setattr(keeper_module, "helper_worth", lambda entries: helper)
        with capture_logs() as logs, in_process(state, logs) as daemon:
            picture = _picture(root, daemon, logs)
    return picture, logs


def _rescan(logs: Logs) -> MutableMapping[str, Any]:
    (event,) = [e for e in logs if e["event"] == "rescan" and e["cause"] == "startup"]
    return event


def _slowed(monkeypatch: pytest.MonkeyPatch, slow: Callable[[], bool]) -> None:
    """Every check waits 2 ms first where ``slow()`` (in the daemon, or in the helper)."""
    real = capkeeper.enforce.reconcile

    def check(entry: Any, **options: Any) -> Any:
        if slow():
            time.sleep(0.002)
        return real(entry, **options)

    monkeypatch.setattr(daemon_module, "reconcile", check)


def _forks(monkeypatch: pytest.MonkeyPatch) -> list[Helper]:
    """The helpers forked from now on (each fork must succeed), in order."""
    forked: list[Helper] = []
    real_fork = Helper.fork

    def fork(*args: Any) -> Helper | None:
        helper = real_fork(*args)
        assert helper is not None
        forked.append(helper)
        return helper

    monkeypatch.setattr(Helper, "fork", fork)
    return forked


@pytest.mark.parametrize("slow", ["daemon", "helper"])
def test_shared_start_up_reports_as_the_daemon_alone(
    tree: Path, monkeypatch: pytest.MonkeyPatch, slow: str
) -> None:
    """With the daemon or the helper slowed down (so that each does most of the work in
    turn), every entry's status, every file's capabilities and every alert are those
    of a start-up without a helper."""
    count = 120
    alone, _ = _start_up(tree / "alone", count, monkeypatch, helper=False)
    daemon = os.getpid()
    _slowed(monkeypatch, lambda: (os.getpid() == daemon) == (slow == "daemon"))
    shared, logs = _start_up(tree / "shared", count, monkeypatch, helper=True)
    assert shared == alone
    statuses = set(alone["counts"])
    assert statuses == {"in_sync", "restored", "refused", "missing"}
    helped = _rescan(logs)["helper_entries"]
    assert helped > count // 2 if slow == "daemon" else helped < count // 2


def test_where_they_meet_every_entry_is_reported_once(
    tree: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Neither slowed: they meet somewhere different each time, and at times both take
    the entry they meet on. Over 30 start-ups on stripped files, each is restored and
    alerted about exactly once, and the daemon and the helper both took part.

    240 entries, not 48: the helper starts later the larger the test process is (its
    fork, then copies of the pages it touches), and with 48 the daemon had checked them
    all before it, in every start-up, once the tests before this one had grown the
    process to 70 MB."""
    monkeypatch.setattr(keeper_module, "helper_worth", lambda entries: True)
    paths = [make_binary(tree / f"b{n:03}") for n in range(240)]
    state = write_state(tree.parent / "state.toml", dict.fromkeys(paths, DECLARED))
    helped = []
    for _ in range(30):
        for path in paths:
            with contextlib.suppress(OSError):
                os.removexattr(path, "security.capability")
        with capture_logs() as logs, in_process(state, logs) as daemon:
            records = daemon._book.entries.values()
            assert [r.restores for r in records] == [1] * len(paths)
        restored = collections.Counter(
            e["path"] for e in logs if e["event"] == "capability_restored"
        )
        assert restored == dict.fromkeys(map(str, paths), 1)
        assert not [e for e in logs if e["event"] == "start_up_helper_failed"]
        helped.append(_rescan(logs)["helper_entries"])
        assert all(caps_of(path) is not None for path in paths)
    assert any(0 < n < len(paths) for n in helped), helped


def test_entries_both_took_are_reported_once(tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The daemon made blind to the helper's mark and the helper to the daemon's (as stale
    reads would leave them), so that both check the entries the helper has time for:
    each is still alerted about exactly once as restored (by whichever restored it),
    and counted once."""
    monkeypatch.setattr(keeper_module, "helper_worth", lambda entries: True)
    monkeypatch.setattr(Helper, "claim", lambda self, index: index < self.lowest)
    daemon = os.getpid()
    _slowed(monkeypatch, lambda: os.getpid() != daemon)
    paths = [make_binary(tree / f"b{n:02}") for n in range(48)]
    state = write_state(tree.parent / "state.toml", dict.fromkeys(paths, DECLARED))
    with capture_logs() as logs, in_process(state, logs) as process:
        assert [r.restores for r in process._book.entries.values()] == [1] * len(paths)
    reported = collections.Counter(
        (e["path"], e["event"]) for e in logs if e.get("cause") == "startup" and "path" in e
    )
    restored = {(str(path), "capability_restored"): 1 for path in paths}
    # Where the helper restored first, the daemon's own "in sync" (debug) stays logged.
    assert {k: v for k, v in reported.items() if k[1] != "capability_in_sync"} == restored
    assert _picture(tree, process, logs)["counts"] == {"restored": len(paths)}


def test_the_elf_facts_the_helper_learnt_reach_the_daemon(
    tree: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Binaries in sync (no restore, so no echo for the daemon to look at them again),
    the daemon slowed down so that the helper checks most: the daemon's ELF facts cache
    knows every one of them afterwards, so the cache file it saves does too."""
    monkeypatch.setattr(keeper_module, "helper_worth", lambda entries: True)
    daemon = os.getpid()
    _slowed(monkeypatch, lambda: os.getpid() == daemon)
    paths = [new_build(tree / f"b{n:02}", b"%d" % n) for n in range(40)]
    for path in paths:
        setcap(DECLARED, path)
    state = write_state(tree.parent / "state.toml", dict.fromkeys(paths, DECLARED))
    with capture_logs() as logs, in_process(state, logs):
        assert _rescan(logs)["helper_entries"] > len(paths) // 2
        assert all(files._ELF_CACHE.known(os.stat(path))[0] for path in paths)


def test_elf_facts_are_absorbed_beside_those_known() -> None:
    """absorb() takes the keys it does not know from another cache's export, keeps its
    own, and takes nothing from anything malformed."""
    ours, theirs = files._ElfCache(), files._ElfCache()
    source = elf_source()
    fd = os.open(source, os.O_RDONLY)
    try:
        mine = os.fstat(fd)
        ours.learn(fd, mine)
        theirs.learn(fd, mine)
        # The key is all the cache reads of a stat: another inode, the same content.
        other = cast(
            os.stat_result,
            SimpleNamespace(
                st_dev=mine.st_dev,
                st_ino=mine.st_ino + 1,
                st_size=mine.st_size,
                st_mtime_ns=mine.st_mtime_ns,
                st_ctime_ns=mine.st_ctime_ns,
            ),
        )
        theirs.learn(fd, other)
    finally:
        os.close(fd)
    export = theirs.export()
    assert ours.absorb({"symbols": []}) == 0
    assert ours.absorb("nonsense") == 0
    assert ours.absorb(export) == 1
    assert ours.known(other) == theirs.known(other)
    assert ours.known(mine)[0]


@pytest.mark.parametrize(("before", "during"), [(False, True), (True, False), (True, True)])
def test_the_helper_checks_while_the_daemon_plans_and_late_watches_are_checked_again(
    tree: Path, monkeypatch: pytest.MonkeyPatch, before: bool, during: bool
) -> None:
    """The helper starts once the entries' parent directories are watched, before the
    daemon plans the routes. The last entry is a symlink to a file in a directory that
    only the plan watches (as a release flip leaves it): the plan waits until the
    helper has checked that entry (restoring it if it was stripped ``before``), and
    its capabilities are removed then if ``during`` (no watch sees that yet). The
    daemon checks it again once every watch is in place, so it carries them at
    READY=1; every restore is alerted about once, and the entry is counted once, as
    restored."""
    monkeypatch.setattr(keeper_module, "helper_worth", lambda entries: True)
    (tree / "d").mkdir(mode=0o755)
    paths = [make_binary(tree / "d" / f"b{n:02}") for n in range(40)]
    (tree / "elsewhere").mkdir(mode=0o755)
    late = make_binary(tree / "elsewhere" / "app")
    (tree / "d" / "app").symlink_to("../elsewhere/app")
    declared = [*paths, tree / "d" / "app"]  # the helper takes the last one first
    for path in paths if before else [*paths, late]:
        setcap(DECLARED, path)
    state = write_state(tree.parent / "state.toml", dict.fromkeys(declared, DECLARED))
    forked = _forks(monkeypatch)
    real_plan = keeper_module.Keeper._plan

    def plan(self: keeper_module.Keeper, todo: set[str]) -> bool:
        assert str(tree / "elsewhere") not in self.watcher.directories
        (helper,) = forked  # forked before the plan
        deadline = time.monotonic() + 10
        while helper._marks[1] > len(declared) - 2:  # it has not looked at the last one
            assert time.monotonic() < deadline
            time.sleep(0.001)
        if during:
            os.removexattr(late, "security.capability")
        return real_plan(self, todo)

    monkeypatch.setattr(keeper_module.Keeper, "_plan", plan)
    restores = before + during
    with capture_logs() as logs, in_process(state, logs) as daemon:
        assert caps_of(late) == parse(DECLARED)
        assert daemon._book.entries[str(tree / "d" / "app")].restores == restores
    rescan = _rescan(logs)
    assert rescan["helper_rechecked"] == 1
    counts = {k: v for k, v in rescan.items() if k.replace("_", "-") in _STATUSES}
    assert counts == {"in_sync": len(paths), "restored": 1}
    restored = [e["path"] for e in logs if e["event"] == "capability_restored"]
    assert restored == [str(tree / "d" / "app")] * restores


def test_a_start_logs_its_first_event_once_the_helper_is_forked(
    tree: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``state_loaded``, the first event of a start (whose cost includes importing
    structlog in a real start), comes after the helper's fork and before the plan:
    it runs beside the helper's checks. Without a helper it comes before the plan."""
    paths = [make_binary(tree / f"b{n:02}") for n in range(8)]
    state = write_state(tree.parent / "state.toml", dict.fromkeys(paths, DECLARED))
    real_fork, real_plan = Helper.fork, keeper_module.Keeper._plan
    seen: list[str] = []
    logs: list[Logs] = []  # the list capture_logs() fills, while it does

    def fork(*args: Any) -> Helper | None:
        seen.append(f"fork, logged: {[e['event'] for e in logs[-1] if e['event'] != _CACHE]}")
        return real_fork(*args)

    def plan(self: keeper_module.Keeper, todo: set[str]) -> bool:
        seen.append(f"plan, logged: {[e['event'] for e in logs[-1] if e['event'] != _CACHE]}")
        return real_plan(self, todo)

    monkeypatch.setattr(Helper, "fork", fork)
    monkeypatch.setattr(keeper_module.Keeper, "_plan", plan)
    for helped in (True, False):
        seen.clear()
        monkeypatch.setattr(keeper_module, "helper_worth", lambda entries, h=helped: h)
        with capture_logs() as captured:
            logs.append(captured)
            with in_process(state, captured):
                pass
        expected = ["plan, logged: ['state_loaded']"]
        if helped:
            expected.insert(0, "fork, logged: []")
        assert seen == expected


def test_a_failure_right_after_the_fork_ends_the_helper(
    tree: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What runs in the daemon right after the fork (the first event of a start) fails,
    say on a closed stderr: the start-up fails with that error, and the helper is
    killed and reaped, not left restoring files whose outcomes nobody reads."""
    monkeypatch.setattr(keeper_module, "helper_worth", lambda entries: True)
    paths = [make_binary(tree / f"b{n:02}") for n in range(40)]
    state = write_state(tree.parent / "state.toml", dict.fromkeys(paths, DECLARED))
    forked = _forks(monkeypatch)
    real_full = keeper_module.Keeper.full_reconcile

    def broken_pipe() -> None:
        raise BrokenPipeError(errno.EPIPE, "stderr is gone")

    def full_reconcile(self: keeper_module.Keeper, cause: str, **options: Any) -> None:
        real_full(self, cause, **{**options, "begun": broken_pipe})

    monkeypatch.setattr(keeper_module.Keeper, "full_reconcile", full_reconcile)
    settings = Settings(state=state, status_file=tree.parent / "status.json")
    daemon = Daemon(settings, logger=structlog.get_logger(), install_signals=False)
    with pytest.raises(BrokenPipeError):
        daemon.run()
    (helper,) = forked
    with pytest.raises(ChildProcessError):  # reaped
        os.waitpid(helper.pid, os.WNOHANG)


def test_the_helpers_pipe_holds_its_outcomes_while_the_daemon_plans() -> None:
    """The daemon reads nothing from the helper while it plans the routes: the pipe has
    room for a thousand outcomes or more (1 MiB: the most a process without
    CAP_SYS_RESOURCE gets by default, as root here), not the 64 KiB a pipe starts
    with."""
    require_root()
    helper = Helper.fork(1, lambda index: (False, None), lambda: None)
    assert helper is not None
    try:
        assert fcntl.fcntl(helper._fd, fcntl.F_GETPIPE_SZ) == 1 << 20
    finally:
        helper.close()


def _failing(monkeypatch: pytest.MonkeyPatch, *, after: int) -> None:
    """In the daemon, every check waits 2 ms first; the helper exits (status 3) when it
    comes to its entry number ``after``."""
    real = capkeeper.enforce.reconcile
    daemon = os.getpid()
    seen = [0]

    def check(entry: Any, **options: Any) -> Any:
        if os.getpid() == daemon:
            time.sleep(0.002)
        else:
            seen[0] += 1
            if seen[0] == after:
                os._exit(3)
        return real(entry, **options)

    monkeypatch.setattr(daemon_module, "reconcile", check)


def test_a_helper_that_dies_leaves_nothing_unchecked(
    tree: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The helper exits at its 20th entry, the daemon slowed down so that it has not met
    it by then: the daemon says so once, checks itself every entry the helper did not
    report, and the start-up ends as without a helper (the helper sent each outcome
    other than "in sync" as soon as it had it)."""
    count = 120
    alone, _ = _start_up(tree / "alone", count, monkeypatch, helper=False)
    _failing(monkeypatch, after=20)
    shared, logs = _start_up(tree / "shared", count, monkeypatch, helper=True)
    (failed,) = [e for e in logs if e["event"] == "start_up_helper_failed"]
    assert failed["log_level"] == "warning"
    assert "exited before its last entry was sent" in failed["reason"]
    assert 0 < failed["entries"] <= count - 19  # at most all but what it reported
    assert shared == alone


def test_a_helper_that_sends_nonsense_is_not_believed(
    tree: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The helper's outcomes do not read (a bug), the daemon slowed down so that the
    first one comes early: none is taken, the daemon checks itself every entry the
    helper sent, says so, and every file ends as without a helper. What the helper
    restored is then found in sync: the alerts of outcomes that do not read are what
    such a bug loses, never a restore."""
    count = 60
    alone, _ = _start_up(tree / "alone", count, monkeypatch, helper=False)
    daemon = os.getpid()
    real = keeper_module._record
    monkeypatch.setattr(
        keeper_module,
        "_record",
        lambda looked: ("nonsense",) if os.getpid() != daemon else real(looked),
    )
    _slowed(monkeypatch, lambda: os.getpid() == daemon)
    shared, logs = _start_up(tree / "shared", count, monkeypatch, helper=True)
    (failed,) = [e for e in logs if e["event"] == "start_up_helper_failed"]
    assert "does not read" in failed["reason"]
    assert shared["files"] == alone["files"]
    assert shared["restores"].keys() == alone["restores"].keys()
    assert sum(shared["counts"].values()) == sum(alone["counts"].values())
    for path, restores in shared["restores"].items():
        assert restores in (alone["restores"][path], 0), path


def test_stopping_during_a_shared_start_up_ends_the_helper(
    tree: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stop while the helper works: the daemon stops, the helper is killed and reaped,
    and no descriptor is left open."""
    paths = [make_binary(tree / f"b{n:02}") for n in range(40)]
    state = write_state(tree.parent / "state.toml", dict.fromkeys(paths, DECLARED))
    monkeypatch.setattr(keeper_module, "helper_worth", lambda entries: True)
    daemon = os.getpid()
    _slowed(monkeypatch, lambda: True)  # both: 40 ms at least to check everything
    forked = _forks(monkeypatch)
    descriptors = len(os.listdir("/proc/self/fd"))
    settings = Settings(state=state, status_file=tree.parent / "status.json", rescan_interval=3600)
    with capture_logs():
        process = Daemon(settings, logger=structlog.get_logger(), install_signals=False)
        thread = threading.Thread(target=process.run)
        thread.start()
        deadline = time.monotonic() + 10
        while not forked:
            assert time.monotonic() < deadline
            time.sleep(0.001)
        process.request_stop()
        thread.join(10)
    assert not thread.is_alive()
    (helper,) = forked
    assert helper.pid != daemon
    with pytest.raises(ChildProcessError):
        os.waitpid(helper.pid, os.WNOHANG)  # reaped already
    assert not Path(f"/proc/{helper.pid}").exists()
    assert len(os.listdir("/proc/self/fd")) == descriptors


@pytest.fixture
def big_tree(tmp_path: Path) -> Iterator[tuple[Path, list[Path]]]:
    root = tmp_path / "big"
    root.mkdir(mode=0o755)
    os.chmod(tmp_path, 0o755)
    paths = []
    for number in range(MIN_ENTRIES + 200):
        directory = root / f"d{number % 10}"
        directory.mkdir(mode=0o755, exist_ok=True)
        paths.append(make_binary(directory / f"b{number:04}"))
    yield root, paths
    shutil.rmtree(root)


def test_a_real_daemon_shares_a_large_start_up(
    big_tree: tuple[Path, list[Path]], tmp_path: Path
) -> None:
    """``capkeeper watch`` on 1,200 stripped binaries, on this machine's two CPUs: a
    helper reports part of them, every one is restored and alerted about once, by the
    daemon, and the helper is gone before READY=1."""
    assert len(os.sched_getaffinity(0)) >= 2, "the CI machines have two CPUs"
    _, paths = big_tree
    state = write_state(tmp_path / "state.toml", dict.fromkeys(paths, DECLARED))
    process = DaemonProcess(tmp_path, state, level="info")
    try:
        process.wait_ready(timeout=120)
        children = Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text()
        assert children.split() == [], "a helper outlived the start-up"
        events = process.events()
        (rescan,) = [e for e in events if e["event"] == "rescan"]
        assert rescan["restored"] == len(paths)
        assert 0 < rescan["helper_entries"] < len(paths)
        restored = collections.Counter(
            e["path"] for e in events if e["event"] == "capability_restored"
        )
        assert restored == dict.fromkeys(map(str, paths), 1)
        assert all(caps_of(path) is not None for path in paths)
        assert process.stop(signal.SIGTERM) == 0
    finally:
        process.close()


def test_records_read_back_as_sent_and_nothing_else_reads() -> None:
    """What a helper sends for each verdict reads back as the same outcome; a record of
    any other shape, type or status is refused (TypeError or ValueError), never
    taken."""
    entry = Entry(path="/usr/bin/app", caps=parse(DECLARED), caps_text=DECLARED)
    identity = Identity(1, 2, 3, 4, 0, 0, 0o100755)
    for status in Status:
        looked = keeper_module.Looked(
            Outcome(entry, status, "found", "/x", "why", True, None, False, True), identity
        )
        assert keeper_module._looked(entry, keeper_module._record(looked)) == looked
    crashed = keeper_module.Looked(Outcome(entry, Status.FAILED, "unknown"), None, "Traceback")
    assert keeper_module._looked(entry, keeper_module._record(crashed)) == crashed
    good = keeper_module._record(keeper_module.Looked(Outcome(entry, Status.IN_SYNC, ""), identity))
    bad = [
        ["list", *good[1:]],
        good[:-1],
        ("in_sync", *good[1:]),
        (None, *good[1:]),
        (good[0], 1, *good[2:]),
        (*good[:4], 1, *good[5:]),
        (*good[:7], (1, 2, 3), good[8]),
        (*good[:7], (1, 2, 3, 4, 5, 6, "7"), good[8]),
        (*good[:7], (1, 2, 3, 4, 5, 6, True), good[8]),
        (*good[:8], b"crash"),
    ]
    for record in bad:
        with pytest.raises((TypeError, ValueError)):
            keeper_module._looked(entry, record)
    with pytest.raises((TypeError, ValueError)):
        keeper_module._looked(entry, list(good))


@pytest.mark.parametrize("failing", ["pipe2", "fork"])
def test_without_a_helper_the_daemon_checks_alone(
    tree: Path, monkeypatch: pytest.MonkeyPatch, failing: str
) -> None:
    """No pipe (EMFILE at the descriptor limit) or no fork (EAGAIN at a task limit): the
    start-up is the daemon's alone, every entry checked, nothing said about a helper."""
    monkeypatch.setattr(keeper_module, "helper_worth", lambda entries: True)

    real = getattr(os, failing)

    def refuse(*args: Any) -> Any:
        if sys._getframe(1).f_globals["__name__"] != helper_module.__name__:
            return real(*args)  # the daemon's own pipes, the settings child
        raise OSError(errno.EMFILE if failing == "pipe2" else errno.EAGAIN, failing)

    monkeypatch.setattr(os, failing, refuse)
    paths = [make_binary(tree / f"b{n:02}") for n in range(20)]
    state = write_state(tree.parent / "state.toml", dict.fromkeys(paths, DECLARED))
    with capture_logs() as logs, in_process(state, logs):
        pass
    rescan = _rescan(logs)
    assert "helper_entries" not in rescan
    assert rescan["restored"] == len(paths)
    assert not [e for e in logs if e["event"] == "start_up_helper_failed"]
