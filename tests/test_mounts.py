"""Mount facts: the mountinfo parser on fixed text, and mount_of on real mounts.

Real mounts are made in a private mount namespace that only this test's
thread (and the processes it starts) enters; they vanish when it leaves.
:func:`private_mount_namespace` is shared with the audit and doctor tests.
"""

from __future__ import annotations

import ctypes
import os
import select
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from capkeeper.mounts import (
    MountTable,
    MountWatch,
    is_local,
    mount_id,
    mount_of,
    parse_mountinfo,
    read_mounts,
    unescape,
)
from tests.conftest import make_binary, require_root, require_tool

CLONE_NEWNS = 0x00020000
_libc = ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"{what}: {os.strerror(code)}")


@contextmanager
def private_mount_namespace() -> Iterator[None]:
    """Move this thread into a new, private mount namespace for the body, then back.

    Mounts made inside (also by child processes, which inherit the namespace)
    are invisible to the host and disappear with the namespace on exit.
    """
    require_root()
    require_tool("mount")
    original = os.open("/proc/self/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
    cwd = os.getcwd()
    try:
        _check(_libc.unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS)")
        try:
            # Nothing done in here may propagate to the host's mounts.
            run("mount", "--make-rprivate", "/")
            yield
        finally:
            _check(_libc.setns(original, CLONE_NEWNS), "setns back to the host namespace")
            os.chdir(cwd)
    finally:
        os.close(original)


def run(*argv: str) -> None:
    """Run a mount command; fail the test with its stderr when it fails."""
    result = subprocess.run(argv, capture_output=True, text=True, check=False)
    assert result.returncode == 0, f"{' '.join(argv)}: {result.stderr}"


SAMPLE = (
    "22 27 0:21 / /proc rw,nosuid,nodev,noexec,relatime shared:5 - proc proc rw\n"
    "27 1 254:0 / / rw,relatime - ext4 /dev/vda rw,discard\n"
    "61 27 0:50 / /mnt/with\\040space rw,nosuid,relatime shared:9 master:2 - tmpfs none rw\n"
    "62 27 7:0 / /media/squash rw,relatime - squashfs /dev/loop0 ro,errors=continue\n"
    "63 27 254:0 /srv/data /bind ro,relatime - ext4 /dev/vda rw\n"
    "64 27 0:51 / /net rw - nfs4 server:/export rw,vers=4.2\n"
    "65 64 0:52 / /net rw - fuse.sshfs host:/ rw\n"
)


def test_parse_fields_and_escapes() -> None:
    """Every field is parsed; \\040 in a mount point is a space; optional fields are kept."""
    mounts = parse_mountinfo(SAMPLE)
    assert [m.mount_id for m in mounts] == [22, 27, 61, 62, 63, 64, 65]
    spaced = mounts[2]
    assert spaced.mount_point == "/mnt/with space"
    assert spaced.parent_id == 27
    assert spaced.device == (0, 50)
    assert spaced.optional == ("shared:9", "master:2")
    assert spaced.fstype == "tmpfs"
    assert spaced.source == "none"
    assert spaced.nosuid
    assert not spaced.read_only
    assert mounts[4].root == "/srv/data"


def test_read_only_per_mount_and_per_superblock() -> None:
    """ro in the per-mount options and ro in the super options are told apart."""
    mounts = {m.mount_point: m for m in parse_mountinfo(SAMPLE)}
    squash, bind, root = mounts["/media/squash"], mounts["/bind"], mounts["/"]
    assert squash.read_only_super
    assert not squash.read_only_mount
    assert squash.read_only
    assert bind.read_only_mount
    assert not bind.read_only_super
    assert bind.read_only
    assert not root.read_only


def test_noexec_and_nosuid_flags() -> None:
    """nosuid and noexec come from the per-mount options only."""
    proc = parse_mountinfo(SAMPLE)[0]
    assert proc.nosuid
    assert proc.noexec
    assert not parse_mountinfo(SAMPLE)[1].nosuid


def test_unescape_octal_bytes() -> None:
    """Tabs, newlines and backslashes come back; a non-UTF-8 byte survives as surrogate."""
    assert unescape("/a\\011b\\012c\\134d") == "/a\tb\nc\\d"
    assert unescape("/plain") == "/plain"
    assert os.fsencode(unescape("/x\\377")) == b"/x\xff"


def test_malformed_line_names_its_number() -> None:
    """A line without the ' - ' separator is refused with its line number."""
    with pytest.raises(ValueError, match="mountinfo line 2: cannot parse"):
        parse_mountinfo("27 1 254:0 / / rw - ext4 /dev/vda rw\n27 1 254:0 / / rw ext4\n")


@pytest.mark.parametrize(
    ("fstype", "local"),
    [
        ("ext4", True),
        ("tmpfs", True),
        ("overlay", True),
        ("fuse.bindfs", True),
        ("proc", False),
        ("sysfs", False),
        ("cgroup2", False),
        ("devtmpfs", False),
        ("nfs4", False),
        ("cifs", False),
        ("fuse.sshfs", False),
    ],
)
def test_local_file_systems(fstype: str, local: bool) -> None:
    """Pseudo and network file systems are not local; disk and memory ones are."""
    assert is_local(fstype) is local


def test_covering_prefers_longest_and_topmost() -> None:
    """The fallback lookup takes the longest mount point, the last one among stacked mounts."""
    table = MountTable(parse_mountinfo(SAMPLE))
    assert table.covering("/net/x") == table.by_id()[65]
    assert table.covering("/mnt/with space/f") == table.by_id()[61]
    assert table.covering("/mnt/with") == table.by_id()[27]
    assert table.covering("/") == table.by_id()[27]


def test_mount_of_root_matches_mountinfo() -> None:
    """The mount id read from fdinfo is the mountinfo line of '/'."""
    table = read_mounts()
    root = mount_of("/", table=table)
    assert root.mount_point == "/"
    fd = os.open("/", os.O_PATH)
    try:
        assert mount_id(fd) == root.mount_id
    finally:
        os.close(fd)


def test_mount_of_bind_with_flags(tmp_path: Path) -> None:
    """A nosuid, read-only bind mount (with a space in its path) is found by mount id."""
    source = tmp_path / "source"
    source.mkdir()
    make_binary(source / "tool")
    target = tmp_path / "bind point"
    target.mkdir()
    with private_mount_namespace():
        run("mount", "--bind", str(source), str(target))
        run("mount", "-o", "remount,bind,nosuid,ro", str(target))
        mount = mount_of(str(target / "tool"))
        assert mount.mount_point == str(target)
        assert mount.nosuid
        assert mount.read_only_mount
        assert not mount.read_only_super
        assert mount_of(str(source / "tool")).mount_point != str(target)
    assert not os.path.ismount(target)


def test_mount_of_overlay(tmp_path: Path) -> None:
    """A file of an overlay's lower layer is reported on the overlay mount, by mount id."""
    for name in ("lower", "upper", "work", "merged"):
        (tmp_path / name).mkdir()
    make_binary(tmp_path / "lower" / "tool")
    with private_mount_namespace():
        options = f"lowerdir={tmp_path}/lower,upperdir={tmp_path}/upper,workdir={tmp_path}/work"
        run("mount", "-t", "overlay", "overlay", "-o", options, str(tmp_path / "merged"))
        path = tmp_path / "merged" / "tool"
        mount = mount_of(str(path))
        assert mount.fstype == "overlay"
        assert mount.mount_point == str(tmp_path / "merged")
        assert mount_of(str(tmp_path / "lower" / "tool")).fstype != "overlay"


def test_mount_of_symlink_follows_by_default(tmp_path: Path) -> None:
    """A symlink into another mount reports that mount, unless told not to follow."""
    with private_mount_namespace():
        (tmp_path / "mnt").mkdir()
        run("mount", "-t", "tmpfs", "tmpfs", str(tmp_path / "mnt"))
        make_binary(tmp_path / "mnt" / "tool")
        (tmp_path / "link").symlink_to(tmp_path / "mnt" / "tool")
        assert mount_of(str(tmp_path / "link")).fstype == "tmpfs"
        assert mount_of(str(tmp_path / "link"), follow_symlinks=False).fstype != "tmpfs"


def test_mount_watch_is_ready_once_per_change_and_names_the_mount_point(tmp_path: Path) -> None:
    """The open mountinfo polls POLLPRI once after a mount or unmount, never while idle;
    changed() names the mount point that came or went."""
    target = tmp_path / "m"
    target.mkdir()
    with private_mount_namespace():
        watch = MountWatch()
        try:
            poller = select.poll()
            poller.register(watch, select.POLLPRI)
            assert poller.poll(0) == []
            assert watch.changed() == frozenset()
            run("mount", "-t", "tmpfs", "capkeeper-test", str(target))
            assert poller.poll(5000)[0][1] & select.POLLPRI
            assert poller.poll(0) == [], "still ready after the change was polled"
            assert watch.changed() == {str(target)}
            assert watch.changed() == frozenset()
            run("mount", "-t", "tmpfs", "capkeeper-test", str(target))  # stacked on top
            run("umount", str(target))
            assert poller.poll(5000)
            assert watch.changed() == frozenset(), "the same mounts as before"
            run("umount", str(target))
            assert watch.changed() == {str(target)}
        finally:
            watch.close()
