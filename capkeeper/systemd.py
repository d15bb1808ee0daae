"""Files that tie capkeeper to systemd: the ReadWritePaths= drop-in and the catalog.

The shipped unit runs the daemon with ``ProtectSystem=strict``, which makes the
whole file system read-only for it, so ``setxattr`` fails with EROFS unless the
directory holding each declared binary is listed in ``ReadWritePaths=``.
Directories, never files: a per-file bind mount disappears when the file is
renamed over, which every upgrade does. Never ``/`` or a whole system
hierarchy such as ``/usr`` or ``/etc``: see :data:`SYSTEM_DIRECTORIES`.
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from capkeeper.errors import CapkeeperError
from capkeeper.events import EVENTS
from capkeeper.paths import Walk, posixjoin
from capkeeper.state import State

if TYPE_CHECKING:
    from _typeshed import StrPath

DROPIN = Path("/etc/systemd/system/capkeeper.service.d/50-capkeeper-paths.conf")
# What the shipped unit's PrivateTmp=yes and ProtectHome=yes hide from the daemon
# (prefixes to match, not files to use).
HIDDEN_FROM_SERVICE = ("/tmp/", "/var/tmp/", "/home/", "/root/", "/run/user/")  # noqa: S108

# ProtectSystem=strict is what confines the daemon's CAP_SETFCAP: the VFS leaves
# security.* xattrs to the security modules (xattr_permission) and commoncap asks
# only for CAP_SETFCAP, not for any permission on the file, so a compromised
# daemon can give any file below a ReadWritePaths= directory any capability. "/" would
# undo the sandbox outright; each directory below holds a whole hierarchy of
# unrelated programs, libraries or configuration (the state itself in /etc),
# and opening it would undo it for all of them. A binary whose directory is
# one of these must move into a directory of its own.
SYSTEM_DIRECTORIES = frozenset(
    {
        "/",
        # The top-level directories of the file system hierarchy (and merged-/usr links).
        "/bin", "/boot", "/dev", "/efi", "/etc", "/home", "/lib", "/lib32", "/lib64",
        "/libx32", "/media", "/mnt", "/opt", "/proc", "/root", "/run", "/sbin", "/srv",
        "/sys", "/tmp", "/usr", "/var",  # noqa: S108 - names to refuse, not files to use
        # Whole hierarchies one level down: every library, the local /usr, all
        # services' state (dpkg's database included).
        "/usr/lib", "/usr/lib32", "/usr/lib64", "/usr/libx32", "/usr/local", "/usr/share",
        "/var/lib",
    }
)  # fmt: skip
"""Directories ``systemd-dropin`` never lists in ``ReadWritePaths=``."""


def writable_directory(
    path: str,
    *,
    islink: Callable[[str], bool] = os.path.islink,
    realpath: Callable[[str], str] = os.path.realpath,
) -> str:
    """The directory to make writable for ``path``'s binary.

    That is the binary's directory, unless a symlink sits on the way (a release
    directory flipped by ``ln -sfn``): then the directory holding the first
    symlink, which stays the same across flips.
    """
    walk: Walk[str] = Walk(path, "/")
    while (name := walk.next_name()) is not None and not walk.last:
        current = walk.directory[1]
        candidate = posixjoin(current, name)
        if islink(candidate):
            if current != "/":
                return current
            # A top-level symlink (merged /usr: /bin -> usr/bin): "/" would make the
            # whole file system writable again; take the resolved directory instead.
            return realpath(posixpath.dirname(path))
        walk.enter(candidate, candidate)
    return walk.directory[1]


def unit_word(word: str) -> str:
    """``word`` as one word of a unit-file list setting: ``%`` specifiers escaped,
    quoted when it holds whitespace, quotes or backslashes."""
    word = word.replace("%", "%%")
    if any(ch.isspace() or ch in "\"'\\" for ch in word):
        word = '"' + word.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return word


def dropin_refusals(state: State) -> list[str]:
    """Why the drop-in cannot be written: one sentence per entry whose writable
    directory would be ``/`` or a whole system hierarchy; empty when it can."""
    refusals = []
    for entry in state.entries:
        directory = writable_directory(entry.path)
        if directory in SYSTEM_DIRECTORIES:
            refusals.append(
                f"{entry.source} ({entry.path}): refusing to write ReadWritePaths=-{directory}: "
                f"it would let the service set capabilities on everything below {directory} "
                "(hint: move the binary, or the release symlink on its path, into a directory "
                "of its own such as /opt/NAME/bin/ and declare it there)"
            )
    return refusals


def dropin_text(state: State) -> str:
    """The drop-in that lists every declared binary's directory in ReadWritePaths=.

    Raises :class:`CapkeeperError` when :func:`dropin_refusals` finds any.
    """
    refusals = dropin_refusals(state)
    if refusals:
        raise CapkeeperError("; ".join(refusals))
    directories = sorted({writable_directory(entry.path) for entry in state.entries})
    lines = [
        "# Written by 'capkeeper systemd-dropin' from the declared state; do not edit.",
        "# Re-run it after changing the state, then: systemctl daemon-reload &&",
        "# systemctl restart capkeeper",
        "[Service]",
        # "-": a directory that does not exist yet must not fail the start.
        *(f"ReadWritePaths={unit_word('-' + directory)}" for directory in directories),
    ]
    return "\n".join(lines) + "\n"


def write_atomically(path: StrPath, text: str | Iterable[str], mode: int = 0o644) -> None:
    """Replace ``path`` with ``text`` by rename, so readers never see half a file.

    ``text`` may be an iterable of pieces, written as they come: a large file is
    never held in memory whole (the daemon's status file of 10,000 entries).
    """
    import tempfile  # noqa: PLC0415 - 8 ms of imports, after the daemon's READY=1

    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    try:
        with os.fdopen(fd, "w") as handle:
            if isinstance(text, str):
                handle.write(text)
            else:
                handle.writelines(text)
            handle.flush()
            os.fchmod(handle.fileno(), mode)
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def catalog_text() -> str:
    """The journald message catalog for every registered event."""
    chunks = [
        "# capkeeper journal message catalog: what each alert means and what to do.",
        "# Generated from capkeeper/events.py (python -m capkeeper.systemd); do not edit.",
        "# Installed as /usr/lib/systemd/catalog/capkeeper.catalog, then run",
        "# journalctl --update-catalog.",
    ]
    for spec in EVENTS.values():
        chunks += [
            "",
            f"-- {spec.message_id}",
            f"Subject: {spec.subject}",
            "Defined-By: capkeeper",
            "",
            *spec.explanation.split("\n"),
        ]
    return "\n".join(chunks) + "\n"


if __name__ == "__main__":  # pragma: no cover - regenerates the shipped catalog
    import sys

    sys.stdout.write(catalog_text())
