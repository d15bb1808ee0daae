"""Mount facts: which mount a file lives on, its file system type and flags.

:func:`parse_mountinfo` is a pure parser of ``/proc/self/mountinfo``
(``proc(5)``); :func:`mount_of` is the thin reader that finds the mount of a
path by its mount id, read from ``/proc/self/fdinfo/<fd>`` of an ``O_PATH``
descriptor. Matching by ``st_dev`` is wrong for btrfs subvolumes and overlayfs,
whose files report another device number than their mount.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import NamedTuple

__all__ = [
    "NETWORK_FS",
    "PSEUDO_FS",
    "MountInfo",
    "MountTable",
    "MountWatch",
    "is_local",
    "mount_id",
    "mount_of",
    "mount_of_fd",
    "parse_mountinfo",
    "read_mounts",
    "unescape",
]

PSEUDO_FS: frozenset[str] = frozenset(
    {
        "autofs",
        "binfmt_misc",
        "bpf",
        "cgroup",
        "cgroup2",
        "configfs",
        "debugfs",
        "devpts",
        "devtmpfs",
        "efivarfs",
        "fusectl",
        "hugetlbfs",
        "mqueue",
        "nfsd",
        "nsfs",
        "proc",
        "pstore",
        "rpc_pipefs",
        "securityfs",
        "selinuxfs",
        "sysfs",
        "tracefs",
    }
)
"""Kernel interface file systems: no binaries live there, and walking them is slow or endless."""

NETWORK_FS: frozenset[str] = frozenset(
    {
        "9p",
        "afs",
        "ceph",
        "cifs",
        "coda",
        "davfs",
        "fuse.gcsfuse",
        "fuse.glusterfs",
        "fuse.juicefs",
        "fuse.rclone",
        "fuse.s3fs",
        "fuse.sshfs",
        "glusterfs",
        "lustre",
        "ncpfs",
        "nfs",
        "nfs4",
        "smb3",
        "smbfs",
    }
)
"""File systems served by another host: their files are that host's business."""

_ESCAPE = re.compile(r"\\([0-7]{3})")


def unescape(field: str) -> str:
    r"""Undo the kernel's octal escapes in a mountinfo path (``\040`` is a space)."""
    if "\\" not in field:
        return field
    raw = _ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), field)
    # The kernel escapes bytes; re-read them as the file system encoding does.
    return os.fsdecode(raw.encode("latin-1"))


def is_local(fstype: str) -> bool:
    """True unless ``fstype`` is a pseudo or network file system."""
    return fstype not in PSEUDO_FS and fstype not in NETWORK_FS


class MountInfo(NamedTuple):
    """One line of ``/proc/self/mountinfo``."""

    mount_id: int
    parent_id: int
    device: tuple[int, int]
    root: str  # the directory of the file system mounted here (not "/" for a bind)
    mount_point: str
    options: frozenset[str]  # per-mount options (field 6)
    optional: tuple[str, ...]  # shared:N, master:N, ...
    fstype: str
    source: str
    super_options: frozenset[str]  # per-superblock options

    @property
    def nosuid(self) -> bool:
        """The kernel ignores setuid bits and file capabilities of files on this mount."""
        return "nosuid" in self.options

    @property
    def noexec(self) -> bool:
        return "noexec" in self.options

    @property
    def read_only_mount(self) -> bool:
        """This mount (not necessarily the file system) is read-only."""
        return "ro" in self.options

    @property
    def read_only_super(self) -> bool:
        """The file system itself is read-only (every mount of it is)."""
        return "ro" in self.super_options

    @property
    def read_only(self) -> bool:
        return self.read_only_mount or self.read_only_super

    @property
    def local(self) -> bool:
        return is_local(self.fstype)


def _parse_line(line: str, number: int) -> MountInfo:
    left, sep, right = line.partition(" - ")
    fields = left.split(" ")
    tail = right.split(" ")
    if not sep or len(fields) < 6 or len(tail) < 2:
        raise ValueError(f"mountinfo line {number}: cannot parse {line!r}")
    major, _, minor = fields[2].partition(":")
    return MountInfo(
        mount_id=int(fields[0]),
        parent_id=int(fields[1]),
        device=(int(major), int(minor)),
        root=unescape(fields[3]),
        mount_point=unescape(fields[4]),
        options=frozenset(fields[5].split(",")),
        optional=tuple(fields[6:]),
        fstype=unescape(tail[0]),
        source=unescape(tail[1]),
        super_options=frozenset(tail[2].split(",")) if len(tail) > 2 else frozenset(),
    )


def parse_mountinfo(text: str) -> tuple[MountInfo, ...]:
    """Parse the text of ``/proc/PID/mountinfo``, in the kernel's order.

    Raises :class:`ValueError` naming the line that does not parse.
    """
    return tuple(
        _parse_line(line, number)
        for number, line in enumerate(text.splitlines(), start=1)
        if line.strip()
    )


class MountTable(NamedTuple):
    """All mounts of this mount namespace, indexed by mount id and mount point."""

    mounts: tuple[MountInfo, ...]

    def by_id(self) -> Mapping[int, MountInfo]:
        return {m.mount_id: m for m in self.mounts}

    def mount_points(self) -> frozenset[str]:
        return frozenset(m.mount_point for m in self.mounts)

    def covering(self, path: str) -> MountInfo | None:
        """The mount whose mount point is the longest prefix of ``path`` (no symlinks in it).

        Among mounts stacked on the same point the last listed is on top. This
        is the fallback when the path cannot be opened to read its mount id.
        """
        best: MountInfo | None = None
        for mount in self.mounts:
            point = mount.mount_point
            inside = path == point or path.startswith(point.rstrip("/") + "/")
            if inside and (best is None or len(point) >= len(best.mount_point)):
                best = mount
        return best


def read_mounts(path: str = "/proc/self/mountinfo") -> MountTable:
    """Read this process's mount table."""
    with open(path, encoding="utf-8", errors="surrogateescape") as file:
        return MountTable(parse_mountinfo(file.read()))


def mount_id(fd: int, *, fdinfo: str = "/proc/self/fdinfo") -> int:
    """The mount id of the file open on ``fd`` (the ``mnt_id:`` line of its fdinfo)."""
    with open(f"{fdinfo}/{fd}", encoding="ascii") as file:
        for line in file:
            if line.startswith("mnt_id:"):
                return int(line.split(":", 1)[1])
    raise OSError(f"no mnt_id in {fdinfo}/{fd}")


def mount_of(
    path: str, *, follow_symlinks: bool = True, table: MountTable | None = None
) -> MountInfo:
    """The mount ``path`` lives on (the mount a symlink points into, by default).

    Raises :class:`OSError` when ``path`` cannot be opened, and :class:`LookupError`
    when its mount is not in the table (it was mounted or unmounted meanwhile).
    """
    flags = os.O_PATH | os.O_CLOEXEC | (0 if follow_symlinks else os.O_NOFOLLOW)
    fd = os.open(path, flags)
    try:
        return mount_of_fd(fd, table=table, name=path)
    finally:
        os.close(fd)


def mount_of_fd(fd: int, *, table: MountTable | None = None, name: str = "") -> MountInfo:
    """The mount the file open on ``fd`` lives on (any open mode, ``O_PATH`` included).

    Raises :class:`OSError` when its fdinfo cannot be read, and :class:`LookupError`
    when its mount is not in the table (``name`` says which file in the message).
    """
    mounts = table if table is not None else read_mounts()
    ident = mount_id(fd)
    found = mounts.by_id().get(ident)
    if found is None:
        raise LookupError(f"{name or f'fd {fd}'}: mount id {ident} is not in the mount table")
    return found


class MountWatch:
    """This namespace's mount table, kept open to learn when it changes.

    An open ``/proc/self/mountinfo`` is always readable (``POLLIN``) and reports
    ``POLLPRI | POLLERR`` once after each change of the mount table, until the
    next poll (``mounts_poll`` in ``fs/proc_namespace.c``): register it for
    ``POLLPRI`` only, then an idle mount table never wakes the poller.
    """

    def __init__(self, path: str = "/proc/self/mountinfo") -> None:
        self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            self.table = self._read()
        except (OSError, ValueError):
            os.close(self._fd)
            raise

    def fileno(self) -> int:
        return self._fd

    def _read(self) -> MountTable:
        os.lseek(self._fd, 0, os.SEEK_SET)
        chunks = []
        while chunk := os.read(self._fd, 65536):
            chunks.append(chunk)
        text = b"".join(chunks).decode("utf-8", errors="surrogateescape")
        return MountTable(parse_mountinfo(text))

    def changed(self) -> frozenset[str]:
        """Re-read the table; return the mount points of every mount added or removed.

        A mount is known by its id, parent, device, root and mount point: ids
        are reused, so a new mount on the same point with the same id still
        differs in another field unless it is the very same file system
        directory again. Raises :class:`OSError` or :class:`ValueError` when
        the table cannot be read.
        """
        new = self._read()
        before = {_identity(m) for m in self.table.mounts}
        after = {_identity(m) for m in new.mounts}
        self.table = new
        return frozenset(key[-1] for key in before ^ after)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _identity(mount: MountInfo) -> tuple[int, int, tuple[int, int], str, str]:
    return (mount.mount_id, mount.parent_id, mount.device, mount.root, mount.mount_point)
