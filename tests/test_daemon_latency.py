"""The daemon's path from an event to a restore: what it may skip, and that it stays right.

A rename over a declared binary re-plans no route (only a symlink at the final
name leads a route on); the plan the daemon keeps must still be the one a fresh
plan gives, after every kind of change at the final name, whoever makes it. A
process woken by the restore runs before the daemon's own reporting of it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import pytest
import structlog
from structlog.testing import CapturingLogger, capture_logs

import capkeeper.keeper as keeper_module
from capkeeper.daemon import Daemon
from capkeeper.files import observe
from capkeeper.keeper import Keeper
from capkeeper.kernel import cap_last_cap
from capkeeper.model import Kind
from capkeeper.schedule import YIELD_GAP
from capkeeper.state import load_state
from capkeeper.status import StatusBook
from capkeeper.watcher import Route, Watcher, plan_routes
from tests.conftest import getcap, make_binary, require_tool, setcap
from tests.test_attacks import (
    ATTACKER,
    RACE_RUNS,
    SYSTEM_PYTHON,
    arena,
    as_attacker,
    make_dir,
)
from tests.test_daemon import (
    XATTR,
    DaemonProcess,
    caps_of,
    in_process,
    new_build,
    spawn,
    wait_caps,
    write_state,
)

__all__ = ["arena", "spawn"]  # the fixtures, imported for pytest

CAPS = "cap_net_bind_service=ep"
# renameat2(RENAME_EXCHANGE) of argv[1] and argv[2], argv[3] times in a row (few enough
# not to overflow the queue: an overflow re-plans everything, and would hide a stale plan).
_EXCHANGES = (
    "import ctypes, os, sys\n"
    "a, b = map(os.fsencode, sys.argv[1:3])\n"
    "renameat2 = ctypes.CDLL(None, use_errno=True).renameat2\n"
    "for _ in range(int(sys.argv[3])):\n"
    "    if renameat2(-100, a, -100, b, 2) != 0:\n"
    "        sys.exit('renameat2: ' + os.strerror(ctypes.get_errno()))\n"
)


def _fresh(path: Path) -> Route:
    (route,) = plan_routes([str(path)])
    return route


def _plan_agrees(daemon: Daemon, path: Path, timeout: float = 5.0) -> Route:
    """Wait until the daemon's route of ``path`` is the one a fresh plan gives, and every
    directory on it is watched; return that route."""
    keeper = daemon._keeper
    assert keeper is not None
    deadline = time.monotonic() + timeout
    while True:
        fresh = _fresh(path)
        kept = keeper.plan.route(str(path))
        watched = keeper.watcher.directories
        if kept == fresh and set(fresh.directories) <= watched:
            return fresh
        assert time.monotonic() < deadline, (kept, fresh, sorted(watched))
        time.sleep(0.02)


def _replaced(path: Path, make: Callable[[Path], object]) -> None:
    """Put what ``make`` creates at ``path`` by one rename (a rename-over deploy)."""
    staged = path.with_name(f".{path.name}.new")
    make(staged)
    os.rename(staged, path)


def _build(tag: bytes) -> Callable[[Path], object]:
    """Makes a new build of ``true`` tagged ``tag`` at a path."""
    return lambda path: new_build(path, tag)


@pytest.fixture
def planned(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every path the keeper re-plans, in order (the real planner still plans them)."""
    seen: list[str] = []

    def recording(paths: Iterable[str]) -> Iterator[Route]:
        todo = list(paths)
        seen.extend(todo)
        return plan_routes(todo)

    monkeypatch.setattr(keeper_module, "plan_routes", recording)
    return seen


def test_rename_over_the_binary_restores_without_a_re_plan(tree: Path, planned: list[str]) -> None:
    """A rename over the declared binary: restored, and its route is not planned again."""
    tool = make_binary(make_dir(tree / "bin") / "tool")
    state = write_state(tree / "state.toml", {tool: CAPS})
    with capture_logs() as logs, in_process(state, logs) as daemon:
        wait_caps(tool, CAPS)
        before = len(planned)
        for number in range(5):
            _replaced(tool, _build(b"%d" % number))
            wait_caps(tool, CAPS)
        assert planned[before:] == []
        _plan_agrees(daemon, tool)


def test_every_change_at_the_final_name_leaves_the_plan_a_fresh_plan(tree: Path) -> None:
    """File, symlink (renamed over, or created), directory, nothing, file again at the
    declared name: after each, the daemon's route is a fresh plan's, fully watched, and a
    deploy through the symlink is restored (its target's directory is watched)."""
    tool = make_binary(make_dir(tree / "bin") / "tool")
    real = make_binary(make_dir(tree / "release") / "real")
    state = write_state(tree / "state.toml", {tool: CAPS})
    with capture_logs() as logs, in_process(state, logs) as daemon:
        wait_caps(tool, CAPS)
        _replaced(tool, _build(b"1"))
        assert _plan_agrees(daemon, tool).links[-1].final
        wait_caps(tool, CAPS)

        _replaced(tool, lambda p: p.symlink_to(real))  # a symlink renamed over the binary
        route = _plan_agrees(daemon, tool)
        assert str(real.parent) in route.directories
        wait_caps(real, CAPS)
        _replaced(real, _build(b"2"))  # a deploy there
        wait_caps(real, CAPS)
        setcap("-r", real)
        wait_caps(real, CAPS)

        tool.unlink()
        assert str(real.parent) not in _plan_agrees(daemon, tool).directories
        tool.symlink_to(real)  # a symlink created at the name (IN_CREATE)
        assert str(real.parent) in _plan_agrees(daemon, tool).directories

        tool.unlink()
        _replaced(tool, lambda p: p.mkdir())  # a directory renamed in
        assert str(real.parent) not in _plan_agrees(daemon, tool).directories
        os.rmdir(tool)
        _plan_agrees(daemon, tool)
        new_build(tool, b"3")
        wait_caps(tool, CAPS)
        _replaced(tool, lambda p: p.symlink_to(real))
        assert str(real.parent) in _plan_agrees(daemon, tool).directories
        _replaced(tool, _build(b"4"))
        assert str(real.parent) not in _plan_agrees(daemon, tool).directories
        wait_caps(tool, CAPS)


def test_attacker_flipping_the_final_name_cannot_leave_the_plan_stale(arena: Path) -> None:
    """Attack: the declared name lies in the attacker's directory; the attacker swaps it
    between a file and a symlink to a root-owned binary elsewhere, 401 times in a row
    with renameat2(RENAME_EXCHANGE), four times (ending on the symlink, then the file).
    Runs as: attacker uid 4242 runs the loop; the daemon runs as root, in process.
    Never: the daemon's route of the name other than a fresh plan's once the swaps
    stopped (a deploy at the symlink's target would go unseen, or its directory stay
    watched); the target's capabilities changed.
    """
    target = make_binary(make_dir(arena / "bin") / "ping")
    setcap("cap_net_raw=ep", target)
    opt = make_dir(arena / "opt", uid=ATTACKER)
    declared = opt / "app"
    state = write_state(make_dir(arena / "etc") / "state.toml", {declared: CAPS})
    with capture_logs() as logs, in_process(state, logs) as daemon:
        as_attacker("cp", str(target), str(declared))
        alt = str(opt / "alt")
        as_attacker("ln", "-s", str(target), alt)
        for round_ in range(4):  # an odd number of swaps each: symlink, file, ...
            swaps = str(2 * RACE_RUNS + 1)
            as_attacker(SYSTEM_PYTHON, "-I", "-c", _EXCHANGES, str(declared), alt, swaps)
            assert declared.is_symlink() == (round_ % 2 == 0)
            route = _plan_agrees(daemon, declared)
            assert (str(target.parent) in route.directories) == declared.is_symlink()
            assert getcap(target) == "cap_net_raw=ep"


# Waits, for each inode number read from stdin, until the declared binary (argv[1]) is
# that inode with the capabilities argv[3] (hex, in the xattr argv[4]), woken by
# IN_ATTRIB in its directory; then prints how many restores the daemon's log (argv[2])
# holds at that moment (the daemon declares that one binary).
_WAITER = r"""
import ctypes, os, select, sys
binary, log, expected = sys.argv[1], sys.argv[2], bytes.fromhex(sys.argv[3])
libc = ctypes.CDLL(None, use_errno=True)
fd = libc.inotify_init1(os.O_NONBLOCK)
if fd < 0 or libc.inotify_add_watch(fd, os.fsencode(os.path.dirname(binary)), 0x4) < 0:
    sys.exit("inotify: " + os.strerror(ctypes.get_errno()))
poller = select.poll()
poller.register(fd, select.POLLIN)
def carries(inode):
    try:
        return os.stat(binary).st_ino == inode and os.getxattr(binary, sys.argv[4]) == expected
    except OSError:
        return False
for line in sys.stdin:
    inode = int(line)
    print("armed", flush=True)
    while not carries(inode):
        poller.poll(10000)
        try:
            while os.read(fd, 65536):
                pass
        except BlockingIOError:
            pass
    with open(log, "rb") as handle:
        print(handle.read().count(b'"capability_restored"'), flush=True)
"""
_ROUNDS = 40


def _restores_logged(daemon: DaemonProcess, path: Path) -> int:
    return sum(
        1
        for event in daemon.events()
        if event.get("event") == "capability_restored" and event.get("path") == str(path)
    )


def test_a_process_woken_by_the_restore_runs_before_the_daemon_reports_it(
    tree: Path, spawn: Callable[..., DaemonProcess]
) -> None:
    """The daemon and a process waiting for the capabilities share one CPU (both pinned
    to it, as the scheduler often places a process woken by the daemon's setxattr); over
    40 rename-over deploys, the waiting process sees the capabilities back before the
    daemon has logged the restore, in at least three quarters of them: the daemon gives
    up the CPU once the restore is written and read back (sched_yield) rather than
    logging, recording and re-checking its own echo first. Measured on a 2-core machine
    (Linux 6.18): 40 of 40 idle, 37 to 40 with both cores busy; without the yield, 0 or
    1 of 40 idle, 16 to 23 busy. The kernel's scheduler decides whether a woken process
    preempts the one that woke it: with EEVDF (Linux 6.6 and later) it did not here; on
    older kernels (CFS) it often does, and this test would pass there without the
    yield."""
    taskset = require_tool("taskset")
    cpu = str(min(os.sched_getaffinity(0)))
    tool = make_binary(make_dir(tree / "bin") / "tool")
    state = write_state(tree / "state.toml", {tool: CAPS})
    daemon = spawn(state, level="info", prefix=(taskset, "-c", cpu))
    daemon.wait_ready()
    wait_caps(tool, CAPS)
    expected = os.getxattr(tool, XATTR)
    argv = [taskset, "-c", cpu, sys.executable, "-I", "-c", _WAITER]
    argv += [str(tool), str(daemon.log_path), expected.hex(), XATTR]
    with subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE) as waiter:
        assert waiter.stdin is not None
        assert waiter.stdout is not None
        first = 0
        try:
            for number in range(_ROUNDS):
                staged = new_build(tool.with_name(f".tool.{number}"), b"%d" % number)
                time.sleep(0.01)  # the daemon reads the staging's events and sleeps
                logged = _restores_logged(daemon, tool)
                waiter.stdin.write(b"%d\n" % staged.stat().st_ino)
                waiter.stdin.flush()
                assert waiter.stdout.readline() == b"armed\n"
                os.rename(staged, tool)
                seen = waiter.stdout.readline()
                assert seen, "the waiting process ended"
                first += int(seen) == logged
                deadline = time.monotonic() + 5.0
                while _restores_logged(daemon, tool) == logged:  # before the next deploy
                    assert time.monotonic() < deadline, daemon.tail()
                    time.sleep(0.001)
        finally:
            waiter.stdin.close()
    assert first >= _ROUNDS * 3 // 4, f"the waiting process ran first in {first} of {_ROUNDS}"


def _keeper(watcher: Watcher, state: Path, clock: Callable[[], float]) -> Keeper:
    """A keeper of ``state`` on ``watcher``, driven by the test (its clock, its batches)."""
    last_cap = cap_last_cap()
    keeper = Keeper(
        watcher,
        StatusBook(),
        logger=structlog.wrap_logger(CapturingLogger(), processors=[]),
        settle_time=0.1,
        last_cap=last_cap,
        clock=clock,
        tick=lambda: None,
        stopping=lambda: False,
    )
    keeper.install(load_state(state, last_cap=last_cap))
    return keeper


def _strip_and_handle(keeper: Keeper, now: float, *paths: Path) -> None:
    """Strip ``paths`` and have ``keeper`` handle the batch of events that raises."""
    for path in paths:
        os.removexattr(path, XATTR)  # its IN_ATTRIB is queued before this returns
    keeper.handle(keeper.watcher.read(keeper.plan), now)
    assert all(caps_of(path) is not None for path in paths)


def test_the_daemon_yields_once_a_batch_at_most_every_yield_gap(
    tree: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Counted, with a clock of the test's (os.sched_yield replaced by a counter; what the
    yield does is the test above): the start-up reconcile restores two binaries and never
    yields; a batch of events that restores both yields once, although the clock moves
    on by YIELD_GAP at every look; the next batch, within YIELD_GAP of that yield,
    restores without yielding; one after it yields again."""
    now = [1000.0]
    ticking = [False]  # each look at the clock moves it on by YIELD_GAP

    def clock() -> float:
        if ticking[0]:
            now[0] += YIELD_GAP
        return now[0]

    yields: list[float] = []
    monkeypatch.setattr(os, "sched_yield", lambda: yields.append(now[0]))
    directory = make_dir(tree / "bin")
    tools = [make_binary(directory / f"tool{n}") for n in range(2)]
    state = write_state(tree / "state.toml", dict.fromkeys(tools, CAPS))
    with Watcher() as watcher:
        keeper = _keeper(watcher, state, clock)
        keeper.full_reconcile("startup")
        assert all(caps_of(tool) is not None for tool in tools)
        assert yields == []
        keeper.handle(watcher.read(keeper.plan), now[0])  # the echoes: nothing to restore
        assert yields == []
        ticking[0] = True
        _strip_and_handle(keeper, now[0], *tools)
        ticking[0] = False
        assert len(yields) == 1
        now[0] = yields[0] + YIELD_GAP / 2
        _strip_and_handle(keeper, now[0], tools[0])
        assert len(yields) == 1
        now[0] += YIELD_GAP
        _strip_and_handle(keeper, now[0], tools[1])
        assert yields[1:] == [now[0]]


def test_a_change_while_the_daemon_gives_up_the_cpu_is_not_carried(
    tree: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The daemon yields its CPU right after a restore: content changed then under the
    same size and mtime (by whoever the restore woke; here the yield itself does it) is
    inspected afresh, not given the ELF facts carried over our own setxattr. Fails if the
    yield comes between the setxattr and the fstat that carries them."""
    tool = make_binary(make_dir(tree / "bin") / "tool")
    state = write_state(tree / "state.toml", {tool: CAPS})
    rewrites: list[Path] = []

    def rewritten() -> None:
        before = os.stat(tool)
        content = bytearray(tool.read_bytes())
        content[4] = 7  # EI_CLASS: neither ELFCLASS32 nor ELFCLASS64
        with open(tool, "r+b") as handle:
            handle.write(content)
        os.utime(tool, ns=(before.st_atime_ns, before.st_mtime_ns))
        rewrites.append(tool)

    with Watcher() as watcher:
        keeper = _keeper(watcher, state, time.monotonic)
        keeper.full_reconcile("startup")
        assert observe(str(tool)).elf is not None
        keeper.handle(watcher.read(keeper.plan), time.monotonic())  # the echo
        monkeypatch.setattr(os, "sched_yield", rewritten)
        os.removexattr(tool, XATTR)
        keeper.handle(watcher.read(keeper.plan), time.monotonic())  # restored, then rewritten
    assert rewrites == [tool]
    seen = observe(str(tool))
    assert seen.kind is Kind.ELF
    assert seen.elf is None
