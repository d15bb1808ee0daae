"""Directories walked by one batch of events serve the next ones, and stay right.

The daemon remembers each directory a batch pinned (``files.Walked``: device,
inode, resolved path, route; no descriptor) and starts later batches there
(:meth:`capkeeper.keeper.Keeper._batch_pins`). These tests show that it does
(no walk from ``/`` for a rename-over after the first), that a remembered
directory answers as a fresh walk (also when the directory was replaced with
nothing said), and that every change to a route, by root or by an attacker,
is judged on the route as it is now.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from capkeeper import files
from capkeeper.files import Pins, Walks, observe_declared
from capkeeper.model import Observation
from capkeeper.watcher import Watcher
from tests.conftest import getcap, make_binary, setcap
from tests.test_attacks import ATTACKER, RACE_RUNS, SYSTEM_PYTHON, arena, make_dir, setpriv
from tests.test_daemon import in_process, new_build, wait_caps, write_state

__all__ = ["arena"]  # the fixture, imported for pytest

CAPS = "cap_net_bind_service=ep"


@pytest.fixture
def walks(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The paths walked from ``/`` (files._walk calls); the real walk still runs."""
    seen: list[str] = []
    real = files._walk

    def recording(path: str, *args: Any, **kwargs: Any) -> Any:
        seen.append(path)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(files, "_walk", recording)
    return seen


def _replaced(path: Path, tag: bytes) -> None:
    staged = path.with_name(f".{path.name}.new")
    new_build(staged, tag)
    os.rename(staged, path)


def _observe(path: Path, pins: Pins | None = None) -> Observation:
    fd, observation = observe_declared(str(path), hash=False, pins=pins)
    os.close(fd)
    return observation


def test_rename_over_deploys_do_not_walk_from_the_root(
    tree: Path, walks: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """After start-up, a rename-over deploy of a declared binary is restored without a
    walk from ``/`` whenever no event was queued at its check (its directory is reopened
    from what start-up walked); only a queued event (another process's, in a directory
    of the route) makes it walk."""
    quiet: list[bool] = []
    real = Watcher.quiet

    def recording(self: Watcher) -> bool:
        answer = real(self)
        quiet.append(answer)
        return answer

    monkeypatch.setattr(Watcher, "quiet", recording)
    tool = make_binary(make_dir(tree / "bin") / "tool")
    state = write_state(tree / "state.toml", {tool: CAPS})
    quiet_deploys = 0
    with capture_logs() as logs, in_process(state, logs):
        wait_caps(tool, CAPS)
        assert str(tool) in walks  # start-up walked it
        for number in range(50):
            asked, walked = len(quiet), len(walks)
            _replaced(tool, b"%d" % number)
            wait_caps(tool, CAPS)
            time.sleep(0.05)  # the echo of the restore is read
            answers = quiet[asked:]
            if answers and all(answers):
                quiet_deploys += 1
                assert [p for p in walks[walked:] if p == str(tool)] == []
            if quiet_deploys >= 5:
                break
    assert quiet_deploys >= 5, quiet


def _cases(tree: Path) -> dict[str, Path]:
    """Declared paths in every kind of route the trust rules judge."""
    make_dir(tree / "ok")
    make_dir(tree / "gw", mode=0o775)
    make_dir(tree / "theirs", uid=ATTACKER)
    make_dir(tree / "sticky", mode=0o1777)
    make_dir(tree / "sticky" / "root")
    make_dir(tree / "real")
    os.symlink(tree / "real", tree / "link")
    os.lchown(tree / "link", ATTACKER, ATTACKER)
    os.symlink(tree / "real", tree / "rootlink")
    paths = {
        "trusted": make_binary(tree / "ok" / "tool"),
        "group-writable directory": make_binary(tree / "gw" / "tool"),
        "directory of another user": make_binary(tree / "theirs" / "tool"),
        "sticky directory, root's below": make_binary(tree / "sticky" / "root" / "tool"),
        "symlink of another user": tree / "link" / "tool",
        "root's symlink": tree / "rootlink" / "tool",
    }
    make_binary(tree / "real" / "tool")
    return paths


def test_a_remembered_directory_answers_as_a_fresh_walk(tree: Path) -> None:
    """Every kind of route: an observation from a directory remembered by an earlier batch
    equals a fresh walk's, as found, after the final directory's mode changed (read
    again at each use), and after the directory was replaced by another one with
    nothing forgotten (its inode differs: walked anew)."""
    walked = Walks()
    cases = _cases(tree)
    with Pins(walked=walked) as pins:
        for path in cases.values():
            _observe(path, pins)
    assert walked
    for path in cases.values():
        with Pins(walked=walked) as pins:
            assert _observe(path, pins) == _observe(path)
    os.chmod(tree / "ok", 0o777)
    with Pins(walked=walked) as pins:
        assert _observe(cases["trusted"], pins) == _observe(cases["trusted"])
    assert _observe(cases["trusted"]).hops[-1].mode & 0o777 == 0o777
    # The directory replaced by another (another inode at the same path), not forgotten.
    os.rename(tree / "ok", tree / "ok.old")
    make_dir(tree / "ok", mode=0o775)
    make_binary(tree / "ok" / "tool")
    with Pins(walked=walked) as pins:
        seen = _observe(cases["trusted"], pins)
    assert seen == _observe(cases["trusted"])
    assert seen.ino == os.stat(tree / "ok" / "tool").st_ino
    # An ancestor replaced by a directory others can write to, not forgotten: the path
    # reaches another directory (its inode differs), whose route is walked anew.
    deep = make_binary(make_dir(tree / "a" / "b", mode=0o755) / "tool")
    with Pins(walked=walked) as pins:
        _observe(deep, pins)
    os.rename(tree / "a", tree / "a.old")
    make_dir(tree / "a", mode=0o777)
    make_binary(make_dir(tree / "a" / "b") / "tool")
    with Pins(walked=walked) as pins:
        seen = _observe(deep, pins)
    assert seen == _observe(deep)
    assert any(hop.mode & 0o777 == 0o777 for hop in seen.hops)


def test_root_changes_to_a_route_between_deploys_are_judged_anew(tree: Path) -> None:
    """Between rename-over deploys: an ancestor made writable by others (then the binary
    is refused, not restored), made safe again, the directory swapped for a new one by
    rename, and a release symlink flipped: each deploy is judged on the route as it is."""
    releases = make_dir(tree / "releases")
    v1 = make_binary(make_dir(releases / "v1") / "tool")
    v2 = make_binary(make_dir(releases / "v2") / "tool")
    os.symlink(releases / "v1", tree / "current")
    tool = make_binary(make_dir(tree / "app" / "bin") / "tool")
    declared = tree / "current" / "tool"
    state = write_state(tree / "state.toml", {tool: CAPS, declared: CAPS})
    with capture_logs() as logs, in_process(state, logs):
        wait_caps(tool, CAPS)
        wait_caps(v1, CAPS)
        _replaced(tool, b"1")
        wait_caps(tool, CAPS)

        os.chmod(tree / "app", 0o777)  # an ancestor, not the binary's own directory
        _replaced(tool, b"2")
        _wait_for(logs, "restore_refused", str(tool))
        assert getcap(tool) == ""
        os.chmod(tree / "app", 0o755)
        _replaced(tool, b"3")
        wait_caps(tool, CAPS)

        # The directory itself replaced by a new one, by rename.
        fresh = make_dir(tree / "app" / "bin.new")
        new_build(fresh / "tool", b"4")
        os.rename(tree / "app" / "bin", tree / "app" / "bin.old")
        os.rename(fresh, tree / "app" / "bin")
        wait_caps(tool, CAPS)
        _replaced(tool, b"5")
        wait_caps(tool, CAPS)

        # A release flip: the symlink on the route now leads to v2.
        os.symlink(releases / "v2", tree / "current.new")
        os.rename(tree / "current.new", tree / "current")
        wait_caps(v2, CAPS)
        os.removexattr(v2, "security.capability")
        wait_caps(v2, CAPS)


def _wait_for(logs: list[Any], event: str, path: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not any(e.get("event") == event and e.get("path") == path for e in logs):
        assert time.monotonic() < deadline, [e.get("event") for e in logs]
        time.sleep(0.02)


# renameat2(RENAME_EXCHANGE) of argv[1] and argv[2], argv[3] times, touching argv[4]
# (a name in the attacker's declared directory) after each: every exchange comes with
# an event the daemon handles, in the batch of the exchange or the next.
_SWAP_AND_TOUCH = (
    "import ctypes, os, sys\n"
    "a, b = map(os.fsencode, sys.argv[1:3])\n"
    "renameat2 = ctypes.CDLL(None, use_errno=True).renameat2\n"
    "for _ in range(int(sys.argv[3])):\n"
    "    if renameat2(-100, a, -100, b, 2) != 0:\n"
    "        sys.exit('renameat2: ' + os.strerror(ctypes.get_errno()))\n"
    "    try:\n"
    "        os.utime(sys.argv[4])\n"
    "    except OSError:\n"
    "        pass\n"
)


def test_attacker_swapping_its_directory_for_a_symlink_never_gets_a_file_changed(
    arena: Path,
) -> None:
    """Attack: uid 4242 owns a directory on a declared route. It swaps the declared
    directory inside it with a symlink to a root-owned directory holding an undeclared
    binary, by RENAME_EXCHANGE, and touches names there so that each swap comes with
    batches of events, while a trusted entry is deployed (rename-over) again and again.
    Runs as: attacker 4242 swaps; root deploys. Never: the undeclared binary gets
    other capabilities or loses its own, or the attacker's entry is judged in sync or
    restored."""
    victim_dir = make_dir(arena / "victim")
    victim = make_binary(victim_dir / "tool")
    setcap("cap_chown=ep", victim)  # what it must keep, exactly
    reference = os.getxattr(victim, "security.capability")
    attacker = make_dir(arena / "att", uid=ATTACKER)
    make_dir(attacker / "bin", uid=ATTACKER)
    subprocess.run(["cp", "/bin/true", str(attacker / "bin" / "tool")], check=True)
    os.chown(attacker / "bin" / "tool", ATTACKER, ATTACKER)
    os.symlink(victim_dir, attacker / "other")
    os.lchown(attacker / "other", ATTACKER, ATTACKER)
    trusted = make_binary(make_dir(arena / "ok") / "tool")
    declared = attacker / "bin" / "tool"
    state = write_state(arena / "state.toml", {declared: "cap_sys_admin=ep", trusted: CAPS})
    with capture_logs() as logs, in_process(state, logs):
        wait_caps(trusted, CAPS)
        swapper = subprocess.Popen(
            [
                *setpriv(),
                SYSTEM_PYTHON,
                "-I",
                "-c",
                _SWAP_AND_TOUCH,
                str(attacker / "bin"),
                str(attacker / "other"),
                str(10**9),
                str(declared),
            ]
        )
        try:
            for number in range(RACE_RUNS):
                _replaced(trusted, b"%d" % number)
                assert os.getxattr(victim, "security.capability") == reference
            wait_caps(trusted, CAPS)
            assert swapper.poll() is None, "the attacker stopped before the deploys did"
        finally:
            swapper.kill()  # ours: by its PID
            swapper.wait(30)
    assert os.getxattr(victim, "security.capability") == reference
    verdicts = {e.get("status") for e in logs if e.get("path") == str(declared)}
    # "failed": replaced while it was opened (a race), judged again at the next event.
    assert verdicts <= {"refused", "missing", "failed", None}, verdicts
