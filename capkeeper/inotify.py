"""inotify through pyinotify's public API: watches in, typed events out.

The only module that imports pyinotify. An :class:`Instance` is one inotify
instance: pyinotify's ``WatchManager`` opens it and adds and removes watches
(``add_watch``, ``rm_watch``, ``del_watch``, ``get_fd``, ``close``, all public);
the queued events are read from ``get_fd()`` in one batch (``FIONREAD`` says
how many bytes are queued) and decoded by :func:`decode`, a pure function, into
frozen :class:`Event` values.

Why not ``Notifier.read_events``/``process_events``: pyinotify builds a
``_RawEvent`` and then an ``Event`` object per kernel event, and calls its
processing function with it, before anything can look at the name. A flood of
create/close/unlink of *other* names in a watched directory (any user who can
write there can raise it) then costs those objects per event: measured on the
development machine (2 vCPUs, Python 3.11, 2026-11-30), 15,000 queued events
of names nobody asked about cost 22 to 36 µs of CPU each through ``read_events``
+ ``process_events`` with a ``ProcessEvent`` that ignores them (28,000 to
45,000 per CPU-second for that step alone, against the daemon's goal of
100,000 per CPU-second in all), and 1.1 to 1.5 µs each through
:meth:`Instance.read` + :func:`decode` with a name filter (0.4 to 0.6 µs for
:func:`decode` alone).
``bench/storm_probe.py --dispatch`` measures both. :func:`decode` drops such
events by watch descriptor and raw name before any object is built.

Kernel facts (inotify(7)): a read returns whole ``struct inotify_event``
records (``wd``, ``mask``, ``cookie``, ``len``, then ``len`` bytes of name,
NUL-padded); ``IN_Q_OVERFLOW`` comes with wd -1 and no name; ``IN_IGNORED``
(the watch ended), ``IN_Q_OVERFLOW`` and ``IN_UNMOUNT`` are delivered whatever
the mask; pyinotify opens the instance without ``IN_CLOEXEC`` and
``IN_NONBLOCK``, so both are set here.
"""

from __future__ import annotations

import array
import errno
import fcntl
import logging
import os
import re
import struct
import termios
from collections.abc import Container, Iterable, Mapping
from enum import IntFlag
from typing import Final, NamedTuple

import pyinotify

# The kernel's IN_* bits, as pyinotify names them (the values are the kernel's).
IN_ACCESS: Final[int] = pyinotify.IN_ACCESS
IN_MODIFY: Final[int] = pyinotify.IN_MODIFY
IN_ATTRIB: Final[int] = pyinotify.IN_ATTRIB
IN_CLOSE_WRITE: Final[int] = pyinotify.IN_CLOSE_WRITE
IN_CLOSE_NOWRITE: Final[int] = pyinotify.IN_CLOSE_NOWRITE
IN_OPEN: Final[int] = pyinotify.IN_OPEN
IN_MOVED_FROM: Final[int] = pyinotify.IN_MOVED_FROM
IN_MOVED_TO: Final[int] = pyinotify.IN_MOVED_TO
IN_CREATE: Final[int] = pyinotify.IN_CREATE
IN_DELETE: Final[int] = pyinotify.IN_DELETE
IN_DELETE_SELF: Final[int] = pyinotify.IN_DELETE_SELF
IN_MOVE_SELF: Final[int] = pyinotify.IN_MOVE_SELF
IN_UNMOUNT: Final[int] = pyinotify.IN_UNMOUNT
IN_Q_OVERFLOW: Final[int] = pyinotify.IN_Q_OVERFLOW
IN_IGNORED: Final[int] = pyinotify.IN_IGNORED
IN_ONLYDIR: Final[int] = pyinotify.IN_ONLYDIR
IN_DONT_FOLLOW: Final[int] = pyinotify.IN_DONT_FOLLOW
IN_EXCL_UNLINK: Final[int] = pyinotify.IN_EXCL_UNLINK
IN_ISDIR: Final[int] = pyinotify.IN_ISDIR

HEADER: Final = struct.Struct("iIII")  # struct inotify_event: wd, mask, cookie, len
# Events that name no file in the directory, or end the watch: never filtered by name.
_UNFILTERED: Final[int] = IN_Q_OVERFLOW | IN_IGNORED


class Change(IntFlag):
    """What an event says happened; the values are the kernel's ``IN_*`` bits."""

    MODIFY = IN_MODIFY
    ATTRIB = IN_ATTRIB
    CLOSE_WRITE = IN_CLOSE_WRITE
    MOVED_FROM = IN_MOVED_FROM
    MOVED_TO = IN_MOVED_TO
    CREATE = IN_CREATE
    DELETE = IN_DELETE
    DELETE_SELF = IN_DELETE_SELF
    MOVE_SELF = IN_MOVE_SELF
    UNMOUNT = IN_UNMOUNT
    Q_OVERFLOW = IN_Q_OVERFLOW
    IGNORED = IN_IGNORED


class Event(NamedTuple):
    """One kernel event: ``name`` (empty for the watched object itself) under watch ``wd``."""

    wd: int
    mask: int
    cookie: int
    name: str

    @property
    def is_overflow(self) -> bool:
        """The queue overflowed (or could not be read whole): events were lost."""
        return bool(self.mask & IN_Q_OVERFLOW)

    @property
    def is_ignored(self) -> bool:
        """The kernel ended this watch (``IN_IGNORED``): its descriptor is free again."""
        return bool(self.mask & IN_IGNORED)


OVERFLOW: Final = Event(-1, IN_Q_OVERFLOW, 0, "")


def decode(data: bytes, names: Mapping[int, Container[bytes]] | None = None) -> list[Event]:
    """Decode the records read from an inotify descriptor, dropping the unwanted first.

    With ``names``, an event on a name (``len`` > 0) is kept only when its raw
    name (NUL padding removed) is in ``names[wd]``; an event of a descriptor
    missing from ``names`` is dropped. This is decided from the header and the
    raw bytes, before any object is built. Events without a name, overflows
    and ended watches are always kept. Names are decoded like every path in
    Python (``os.fsdecode``), so a non-UTF-8 name cannot break the stream (it
    would with pyinotify's strict ``bytes.decode()``).

    A truncated record (the kernel returns whole records, so a damaged
    buffer) ends the decoding with :data:`OVERFLOW`: the caller then rescans
    rather than trusting a partial batch.
    """
    events: list[Event] = []
    append = events.append
    unpack = HEADER.unpack_from
    size = HEADER.size
    end = len(data)
    offset = 0
    while offset < end:
        start = offset + size
        if start > end:
            append(OVERFLOW)
            break
        wd, mask, cookie, length = unpack(data, offset)
        offset = start + length
        if offset > end:
            append(OVERFLOW)
            break
        if not length:
            append(Event(wd, mask, cookie, ""))
            continue
        raw = data[start:offset].rstrip(b"\0")
        if names is not None and not mask & _UNFILTERED:
            wanted = names.get(wd)
            if wanted is None or raw not in wanted:
                continue
        append(Event(wd, mask, cookie, os.fsdecode(raw)))
    return events


def encode_names(names: Iterable[str]) -> frozenset[bytes]:
    """Names as :func:`decode` compares them: the bytes the kernel reports."""
    return frozenset(map(os.fsencode, names))


_ERRNO_NAME = re.compile(r"\((E[A-Z0-9]+)\)\s*$")


def _errno_in(message: str) -> int:
    """The errno a pyinotify error message names as ``(ENAME)`` at its end (EIO if none).

    pyinotify reports a failed ``inotify_init``/``inotify_add_watch`` only so, in
    ``OSError``'s and ``WatchManagerError``'s message (``Errno=… (ENOSPC)``).
    """
    match = _ERRNO_NAME.search(message)
    code = getattr(errno, match.group(1), None) if match else None
    return code if isinstance(code, int) else errno.EIO


class Instance:
    """One inotify instance, opened close-on-exec and non-blocking.

    :meth:`add` raises :class:`OSError` with the kernel's errno when a watch
    cannot be added (``ENOSPC``: the watch limit; ``EACCES``; ``ENOENT``; …).
    """

    def __init__(self) -> None:
        try:
            self._wm = pyinotify.WatchManager()
        except pyinotify.InotifyBindingNotFoundError as exc:
            raise OSError(errno.ENOSYS, f"no inotify binding: {exc}") from exc
        except OSError as exc:  # inotify_init failed: pyinotify names the errno in its message
            code = exc.errno or _errno_in(str(exc))
            raise OSError(code, os.strerror(code)) from exc
        fd = int(self._wm.get_fd())
        self._fd = fd
        fcntl.fcntl(fd, fcntl.F_SETFD, fcntl.fcntl(fd, fcntl.F_GETFD) | fcntl.FD_CLOEXEC)
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_NONBLOCK)
        self._size = array.array("i", [0])
        self._closed = False

    def fileno(self) -> int:
        return self._fd

    def add(self, path: str, mask: int) -> int:
        """Watch ``path`` with ``mask``; return the watch descriptor.

        The same inode watched twice (two paths, or again) returns the same
        descriptor. A path that cannot be encoded raises :class:`UnicodeEncodeError`.
        """
        try:
            result = self._wm.add_watch(path, mask, quiet=False)
        except pyinotify.WatchManagerError as exc:
            code = _errno_in(str(exc))
            raise OSError(code, os.strerror(code), path) from exc
        wd = int(result.get(path, -1))
        if wd < 0:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL), path)
        return wd

    def remove(self, wd: int) -> None:
        """Stop watch ``wd`` (nothing to do when the kernel already ended it)."""
        self._wm.rm_watch(wd, quiet=True)

    def forget(self, wd: int) -> None:
        """The kernel ended watch ``wd`` (``IN_IGNORED``): drop pyinotify's record of it."""
        if wd in self._wm.watches:
            self._wm.del_watch(wd)

    def queued(self) -> int:
        """The bytes of the records queued now, unread (0: none)."""
        fcntl.ioctl(self._fd, termios.FIONREAD, self._size, True)
        return self._size[0]

    def read(self) -> bytes:
        """Every record queued now (not those that arrive while reading: a flood never ends)."""
        queued = self.queued()
        if queued <= 0:
            return b""
        try:
            return os.read(self._fd, queued)
        except BlockingIOError:
            return b""

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._wm.close()


def route_logs(handler: logging.Handler) -> None:
    """Send pyinotify's own log lines (it prints to stderr by default) to ``handler`` only."""
    logger = logging.getLogger("pyinotify")
    logger.handlers[:] = [handler]
    logger.propagate = False
