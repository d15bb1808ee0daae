"""Attacks on capkeeper by a local user, run for real: an auditor's reading list.

How to read this module
-----------------------
Every attack is one test. Its docstring says three things:

- **Attack**: what the attacker does;
- **Runs as**: the uid of each party. The attacker is ``ATTACKER`` (uid 4242,
  no passwd entry), started through ``setpriv --reuid=4242 --regid=4242
  --clear-groups``; capkeeper runs as root, as ``apply`` in ``ExecStartPre=+``
  does (the daemon's only privilege, CAP_SETFCAP, is what the attacks target);
- **Never**: what must not happen, which is what the test asserts.

Attacks are grouped by the item of the adversarial review (issue 8) they come
from, under a header ``# -- item N: title --``. Races use real syscalls (a
``renameat2(RENAME_EXCHANGE)`` loop run by the attacker) and are tried a few
hundred times; every attempt is checked, and each race test failed on the code
before its fix. Files live in an *arena*: a root-owned directory directly in
``/tmp`` that the attacker can traverse (pytest's own temporary directories
are private to root). Helpers come first; append new groups at the end.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import unicodedata
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from capkeeper.cli import ExitStatus, main
from capkeeper.errors import printable
from tests.conftest import (
    elf_source,
    getcap,
    make_binary,
    require_root,
    require_tool,
    setcap,
)
from tests.test_daemon import REPO, DaemonProcess, spawn, wait_caps

__all__ = ["spawn"]  # the fixture, imported for pytest

ATTACKER = 4242
SYSTEM_PYTHON = "/usr/bin/python3"  # readable by the attacker, unlike the test's venv
EVIL_CAPS = "cap_dac_override,cap_dac_read_search=ep"
RACE_RUNS = 200


# -- helpers ------------------------------------------------------------------------------


def setpriv() -> list[str]:
    """The command prefix that runs what follows as the unprivileged ATTACKER."""
    tool = require_tool("setpriv")
    return [tool, f"--reuid={ATTACKER}", f"--regid={ATTACKER}", "--clear-groups"]


def as_attacker(*argv: str) -> None:
    """Run one command as ATTACKER; fail the test if it fails."""
    result = subprocess.run([*setpriv(), *argv], capture_output=True, text=True, check=False)
    assert result.returncode == 0, f"{argv} as uid {ATTACKER}: {result.stderr}"


@pytest.fixture
def arena() -> Iterator[Path]:
    """A root-owned 0755 directory in /tmp (sticky, root's) that the attacker can reach."""
    require_root()
    base = Path(tempfile.mkdtemp(prefix="capkeeper-attack-", dir="/tmp"))
    try:
        os.chmod(base, 0o755)
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


def state_text(entries: dict[Path | str, str]) -> str:
    return "".join(f'[[binary]]\npath = "{p}"\ncaps = "{caps}"\n\n' for p, caps in entries.items())


def write_file(path: Path, text: str, *, uid: int = 0, mode: int = 0o644) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    os.chmod(path, mode)
    os.chown(path, uid, uid)
    return path


def make_dir(path: Path, *, uid: int = 0, mode: int = 0o755) -> Path:
    path.mkdir(parents=True)
    os.chmod(path, mode)
    os.chown(path, uid, uid)
    return path


_EXCHANGE_LOOP = r"""
import ctypes, os, sys
renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
a, b = os.fsencode(sys.argv[1]), os.fsencode(sys.argv[2])
AT_FDCWD, RENAME_EXCHANGE = -100, 2
first = True
while True:
    if renameat2(AT_FDCWD, a, AT_FDCWD, b, RENAME_EXCHANGE) != 0:
        sys.exit("renameat2: " + os.strerror(ctypes.get_errno()))
    if first:
        print("swapping", flush=True)
        first = False
"""


@contextmanager
def exchanging(a: Path, b: Path, *, attacker: bool = True) -> Iterator[None]:
    """Swap ``a`` and ``b`` atomically (``renameat2(RENAME_EXCHANGE)``) in a tight loop."""
    prefix = setpriv() if attacker else []
    process = subprocess.Popen(
        [*prefix, SYSTEM_PYTHON, "-I", "-c", _EXCHANGE_LOOP, str(a), str(b)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        started = process.stdout.readline()
        assert started == b"swapping\n", process.communicate(timeout=10)[1].decode()
        yield
        assert process.poll() is None, f"the exchange loop died: {process.communicate()[1]!r}"
    finally:
        process.kill()
        process.communicate(timeout=10)


_APPLY_MANY = r"""
import json, os, sys
from capkeeper.capabilities import decode, format_text
import capkeeper.settings
from capkeeper.cli import command_module, main
# main imports the command's module and the settings when it runs: import them before
# forking, so no run pays for that.
command_module("apply")
state, victim, runs = sys.argv[1], sys.argv[2], int(sys.argv[3])
codes, granted = {}, []
for _ in range(runs):
    pid = os.fork()
    if pid == 0:
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 1)
        os.dup2(null, 2)
        os._exit(main(["apply", "--state", state]))
    code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    codes[code] = codes.get(code, 0) + 1
    try:
        value = os.getxattr(victim, "security.capability")
    except OSError:
        continue
    granted.append(format_text(decode(value)))
    os.removexattr(victim, "security.capability")
print(json.dumps({"codes": codes, "granted": granted}))
"""


def apply_many(
    state: Path, victim: Path, runs: int = RACE_RUNS
) -> tuple[dict[int, int], list[str]]:
    """Run ``capkeeper apply --state STATE`` ``runs`` times; return exit codes and grants.

    Each run is a fresh process (forked from one that has imported capkeeper, so
    200 runs do not pay 200 interpreter start-ups) running ``main(["apply", …])``,
    exactly what ``capkeeper apply`` runs. After each run, capabilities found on
    ``victim`` are recorded and removed, so every run is judged on its own.
    """
    result = subprocess.run(
        [sys.executable, "-c", _APPLY_MANY, str(state), str(victim), str(runs)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    return {int(code): count for code, count in data["codes"].items()}, data["granted"]


def capkeeper(*argv: str | Path) -> subprocess.CompletedProcess[str]:
    """``python -m capkeeper ARGV`` as root; output captured."""
    return subprocess.run(
        [sys.executable, "-m", "capkeeper", *map(str, argv)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def run_as_attacker(*argv: str | Path) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` as the unprivileged :data:`ATTACKER` uid, with no supplementary groups."""
    setpriv = require_tool("setpriv")
    return subprocess.run(
        [
            setpriv,
            f"--reuid={ATTACKER}",
            f"--regid={ATTACKER}",
            "--clear-groups",
            "--",
            *map(str, argv),
        ],
        capture_output=True,
        text=True,
        check=False,
    )


@pytest.fixture
def attacker_dir() -> Iterator[Path]:
    """A directory owned by the attacker, below a root-owned 0755 directory in /tmp.

    Not below pytest's tmp_path: its ``pytest-of-root`` parent is mode 0700,
    which the attacker could not traverse.
    """
    require_root()
    base = Path(tempfile.mkdtemp(prefix="capkeeper-attack-"))
    try:
        os.chmod(base, 0o755)
        home = base / "home"
        home.mkdir(mode=0o755)
        os.chown(home, ATTACKER, ATTACKER)
        yield home
    finally:
        shutil.rmtree(base)


def _hidden(text: str) -> list[str]:
    """Control and format characters, separators and undecodable bytes in ``text``."""
    return [ch for ch in text if unicodedata.category(ch) in {"Cc", "Cf", "Cs", "Zl", "Zp"}]


def _lines(text: str) -> list[str]:
    """``text`` split at its newlines only, each line checked to hide nothing."""
    lines = text.split("\n")
    for line in lines:
        assert not _hidden(line), f"output line carries {_hidden(line)!r}: {line!r}"
    return [line for line in lines if line]


# -- item 1: state file swapped through an untrusted ancestor -------------------------------


def test_state_swapped_through_attacker_directory_is_never_loaded(arena: Path) -> None:
    """Attack: the state path runs through a directory the attacker owns; inside it the
    attacker swaps (RENAME_EXCHANGE, in a loop) the directory holding the legitimate,
    root-owned state with its own directory holding a state that grants
    cap_dac_override,cap_dac_read_search to a root-owned binary, while root runs
    ``capkeeper apply --state`` 200 times.
    Runs as: attacker uid 4242 (the loop); capkeeper as root.
    Never: a grant of the evil capabilities; every run must exit 78 (invalid state),
    since the route itself is untrusted whichever state it reaches.
    """
    bin_dir = make_dir(arena / "bin")
    victim = make_binary(bin_dir / "victim")
    good = make_binary(bin_dir / "good")
    controlled = make_dir(arena / "att", uid=ATTACKER)
    write_file(make_dir(controlled / "cur") / "state.toml", state_text({good: "cap_net_raw=ep"}))
    evil = make_dir(controlled / "alt", uid=ATTACKER)
    write_file(evil / "state.toml", state_text({victim: EVIL_CAPS}), uid=ATTACKER)
    with exchanging(controlled / "cur", controlled / "alt"):
        codes, granted = apply_many(controlled / "cur" / "state.toml", victim)
    assert granted == [], f"{len(granted)} grants in {RACE_RUNS} runs; exit codes {codes}"
    assert codes == {78: RACE_RUNS}
    assert getcap(victim) == ""


def test_state_swapped_through_attacker_symlink_is_never_loaded(arena: Path) -> None:
    """Attack: every directory is root's, but the state path goes through a symlink the
    attacker planted in a root-owned sticky world-writable directory (like /tmp); the
    attacker swaps it (RENAME_EXCHANGE, in a loop) with another of its symlinks that
    points at its own directory holding an evil state, while root runs ``capkeeper
    apply --state`` 200 times.
    Runs as: attacker uid 4242 (creates the symlinks, runs the loop); capkeeper as root.
    Never: a grant of the evil capabilities; every run must exit 78.
    """
    bin_dir = make_dir(arena / "bin")
    victim = make_binary(bin_dir / "victim")
    good = make_binary(bin_dir / "good")
    legit = make_dir(arena / "etc")
    write_file(legit / "state.toml", state_text({good: "cap_net_raw=ep"}))
    sticky = make_dir(arena / "shared", mode=0o1777)
    as_attacker("mkdir", "-m", "0755", str(sticky / "evil"))
    write_file(sticky / "evil" / "state.toml", state_text({victim: EVIL_CAPS}), uid=ATTACKER)
    as_attacker("ln", "-s", str(legit), str(sticky / "current"))
    as_attacker("ln", "-s", str(sticky / "evil"), str(sticky / "other"))
    with exchanging(sticky / "current", sticky / "other"):
        codes, granted = apply_many(sticky / "current" / "state.toml", victim)
    assert granted == [], f"{len(granted)} grants in {RACE_RUNS} runs; exit codes {codes}"
    assert codes == {78: RACE_RUNS}
    assert getcap(victim) == ""


def test_state_is_read_from_the_descriptor_that_was_checked(arena: Path) -> None:
    """Attack: on an all-root route, the state file is swapped (RENAME_EXCHANGE, in a
    loop) with a file that fails the checks (mode 0666, evil content) while root runs
    ``capkeeper apply --state`` 200 times. Whoever re-opens the file by path after
    checking it reads the evil file with the good file's verdict.
    Runs as: root for both (the race between check and read is the point, not who can
    write here; nobody but root could).
    Never: a grant of the evil capabilities; each run either applies the good state
    (exit 0) or rejects the evil file (exit 78).
    """
    bin_dir = make_dir(arena / "bin")
    victim = make_binary(bin_dir / "victim")
    good = make_binary(bin_dir / "good")
    etc = make_dir(arena / "etc")
    write_file(etc / "state.toml", state_text({good: "cap_net_raw=ep"}))
    write_file(etc / "loose.toml", state_text({victim: EVIL_CAPS}), mode=0o666)
    with exchanging(etc / "state.toml", etc / "loose.toml", attacker=False):
        codes, granted = apply_many(etc / "state.toml", victim)
    assert granted == [], f"{len(granted)} grants in {RACE_RUNS} runs; exit codes {codes}"
    assert set(codes) <= {0, 78}, codes
    assert codes.get(78), f"the swap was never seen: {codes}"  # the race really ran
    assert getcap(victim) == ""


RELOADS = 50


def test_reload_through_attacker_directory_is_always_rejected(
    arena: Path, spawn: Callable[..., DaemonProcess]
) -> None:
    """Attack: after the daemon started, a directory above the state's own directory is
    handed to the attacker, who swaps (RENAME_EXCHANGE, in a loop) the root-owned
    directory holding the legitimate state with its own holding an evil state; root
    sends SIGHUP 50 times, waiting for each reload's verdict.
    Runs as: attacker uid 4242 (owns the directory, runs the loop); the daemon as root.
    Never: a reload accepted, or the evil capabilities granted; every reload is
    rejected (state_rejected naming the directory), the daemon keeps running and
    still enforces the state it had.
    """
    bin_dir = make_dir(arena / "bin")
    victim = make_binary(bin_dir / "victim")
    good = make_binary(bin_dir / "good")
    etc = make_dir(arena / "etc")
    state = write_file(
        make_dir(etc / "capkeeper") / "state.toml", state_text({good: "cap_net_raw=ep"})
    )
    write_file(
        make_dir(etc / "evil", uid=ATTACKER) / "state.toml",
        state_text({victim: EVIL_CAPS}),
        uid=ATTACKER,
    )
    daemon = spawn(state)
    daemon.wait_ready()
    wait_caps(good, "cap_net_raw=ep")
    os.chown(etc, ATTACKER, ATTACKER)
    why = f"directory {etc} is owned by uid {ATTACKER}, not by root"
    verdicts: dict[str, int] = {}
    granted = 0
    with exchanging(etc / "capkeeper", etc / "evil"):
        for _ in range(RELOADS):
            mark = daemon.mark()
            daemon.send(signal.SIGHUP)
            verdict = daemon.wait_event(
                lambda e: e.get("event") in ("state_rejected", "state_loaded"), mark, 15.0
            )
            named = verdict["event"] == "state_rejected" and why in verdict["error"]
            key = "rejected naming the directory" if named else verdict["event"]
            verdicts[key] = verdicts.get(key, 0) + 1
            if getcap(victim):
                granted += 1
                setcap("-r", victim)
    assert (granted, verdicts) == (0, {"rejected naming the directory": RELOADS})
    assert daemon.process.poll() is None
    setcap("-r", good)
    wait_caps(good, "cap_net_raw=ep")  # the state from before is still enforced
    assert getcap(victim) == ""


DEEP_TOML = "x = " + "[" * 3000 + "]" * 3000 + "\n"  # nesting tomllib recurses on


def test_reload_of_untrusted_deeply_nested_state_is_rejected_not_fatal(
    arena: Path,
    spawn: Callable[..., DaemonProcess],
) -> None:
    """Attack: the directory above the state's own directory is handed to the attacker,
    who swaps in its own directory holding a "state" nested so deeply that tomllib
    recurses past Python's limit; root sends SIGHUP.
    Runs as: attacker uid 4242 (owns the directory, renames); the daemon as root.
    Never: the daemon dying. A state that fails the walk is not even read: reload
    rejected, old state kept. Before the fix the untrusted file was parsed anyway and
    the RecursionError ended the daemon with an internal error.
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
    assert f"directory {etc} is owned by uid {ATTACKER}" in verdict["error"]
    assert "nested too deeply" not in verdict["error"]  # not read, so not parsed
    assert daemon.process.poll() is None
    setcap("-r", good)
    wait_caps(good, "cap_net_raw=ep")  # the old state is still enforced


def test_untrusted_huge_state_is_refused_without_reading_it(arena: Path) -> None:
    """Attack: the state path runs through a directory the attacker owns, and the
    attacker makes the state a 4 GiB sparse file; root runs ``capkeeper apply`` with a
    1 GiB address-space limit (a stand-in for a memory-limited unit).
    Runs as: attacker uid 4242 (owns the directory, creates the file); apply as root.
    Never: anything but "invalid state" (exit 78) naming the attacker's directory.
    Before the fix the loader read all of the untrusted file (3 GiB took 88 s and
    6.3 GB of RSS without a limit) and, limited, died with MemoryError (exit 2).
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


# -- item 2: refused entries must not strip through untrusted routes ------------------------


def _capable_target(arena: Path) -> Path:
    """A root-owned, undeclared binary carrying cap_net_raw=ep (a stand-in for ping)."""
    target = make_binary(make_dir(arena / "bin") / "ping")
    setcap("cap_net_raw=ep", target)
    return target


def test_apply_through_attacker_directory_leaves_the_target_alone(arena: Path) -> None:
    """Attack: a declared binary's directory belongs to the attacker, who symlinks the
    declared name to an undeclared root-owned binary carrying cap_net_raw=ep, then
    root runs ``capkeeper apply``.
    Runs as: attacker uid 4242 (owns the directory, plants the symlink); apply as root.
    Never: the target's capabilities removed (or changed); the entry is refused (exit 2)
    and the output says that nothing was changed.
    """
    target = _capable_target(arena)
    controlled = make_dir(arena / "opt", uid=ATTACKER)
    declared = controlled / "app"
    state = write_file(arena / "etc" / "state.toml", state_text({declared: "cap_net_admin=ep"}))
    as_attacker("ln", "-s", str(target), str(declared))
    result = capkeeper("apply", "--state", str(state))
    assert result.returncode == 2, result.stderr
    assert f"directory {controlled} is owned by uid {ATTACKER}, not by root" in result.stdout
    assert f"nothing was changed on {target} (it keeps cap_net_raw=ep)" in result.stdout
    assert getcap(target) == "cap_net_raw=ep"


def test_declared_owner_cannot_strip_an_undeclared_root_binary(arena: Path) -> None:
    """Attack: an entry declares ``owner = "4242"`` for a binary in a directory that uid
    4242 owns (a route the declared owner may own). uid 4242 makes the declared name a
    symlink to an undeclared root-owned binary carrying cap_net_raw=ep; root runs
    ``capkeeper apply``.
    Runs as: attacker uid 4242 (the declared owner: owns the directory, plants the
    symlink); apply as root.
    Never: the target's capabilities removed. The entry is refused by a file rule (the
    target is owned by uid 0, not 4242); before the fix the route counted as trusted
    and reconcile failed closed on whatever file the owner pointed it at.
    """
    target = _capable_target(arena)
    owned = make_dir(arena / "opt", uid=ATTACKER)
    declared = owned / "app"
    state = write_file(
        arena / "etc" / "state.toml",
        state_text({declared: "cap_net_bind_service=ep"}).replace(
            "\n\n", f'\nowner = "{ATTACKER}"\n\n'
        ),
    )
    as_attacker("ln", "-s", str(target), str(declared))
    result = capkeeper("apply", "--state", str(state))
    assert result.returncode == 2, result.stderr
    assert f"{target} is owned by uid 0, not by {ATTACKER}" in result.stdout
    assert (
        f"nothing was changed on {target} (it keeps cap_net_raw=ep): directory {owned} on "
        f"the route to it is owned by uid {ATTACKER}, not by root"
    ) in result.stdout
    assert getcap(target) == "cap_net_raw=ep", result.stdout


def test_apply_through_proc_leaves_the_target_alone(arena: Path) -> None:
    """Attack: a declared path is a root-owned symlink into /proc/self/root/… that reaches
    an undeclared binary carrying cap_net_raw=ep (/proc/<pid>/root is wherever that
    process's root is, i.e. chosen by whoever runs it); root runs ``capkeeper apply``.
    Runs as: root only (the route, not its owner, is the problem).
    Never: the target's capabilities removed; the entry is refused (exit 2).
    """
    target = _capable_target(arena)
    declared = arena / "app"
    declared.symlink_to(f"/proc/self/root{target}")
    state = write_file(arena / "etc" / "state.toml", state_text({declared: "cap_net_admin=ep"}))
    result = capkeeper("apply", "--state", str(state))
    assert result.returncode == 2, result.stderr
    assert "leads into /proc or /sys" in result.stdout
    assert getcap(target) == "cap_net_raw=ep"


def _stays(path: Path, text: str, seconds: float) -> None:
    """``getcap`` shows ``text`` on ``path`` throughout ``seconds`` (polled)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert getcap(path) == text
        time.sleep(0.05)


@pytest.mark.parametrize("route", ["attacker-directory", "declared-owner", "proc"])
def test_daemon_through_untrusted_route_leaves_the_target_alone(
    arena: Path, spawn: Callable[..., DaemonProcess], route: str
) -> None:
    """Attack: while the daemon watches a declared path, the attacker (who owns its
    directory, and with route=declared-owner is the entry's declared ``owner``) creates
    the declared name as a symlink to an undeclared root-owned binary carrying
    cap_net_raw=ep; or (route=proc) the declared path is a root-owned symlink through
    /proc/self/root to that binary.
    Runs as: attacker uid 4242 plants the symlink; the daemon runs as root.
    Never: the target's capabilities removed by the daemon; it reports restore_refused.
    """
    target = _capable_target(arena)
    if route == "proc":
        declared = arena / "app"
        declared.symlink_to(f"/proc/self/root{target}")
    else:
        declared = make_dir(arena / "opt", uid=ATTACKER) / "app"
    text = state_text({declared: "cap_net_admin=ep"})
    if route == "declared-owner":
        text = text.replace("\n\n", f'\nowner = "{ATTACKER}"\n\n')
    state = write_file(arena / "etc" / "state.toml", text)
    daemon = spawn(state)
    daemon.wait_ready()
    mark = daemon.mark()
    if route != "proc":
        as_attacker("ln", "-s", str(target), str(declared))
    refused = daemon.wait_event(
        lambda e: e.get("event") == "restore_refused" and e.get("path") == str(declared),
        mark if route != "proc" else 0,
    )
    assert "nothing was changed" in refused["reason"], refused
    _stays(target, "cap_net_raw=ep", 2.0)
    assert daemon.process.poll() is None


def test_declared_target_reached_through_attacker_route_does_not_fight(
    arena: Path, spawn: Callable[..., DaemonProcess]
) -> None:
    """Attack: the target is itself declared (cap_net_raw=ep); the attacker points a
    second declared path, through its own directory, at it. Before the fix the refused
    entry stripped the target and the target's entry restored it, over and over.
    Runs as: attacker uid 4242 plants the symlink; the daemon runs as root.
    Never: the target losing its declared capabilities during 3 s of the daemon
    running; it is restored at most once (the watch may see the symlink's creation).
    """
    target = _capable_target(arena)
    declared = make_dir(arena / "opt", uid=ATTACKER) / "app"
    state = write_file(
        arena / "etc" / "state.toml",
        state_text({target: "cap_net_raw=ep", declared: "cap_net_admin=ep"}),
    )
    daemon = spawn(state)
    daemon.wait_ready()
    as_attacker("ln", "-s", str(target), str(declared))
    daemon.wait_event(
        lambda e: e.get("event") == "restore_refused" and e.get("path") == str(declared)
    )
    _stays(target, "cap_net_raw=ep", 3.0)
    restores = [
        e
        for e in daemon.events()
        if e.get("path") == str(target)
        and e.get("event") in ("capability_restored", "capability_tampering")
    ]
    assert len(restores) <= 1, restores


@pytest.mark.parametrize("link", ["..", "."])
def test_batch_sharing_a_directory_walk_never_drops_an_attacker_symlink(
    arena: Path, spawn: Callable[..., DaemonProcess], link: str
) -> None:
    """Attack: root declares several binaries under ``pub/link/`` in a root-owned sticky
    world-writable directory ``pub``; the attacker makes ``pub/link`` a symlink to
    ``link`` (".." or "."), which enters no new directory. The daemon's start-up
    reconcile shares each directory's walk between the entries of the batch.
    Runs as: attacker uid 4242 plants the symlink; the daemon runs as root.
    Never: a later entry judged on a route without the attacker's symlink: the
    capability-less binary granted cap_net_raw, or the undeclared cap_sys_admin
    removed from the binary whose sha256 pin fails.
    """
    pub = make_dir(arena / "pub", mode=0o1777)
    home = arena if link == ".." else pub
    plain, capable = make_binary(home / "b"), make_binary(home / "c")
    setcap("cap_sys_admin=ep", capable)
    as_attacker("ln", "-s", link, str(pub / "link"))
    text = state_text({pub / "link" / "a": "cap_net_raw=ep", pub / "link" / "b": "cap_net_raw=ep"})
    text += f'[[binary]]\npath = "{pub / "link" / "c"}"\ncaps = "cap_net_raw=ep"\n'
    text += f'sha256 = "{"0" * 64}"\n'
    state = write_file(arena / "etc" / "state.toml", text)
    daemon = spawn(state)
    daemon.wait_ready()
    for name in ("b", "c"):  # c's pin is a content rule: reported once it stays so (1 s)
        declared = str(pub / "link" / name)

        def refusal(event: dict[str, Any], declared: str = declared) -> bool:
            return event.get("event") == "restore_refused" and event.get("path") == declared

        refused = daemon.wait_event(refusal)
        assert "uid 4242" in refused["reason"], refused
    assert getcap(plain) == ""
    assert getcap(capable) == "cap_sys_admin=ep"
    assert daemon.process.poll() is None


# -- item 3: programs that run other code --


def test_loader_copy_declared_with_dac_read_search_gives_nobody_a_root_only_file(
    arena: Path,
) -> None:
    """uid 4242 runs its own cat through a copy of ld.so declared with cap_dac_read_search+ep.

    Must not happen: capkeeper grants the copy anything, or the attacker reads
    the root-only 0600 file. The last step shows the attack is real on this
    kernel: once root puts the capability there by hand, the same command reads it.
    """
    secret = arena / "secret"
    secret.write_text("root only\n")
    secret.chmod(0o600)
    reader = arena / "reader"
    shutil.copyfile("/lib64/ld-linux-x86-64.so.2", reader)
    reader.chmod(0o755)
    home = arena / "home"
    home.mkdir(mode=0o755)
    cat = home / "mycat"
    shutil.copyfile(shutil.which("cat") or "/bin/cat", cat)
    cat.chmod(0o755)
    os.chown(home, ATTACKER, ATTACKER)
    os.chown(cat, ATTACKER, ATTACKER)
    state = arena / "state.toml"
    state.write_text(f'[[binary]]\npath = "{reader}"\ncaps = "cap_dac_read_search+ep"\n')

    before = run_as_attacker(reader, cat, secret)
    assert before.returncode != 0, "precondition: the attacker cannot read it directly"
    assert "Permission denied" in before.stderr

    applied = capkeeper("--state", state, "apply")
    assert applied.returncode == 2, applied.stdout + applied.stderr
    assert "runs other code: it is the dynamic loader" in applied.stdout + applied.stderr
    assert "Traceback" not in applied.stderr
    assert getcap(reader) == ""

    after = run_as_attacker(reader, cat, secret)
    assert after.returncode != 0
    assert "root only" not in after.stdout
    assert "Permission denied" in after.stderr

    setcap("cap_dac_read_search+ep", reader)  # what the old code did
    granted = run_as_attacker(reader, cat, secret)
    assert granted.stdout == "root only\n", "the attack path itself works on this kernel"


# -- item 4: output forged with newlines --
#
# Attacker: uid 4242, owner of a directory. It copies an ELF into that directory
# under a name holding a newline followed by text that reads like a getcap line,
# and gives it cap_sys_admin=ep in a user namespace of its own
# (``unshare -Ur setcap``: a v3 value with rootid 4242, no privilege needed).
# Must not happen: any capkeeper output (audit table, its reasons and summary,
# --format getcap, adopt, doctor, show) printing a line that the attacker wrote,
# or any control character reaching the terminal. The name is shown escaped.

FORGED_NAMES = [
    "evil\nfake cap_sys_admin=ep",
    "evil\rfake cap_sys_admin=ep",  # a carriage return overwrites the line on a terminal
    "evil\x1b[2K\rfake",  # erase the line, then write over it
    "evil\u2028fake",  # a line separator
    "gpj.\u202eexe",  # a bidi override shows the name reversed
]


def _plant(directory: Path, name: str) -> Path:
    """As the attacker: copy an ELF to ``directory/name`` and setcap it in a user namespace."""
    require_tool("unshare")
    setcap = require_tool("setcap")
    path = directory / name
    planted = run_as_attacker(
        "sh", "-c", 'cp "$1" "$2" && exec unshare -Ur "$3" cap_sys_admin=ep "$2"', "sh",
        str(elf_source()), str(path), setcap,
    )  # fmt: skip
    assert planted.returncode == 0, f"the attacker could not plant the file: {planted.stderr}"
    assert os.stat(path).st_uid == ATTACKER
    value = os.getxattr(path, "security.capability")
    magic, *_, rootid = struct.unpack("<6I", value)  # vfs_ns_cap_data
    assert (magic >> 24, rootid) == (3, ATTACKER)  # a v3 value owned by the attacker's namespace
    return path


def test_real_getcap_prints_the_forged_line(attacker_dir: Path) -> None:
    """The attack is real: getcap -r prints the attacker's text as a line of its own."""
    _plant(attacker_dir, FORGED_NAMES[0])
    getcap = require_tool("getcap")
    out = subprocess.run(
        [getcap, "-r", str(attacker_dir)], capture_output=True, text=True, check=True
    ).stdout
    assert "fake cap_sys_admin=ep cap_sys_admin=ep" in out.splitlines()


@pytest.mark.parametrize("name", FORGED_NAMES)
def test_audit_output_cannot_be_forged_by_a_name(
    attacker_dir: Path, name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """audit (table, reasons, summary, getcap format) prints the name escaped, one line per
    file; --json keeps the exact name."""
    path = _plant(attacker_dir, name)
    escaped = printable(str(path))
    assert escaped != str(path)
    state = ["--state", str(attacker_dir.parent / "none.toml")]

    assert main([*state, "audit", str(attacker_dir)]) == ExitStatus.DRIFT
    out, err = capsys.readouterr()
    finding, *reasons, summary = _lines(out)
    assert finding.startswith(f"critical  unmanaged  {escaped}  cap_sys_admin=ep")
    assert reasons, "the table lists its reasons"
    assert all(reason.startswith(" " * 21 + "- ") for reason in reasons)
    assert f"{escaped} is owned by uid {ATTACKER}" in "\n".join(reasons)
    assert summary.startswith("1 files: 1 unmanaged;")
    assert not any(line.startswith("fake") for line in _lines(out) + _lines(err))

    assert main([*state, "audit", "--format", "getcap", str(attacker_dir)]) == ExitStatus.DRIFT
    out, err = capsys.readouterr()
    assert _lines(out) == [f"{escaped} cap_sys_admin=ep"]
    assert _lines(err) == []

    assert main([*state, "audit", "--json", str(attacker_dir)]) == ExitStatus.DRIFT
    out, _ = capsys.readouterr()
    records = [json.loads(line) for line in _lines(out)]
    assert [r["path"] for r in records if r["type"] == "finding"] == [str(path)]


@pytest.mark.parametrize("name", FORGED_NAMES)
def test_adopt_doctor_and_show_cannot_be_forged_by_a_name(
    attacker_dir: Path, name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """adopt (named and --from-audit), doctor and show print the name escaped on one line."""
    path = _plant(attacker_dir, name)
    escaped = printable(str(path))
    state = ["--state", str(attacker_dir.parent / "none.toml")]
    not_adopted = (
        f"capkeeper: adopt: {escaped}: not adopted: its capabilities belong to the root of a "
        f"user namespace (rootid {ATTACKER}), which the state cannot declare"
    )

    assert main([*state, "adopt", str(path)]) == ExitStatus.FAILED
    out, err = capsys.readouterr()
    assert (out, _lines(err)) == ("", [not_adopted])

    assert main([*state, "adopt", "--from-audit", str(attacker_dir)]) == ExitStatus.FAILED
    out, err = capsys.readouterr()
    assert (out, _lines(err)) == ("", [not_adopted])

    assert main([*state, "doctor", str(path)]) == ExitStatus.DRIFT
    out, err = capsys.readouterr()
    lines = _lines(out)
    assert lines[0].startswith(f"{escaped}: warning: ")
    assert all(line.startswith((escaped, "  fix: ")) for line in lines[:-1])
    # The attacker-owned directory also draws the flood-exposure warning (item 9).
    assert lines[-1] == "1 binaries checked: 0 error(s), 2 warning(s)"
    assert _lines(err) == []

    assert main(["show", str(path)]) == ExitStatus.OK
    out, _ = capsys.readouterr()
    assert _lines(out) == [f"{escaped} cap_sys_admin=ep"]
