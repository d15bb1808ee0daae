"""The fast paths of a full reconcile, on real files: a batch (shared pins, warm memos of
the route verdict, the decoded values, the interpreter verdict, the ELF Bloom filter)
says exactly what a lone check with every memo cleared says, refusals included, and an
unprivileged attacker racing files in a sticky directory cannot make it say otherwise.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from capkeeper import elf, files, interpreters, trust
from capkeeper.capabilities import format_text, parse
from capkeeper.enforce import reconcile
from capkeeper.files import XATTR_NAME, Pins, observe
from capkeeper.kernel import cap_last_cap
from capkeeper.model import Entry
from capkeeper.reconcile import Outcome, Status
from tests.conftest import make_binary, require_root, setcap
from tests.test_attacks import ATTACKER, SYSTEM_PYTHON, setpriv

LAST_CAP = cap_last_cap()


def _entry(path: Path | str, caps: str = "cap_net_raw=ep") -> Entry:
    value = parse(caps, last_cap=LAST_CAP)
    return Entry(path=str(path), caps=value, caps_text=format_text(value, last_cap=LAST_CAP))


def _forget() -> None:
    """Clear every value memo of the reconcile path: the next check computes it all."""
    trust._TRUSTED_ROUTES.clear()
    trust._last_trusted = None
    interpreters.runs_other_code.cache_clear()
    files._decoded.cache_clear()
    elf._bloom_passing.cache_clear()


def _verdict(outcome: Outcome) -> tuple[object, ...]:
    return (outcome.status, outcome.found, outcome.resolved, outcome.reason, outcome.extra)


@pytest.fixture
def cases(tmp_path: Path) -> list[Entry]:
    """Declared binaries of every verdict, several sharing a directory and its route."""
    require_root()
    os.chmod(tmp_path, 0o755)
    base = tmp_path / "t"
    base.mkdir(mode=0o755)
    good, loose, sticky, scripts = (base / n for n in ("bin", "loose", "sticky", "scripts"))
    for directory, mode in ((good, 0o755), (loose, 0o775), (sticky, 0o1777), (scripts, 0o755)):
        directory.mkdir()
        os.chmod(directory, mode)
    entries = []
    for index in range(3):  # in sync, sharing bin/ with every refusal below
        setcap("cap_net_raw=ep", make_binary(good / f"ok{index}"))
        entries.append(_entry(good / f"ok{index}"))
    make_binary(good / "stripped")
    setcap("cap_net_raw,cap_sys_admin=ep", make_binary(good / "extra"))
    make_binary(good / "groupw", mode=0o775)
    os.chown(make_binary(good / "theirs"), ATTACKER, ATTACKER)
    setcap("cap_net_raw=ep", make_binary(good / "python3"))  # an interpreter's name
    setuid = make_binary(good / "setuid")
    os.chmod(setuid, 0o4755)
    odd = make_binary(good / "rootid")  # a v3 value for the root of another namespace
    os.setxattr(odd, XATTR_NAME, bytes.fromhex("01000003" + "00200000" + "00" * 12 + "e8030000"))
    entries += [_entry(good / n) for n in ("stripped", "extra", "groupw", "theirs", "python3")]
    entries += [_entry(good / n) for n in ("setuid", "rootid", "missing")]
    entries.append(_entry(good / "ok0", "cap_net_raw+eip"))  # inheritable, not allowed
    setcap("cap_net_raw=ep", make_binary(loose / "tool"))
    entries.append(_entry(loose / "tool"))
    setcap("cap_net_raw=ep", make_binary(sticky / "root1"))  # one link: trusted
    setcap("cap_net_raw=ep", make_binary(sticky / "root2"))
    os.link(sticky / "root2", sticky / "root2-link")  # two links in a sticky directory
    os.chown(make_binary(sticky / "user"), ATTACKER, ATTACKER)
    entries += [_entry(sticky / n) for n in ("root1", "root2", "user", "root1")]
    script = scripts / "run"
    script.write_text("#!/bin/sh\nexit 0\n")
    os.chmod(script, 0o755)
    entries.append(_entry(script))
    (base / "via").symlink_to(good)
    os.lchown(base / "via", ATTACKER, ATTACKER)  # a symlink on the route, not root's
    (base / "rootvia").symlink_to(good)
    entries += [_entry(base / "via" / "ok1"), _entry(base / "rootvia" / "ok2")]
    return entries


def test_a_batch_says_what_a_lone_check_says(cases: list[Entry]) -> None:
    """Every entry, checked in one batch twice (memos warm the second time), gets the
    verdict and the observation of a lone check from ``/`` with every memo cleared."""
    lone: list[tuple[object, ...]] = []
    seen = []
    for entry in cases:
        _forget()
        lone.append(_verdict(reconcile(entry, write=False, last_cap=LAST_CAP)))
        if lone[-1][0] is not Status.MISSING:
            _forget()
            seen.append(observe(entry.path))
    statuses = {verdict[0] for verdict in lone}
    assert {Status.IN_SYNC, Status.DRIFT, Status.REFUSED, Status.MISSING} <= statuses
    paths = [e.path.split("/t/", 1)[1] for e in cases]
    reasons = dict(zip(paths, (str(v[3]) for v in lone), strict=True))
    assert "hard links" in reasons["sticky/root2"]
    assert "sticky is writable by group and others" in reasons["sticky/user"]
    assert "owned by uid 4242" in reasons["sticky/user"]
    assert reasons["sticky/root1"] == ""
    assert "script" in reasons["scripts/run"]
    assert "interpreter" in reasons["bin/python3"]
    assert "setuid" in reasons["bin/setuid"]
    assert "loose is writable by group" in reasons["loose/tool"]
    assert "symlink" in reasons["via/ok1"]
    assert reasons["rootvia/ok2"] == ""
    for _ in range(2):
        with Pins() as pins:
            outcomes = [reconcile(e, write=False, last_cap=LAST_CAP, pins=pins) for e in cases]
        assert [_verdict(o) for o in outcomes] == lone
        observed = [o.observation for o in outcomes if o.status is not Status.MISSING]
        assert observed == seen


_CHURN = r"""
import os, sys, time
source, name = sys.argv[1], sys.argv[2]
data = open(source, "rb").read()
print("churning", flush=True)
while True:
    tmp = name + ".tmp"
    with open(tmp, "wb") as out:
        out.write(data)
    os.chmod(tmp, 0o755)
    os.rename(tmp, name)
    time.sleep(0.002)
    os.unlink(name)
"""


@pytest.fixture
def sticky_arena() -> Iterator[Path]:
    """A root-owned sticky 1777 directory below a root 0755 one in /tmp, as /tmp is."""
    require_root()
    base = Path(tempfile.mkdtemp(prefix="capkeeper-fast-", dir="/tmp"))
    try:
        os.chmod(base, 0o755)
        shared = base / "shared"
        shared.mkdir()
        os.chmod(shared, 0o1777)
        yield shared
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_attacker_files_in_a_sticky_directory_never_share_roots_verdict(
    sticky_arena: Path,
) -> None:
    """Attack: in a sticky directory where root's one-link binary is trusted (its route
    verdict remembered), the attacker creates and removes, in a loop, the file of a
    declared name next to it, while batches check both over and over.
    Runs as: the attacker uid 4242 (setpriv), capkeeper as root.
    Never: the attacker's file is judged anything but refused, or gets capabilities;
    root's binary is always in sync."""
    trusted = make_binary(sticky_arena / "tool")
    setcap("cap_net_raw=ep", trusted)
    planted = sticky_arena / "planted"
    source = sticky_arena / "source"
    shutil.copyfile(trusted, source)
    os.chmod(source, 0o644)
    process = subprocess.Popen(
        [*setpriv(), SYSTEM_PYTHON, "-I", "-c", _CHURN, str(source), str(planted)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    seen: set[Status] = set()
    try:
        assert process.stdout is not None
        assert process.stdout.readline() == b"churning\n", process.communicate(timeout=10)[1]
        for _ in range(500):
            with Pins() as pins:
                root_outcome = reconcile(_entry(trusted), write=True, pins=pins)
                theirs = reconcile(_entry(planted), write=True, pins=pins)
            assert root_outcome.status is Status.IN_SYNC, root_outcome
            seen.add(theirs.status)
            assert theirs.status in (Status.REFUSED, Status.MISSING, Status.FAILED), theirs
            if theirs.observation is not None:
                assert theirs.observation.uid == ATTACKER
        assert process.poll() is None, process.communicate()[1]
    finally:
        process.kill()
        process.communicate()
    assert Status.REFUSED in seen  # the race was run against files that existed


def test_a_pinned_route_is_judged_on_its_directory_as_it_is_at_each_entry(tree: Path) -> None:
    """In one batch, the files of a pinned directory share its route (one object, its
    verdict remembered by identity) only while the directory's owner and mode are those
    pinned: loosened, handed to another user, or restored between two entries, each
    entry is judged on the directory as it is then, exactly as a lone check is."""
    home = tree / "bin"
    home.mkdir(mode=0o755)
    names = [f"t{index}" for index in range(8)]
    for name in names:
        setcap("cap_net_raw=ep", make_binary(home / name))
    changes = {
        "t2": lambda: os.chmod(home, 0o775),
        "t3": lambda: os.chmod(home, 0o755),
        "t4": lambda: os.chown(home, ATTACKER, 0),
        "t5": lambda: os.chown(home, 0, 0),
        "t6": lambda: os.chmod(home, 0o777),
        "t7": lambda: os.chmod(home, 0o755),
    }
    for _ in range(2):
        batch, lone = [], []
        with Pins() as pins:
            for name in names:
                if name in changes:
                    changes[name]()
                batch.append(reconcile(_entry(home / name), write=False, pins=pins))
                _forget()
                lone.append(reconcile(_entry(home / name), write=False))
        assert [_verdict(o) for o in batch] == [_verdict(o) for o in lone]
        assert [o.observation for o in batch] == [o.observation for o in lone]
        statuses = [o.status for o in batch]
        assert statuses == [Status.IN_SYNC] * 2 + [Status.REFUSED, Status.IN_SYNC] * 3
        assert "writable by group" in batch[2].reason
        assert f"owned by uid {ATTACKER}" in batch[4].reason
        assert "writable by group and others" in batch[6].reason


_FLIP = r"""
import os, sys
home = sys.argv[1]
print("flipping", flush=True)
while True:
    os.chmod(home, 0o755)
    os.chmod(home, 0o700)
    os.chmod(home, 0o777)
"""


@pytest.fixture
def open_arena() -> Iterator[Path]:
    """A root-owned 0755 directory in /tmp that every user can reach."""
    require_root()
    base = Path(tempfile.mkdtemp(prefix="capkeeper-fast-", dir="/tmp"))
    try:
        os.chmod(base, 0o755)
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_attacker_flipping_the_mode_of_their_directory_never_gets_a_trusted_verdict(
    open_arena: Path,
) -> None:
    """Attack: root's binaries sit in a directory the attacker owns; while batches check
    them over and over (the route of each pinned and shared), the attacker flips the
    directory's mode in a loop (0755, 0700, 0777), so that consecutive entries see
    different owners' routes and modes.
    Runs as: the attacker uid 4242 (setpriv), capkeeper as root.
    Never: any of them is judged anything but refused, or written (stripped of the
    capabilities they carry: the attacker chose what the route reaches)."""
    home = open_arena / "home"
    home.mkdir(mode=0o755)
    binaries = [make_binary(home / f"t{index}") for index in range(20)]
    for binary in binaries:
        setcap("cap_net_raw=ep", binary)
    os.chown(home, ATTACKER, ATTACKER)
    value = os.getxattr(binaries[0], XATTR_NAME)
    process = subprocess.Popen(
        [*setpriv(), SYSTEM_PYTHON, "-I", "-c", _FLIP, str(home)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        assert process.stdout.readline() == b"flipping\n", process.communicate(timeout=10)[1]
        for _ in range(100):
            with Pins() as pins:
                for binary in binaries:
                    outcome = reconcile(_entry(binary), write=True, pins=pins)
                    assert outcome.status is Status.REFUSED, outcome
                    assert f"owned by uid {ATTACKER}" in outcome.reason
        assert process.poll() is None, process.communicate()[1]
    finally:
        process.kill()
        process.communicate()
    assert all(os.getxattr(binary, XATTR_NAME) == value for binary in binaries)
