"""The daemon's path from an event to a restore: what it may skip, and that it stays right.

A rename over a declared binary re-plans no route (only a symlink at the final
name leads a route on); the plan the daemon keeps must still be the one a fresh
plan gives, after every kind of change at the final name, whoever makes it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

import capkeeper.keeper as keeper_module
from capkeeper.daemon import Daemon
from capkeeper.watcher import Route, plan_routes
from tests.conftest import getcap, make_binary, setcap
from tests.test_attacks import (
    ATTACKER,
    RACE_RUNS,
    SYSTEM_PYTHON,
    arena,
    as_attacker,
    make_dir,
)
from tests.test_daemon import in_process, new_build, wait_caps, write_state

__all__ = ["arena"]  # the fixture, imported for pytest

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
