"""apply/check on real files with real security.capability xattrs (root)."""

from __future__ import annotations

import errno
import hashlib
import os
from pathlib import Path
from unittest import mock

import pytest
import structlog

from capkeeper.capabilities import parse
from capkeeper.enforce import reconcile
from capkeeper.files import XATTR_NAME
from capkeeper.model import Entry
from capkeeper.reconcile import Status, log_outcome
from tests.conftest import getcap, make_binary, setcap


def _entry(path: Path, caps: str = "cap_net_bind_service=+ep", **kw: object) -> Entry:
    parsed = parse(caps, last_cap=40)
    from capkeeper.capabilities import format_text

    return Entry(path=str(path), caps=parsed, caps_text=format_text(parsed, last_cap=40), **kw)  # type: ignore[arg-type]


def _has_caps(path: Path) -> bool:
    return XATTR_NAME in os.listxattr(path, follow_symlinks=False)


def test_apply_restores_a_stripped_file(tree: Path) -> None:
    """A binary without its capabilities gets exactly the declared set."""
    binary = make_binary(tree / "app")
    outcome = reconcile(_entry(binary), write=True)
    assert outcome.status is Status.RESTORED
    assert outcome.found == "none"
    assert outcome.expected == "cap_net_bind_service=ep"
    assert getcap(binary) == "cap_net_bind_service=ep"


def test_in_sync_file_is_not_written(tree: Path) -> None:
    """An in-sync file is left alone: no write, mtime and ctime unchanged."""
    binary = make_binary(tree / "app")
    setcap("cap_net_bind_service=ep", binary)
    before = os.stat(binary)
    outcome = reconcile(_entry(binary), write=True)
    after = os.stat(binary)
    assert outcome.status is Status.IN_SYNC
    assert (after.st_mtime_ns, after.st_ctime_ns) == (before.st_mtime_ns, before.st_ctime_ns)


def test_semantic_equality_v3_rootid_zero(tree: Path) -> None:
    """A v3 value with rootid 0 (read back as v2) counts as in sync."""
    binary = make_binary(tree / "app")
    os.setxattr(
        binary, XATTR_NAME, bytes.fromhex("010000030004000000000000000000000000000000000000")
    )
    assert reconcile(_entry(binary), write=True).status is Status.IN_SYNC


def test_extra_capabilities_are_replaced_and_reported(tree: Path) -> None:
    """Extra capabilities on a managed file are drift, flagged as possible tampering."""
    binary = make_binary(tree / "app")
    setcap("cap_net_bind_service,cap_sys_admin=ep", binary)
    check = reconcile(_entry(binary), write=False)
    assert (check.status, check.extra) == (Status.DRIFT, True)
    assert getcap(binary) == "cap_net_bind_service,cap_sys_admin=ep"
    with structlog.testing.capture_logs() as logs:
        outcome = reconcile(_entry(binary), write=True)
        log_outcome(structlog.get_logger(), outcome, cause="apply")
    assert (outcome.status, outcome.extra) == (Status.RESTORED, True)
    assert getcap(binary) == "cap_net_bind_service=ep"
    assert logs == [
        {
            "event": "capability_tampering",
            "log_level": "critical",
            "path": str(binary),
            "expected": "cap_net_bind_service=ep",
            "found": "cap_net_bind_service,cap_sys_admin=ep",
            "status": "restored",
            "cause": "apply",
            "action": "restored",
        }
    ]


def test_different_flags_are_drift_without_tampering(tree: Path) -> None:
    """Fewer capabilities than declared is plain drift, not tampering."""
    binary = make_binary(tree / "app")
    setcap("cap_net_bind_service=p", binary)
    outcome = reconcile(_entry(binary), write=True)
    assert (outcome.status, outcome.extra) == (Status.RESTORED, False)
    assert getcap(binary) == "cap_net_bind_service=ep"


def test_missing_file(tree: Path) -> None:
    """A declared file that does not exist is reported missing, nothing else happens."""
    outcome = reconcile(_entry(tree / "nope"), write=True)
    assert outcome.status is Status.MISSING
    assert outcome.reason == "file does not exist"


def test_declared_empty_set_is_written(tree: Path) -> None:
    """Declaring '=' stores an all-zero value, as setcap does."""
    binary = make_binary(tree / "app")
    setcap("cap_chown=ep", binary)
    assert reconcile(_entry(binary, "="), write=True).status is Status.RESTORED
    assert getcap(binary) == "="


def test_symlink_owned_by_root_is_followed(tree: Path) -> None:
    """A root-owned symlink on the path is resolved; the target is written."""
    release = tree / "releases" / "v1"
    release.mkdir(parents=True, mode=0o755)
    os.chmod(tree / "releases", 0o755)
    binary = make_binary(release / "app")
    (tree / "current").symlink_to("releases/v1")
    outcome = reconcile(_entry(tree / "current" / "app"), write=True)
    assert outcome.status is Status.RESTORED
    assert outcome.resolved == str(binary)
    assert getcap(binary) == "cap_net_bind_service=ep"
    assert not _has_caps(tree / "current")  # never written through the link itself


def test_sha256_pin_match_is_granted(tree: Path) -> None:
    """A matching pin grants."""
    binary = make_binary(tree / "app")
    digest = hashlib.sha256(binary.read_bytes()).hexdigest()
    assert reconcile(_entry(binary, sha256=digest), write=True).status is Status.RESTORED


@pytest.mark.parametrize(
    ("code", "message"),
    [
        (
            errno.EOPNOTSUPP,
            "cannot write security.capability: extended attributes not supported "
            "(hint: this file system does not support extended attributes)",
        ),
        (
            errno.EPERM,
            "cannot write security.capability: Operation not permitted "
            "(hint: run as root or grant CAP_SETFCAP (the file may also be immutable))",
        ),
        (
            errno.EROFS,
            "cannot write security.capability: Read-only file system (hint: the file system "
            "is read-only here; under ProtectSystem=strict list the directory in "
            "ReadWritePaths= (capkeeper systemd-dropin writes it))",
        ),
        (
            errno.ENOSPC,
            "cannot write security.capability: No space left on device (hint: the file "
            "system is full, or the file's other extended attributes fill the space kept "
            "for them)",
        ),
    ],
)
def test_write_errors_become_sentences(tree: Path, code: int, message: str) -> None:
    """OS errors on the write are reported with a hint; injected because the OS won't on demand."""
    binary = make_binary(tree / "app")
    failing = mock.Mock(side_effect=OSError(code, os.strerror(code)))
    with mock.patch("xattr.xattr.set", failing):
        outcome = reconcile(_entry(binary), write=True)
    assert outcome.status is Status.FAILED
    assert outcome.reason == f"{binary}: {message}"


def test_filesystem_that_drops_the_value_is_reported(tree: Path) -> None:
    """A write that succeeds but does not stick is a failure, not a restore."""
    binary = make_binary(tree / "app")
    with mock.patch("xattr.xattr.set", mock.Mock(return_value=None)):
        outcome = reconcile(_entry(binary), write=True)
    assert outcome.status is Status.FAILED
    assert outcome.reason == (
        f"{binary}: the file system did not keep security.capability (read back nothing) "
        "(hint: use a file system with xattr support (ext4, xfs, btrfs, tmpfs))"
    )


def _replace_before_open(binary: Path, times: int) -> tuple[mock.Mock, list[int]]:
    """A wrapper of os.open that renames a new build over ``binary`` just before the
    first ``times`` opens of its name: the race between the walk's stat and its open,
    injected because the kernel will not lose it on demand. Returns the wrapper and
    the list of inodes renamed in."""
    real_open = os.open
    renamed: list[int] = []

    def racing_open(path: str, flags: int, *args: object, **kw: object) -> int:
        if path == binary.name and kw.get("dir_fd") is not None and len(renamed) < times:
            fresh = make_binary(binary.with_name(f".new{len(renamed)}"))
            renamed.append(os.stat(fresh).st_ino)
            os.rename(fresh, binary)
        return real_open(path, flags, *args, **kw)  # type: ignore[arg-type]

    return mock.Mock(side_effect=racing_open), renamed


def test_file_replaced_while_opening_is_walked_again(tree: Path) -> None:
    """A deploy renaming a new build in between the walk and the open: the new build is
    walked again and restored, not reported as an error."""
    binary = make_binary(tree / "app")
    racing, renamed = _replace_before_open(binary, times=1)
    with mock.patch("os.open", racing):
        outcome = reconcile(_entry(binary), write=True)
    assert outcome.status is Status.RESTORED
    assert len(renamed) == 1
    assert os.stat(binary).st_ino == renamed[0]
    assert getcap(binary) == "cap_net_bind_service=ep"


def test_file_replaced_on_every_open_is_a_transient_failure(tree: Path) -> None:
    """A file replaced at every attempt is reported as 'replaced while opening' at warning
    level (a race: the next event or retry looks again), not as EAGAIN's strerror."""
    binary = make_binary(tree / "app")
    racing, renamed = _replace_before_open(binary, times=100)
    with mock.patch("os.open", racing):
        outcome = reconcile(_entry(binary), write=True)
    assert outcome.status is Status.FAILED
    assert outcome.reason == (
        f"{binary}: replaced while opening: it changed between the walk and the open; the "
        "next event or retry looks again"
    )
    assert len(renamed) == 3
    assert getcap(binary) == ""
    with structlog.testing.capture_logs() as logs:
        log_outcome(structlog.get_logger(), outcome)
    assert [(e["event"], e["log_level"]) for e in logs] == [("restore_failed", "warning")]
