"""inotify for the daemon: the watch plan, typed events, overflow and failed watches.

The only module that imports pyinotify. A declared path is turned into a
:class:`Route`: every ``(directory, name)`` it goes through, symlinks resolved
the way :func:`capkeeper.files.open_declared` resolves them. Every directory
of every route is watched once (shared between entries) with
:data:`DIRECTORY_MASK`; an event matters to an entry only when its name is the
next component of that entry's route. Events are decoded once into frozen
:class:`WatchEvent` values; the rest of capkeeper never tests inotify bits.

Facts this relies on (inotify(7); shared/reference.md 4.2 and 7.1): a watch
on the file itself dies with its inode when the file is renamed over, so only
directories are watched; ``IN_Q_OVERFLOW`` has no watch descriptor and reaches
pyinotify's ``default_proc_fun`` only; pyinotify reports a failed watch as a
negative descriptor; a watch follows an inode, not a path.
"""

from __future__ import annotations

import array
import errno
import fcntl
import logging
import os
import stat
import struct
import termios
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from enum import IntFlag
from typing import Any

import pyinotify
import structlog

from capkeeper.errors import CapkeeperError
from capkeeper.files import posixjoin

# Every directory on a route: replacements (IN_MOVED_TO, IN_CREATE), removals,
# in-place writes (IN_MODIFY: a strip by write raises no IN_ATTRIB), xattr and
# owner changes (IN_ATTRIB), and the directory itself going away. IN_EXCL_UNLINK
# silences unlinked temporary files (.dpkg-tmp).
DIRECTORY_MASK: int = (
    pyinotify.IN_CLOSE_WRITE
    | pyinotify.IN_MOVED_TO
    | pyinotify.IN_MOVED_FROM
    | pyinotify.IN_CREATE
    | pyinotify.IN_DELETE
    | pyinotify.IN_ATTRIB
    | pyinotify.IN_MODIFY
    | pyinotify.IN_MOVE_SELF
    | pyinotify.IN_DELETE_SELF
    | pyinotify.IN_ONLYDIR
    | pyinotify.IN_DONT_FOLLOW
    | pyinotify.IN_EXCL_UNLINK
)

_MAX_SYMLINKS = 40  # the kernel's MAXSYMLINKS, as in files.open_declared
_HEADER = struct.Struct("iIII")  # struct inotify_event: wd, mask, cookie, len


class Change(IntFlag):
    """What an event says happened; the values are the kernel's ``IN_*`` bits."""

    MODIFY = pyinotify.IN_MODIFY
    ATTRIB = pyinotify.IN_ATTRIB
    CLOSE_WRITE = pyinotify.IN_CLOSE_WRITE
    MOVED_FROM = pyinotify.IN_MOVED_FROM
    MOVED_TO = pyinotify.IN_MOVED_TO
    CREATE = pyinotify.IN_CREATE
    DELETE = pyinotify.IN_DELETE
    DELETE_SELF = pyinotify.IN_DELETE_SELF
    MOVE_SELF = pyinotify.IN_MOVE_SELF
    UNMOUNT = pyinotify.IN_UNMOUNT
    Q_OVERFLOW = pyinotify.IN_Q_OVERFLOW
    IGNORED = pyinotify.IN_IGNORED


_KNOWN = 0
for _member in Change:
    _KNOWN |= _member.value
_NAMESPACE = Change.CREATE | Change.DELETE | Change.MOVED_FROM | Change.MOVED_TO
_GONE = Change.DELETE_SELF | Change.MOVE_SELF | Change.UNMOUNT | Change.IGNORED
# The order in which a combined event names its cause: the most telling first.
_CAUSE_ORDER = (
    Change.Q_OVERFLOW,
    Change.MOVED_TO,
    Change.MOVED_FROM,
    Change.DELETE,
    Change.CREATE,
    Change.CLOSE_WRITE,
    Change.MODIFY,
    Change.ATTRIB,
    Change.DELETE_SELF,
    Change.MOVE_SELF,
    Change.UNMOUNT,
    Change.IGNORED,
)


@dataclass(frozen=True, slots=True)
class WatchEvent:
    """One inotify event, decoded: ``name`` inside the watched ``directory``.

    ``name`` is empty when the event concerns the watched directory itself, and
    ``directory`` is empty for a queue overflow.
    """

    directory: str
    name: str
    changes: Change
    is_dir: bool = False

    @property
    def path(self) -> str:
        return posixjoin(self.directory, self.name) if self.name else self.directory

    @property
    def is_overflow(self) -> bool:
        """Events were lost: only a full rescan can tell what changed."""
        return bool(self.changes & Change.Q_OVERFLOW)

    @property
    def is_directory_gone(self) -> bool:
        """The watched directory itself was moved, deleted or unmounted, or its watch ended."""
        return not self.name and bool(self.changes & _GONE)

    @property
    def is_watch_ended(self) -> bool:
        """The kernel dropped this watch (``IN_IGNORED``): the directory must be watched anew."""
        return bool(self.changes & Change.IGNORED)

    @property
    def is_namespace(self) -> bool:
        """The name now refers to another inode, or to nothing (create, delete, rename)."""
        return bool(self.changes & _NAMESPACE)

    @property
    def is_created(self) -> bool:
        return bool(self.changes & Change.CREATE)

    @property
    def is_write(self) -> bool:
        """Data was written: a write may still be in progress."""
        return bool(self.changes & Change.MODIFY)

    @property
    def is_write_closed(self) -> bool:
        """A writer closed the file: its write is complete."""
        return bool(self.changes & Change.CLOSE_WRITE)

    @property
    def is_attrib(self) -> bool:
        """Metadata changed: an xattr (capabilities), owner, mode or times."""
        return bool(self.changes & Change.ATTRIB)

    @property
    def cause(self) -> str:
        """The inotify name of the most telling change, e.g. ``IN_MOVED_TO``."""
        for change in _CAUSE_ORDER:
            if self.changes & change:
                return f"IN_{change.name}"
        return "inotify"


def decode_event(mask: int, name: str, directory: str) -> WatchEvent:
    """Decode one raw event of a watch on ``directory`` into a :class:`WatchEvent`."""
    return WatchEvent(directory, name, Change(mask & _KNOWN), bool(mask & pyinotify.IN_ISDIR))


def parse_events(data: bytes) -> Iterator[tuple[int, int, int, str]]:
    """Split a buffer read from an inotify descriptor into ``(wd, mask, cookie, name)``.

    Names are decoded like every path in Python (``os.fsdecode``), so a
    non-UTF-8 file name in a watched directory cannot break the stream (it
    would with pyinotify's own strict ``bytes.decode()``).
    """
    offset = 0
    while offset + _HEADER.size <= len(data):
        wd, mask, cookie, length = _HEADER.unpack_from(data, offset)
        offset += _HEADER.size
        raw = data[offset : offset + length].split(b"\0", 1)[0]
        offset += length
        yield wd, mask, cookie, os.fsdecode(raw)


# -- the watch plan ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Link:
    """One name a route goes through: ``name`` inside ``directory``.

    ``final`` marks the declared binary itself; every other link is a
    directory or a symlink on the way, whose change re-plans the route.
    """

    directory: str
    name: str
    final: bool


@dataclass(frozen=True)
class Route:
    """Where a declared path leads today, as the kernel would resolve it."""

    path: str
    links: tuple[Link, ...]
    complete: bool  # every directory exists; the binary itself may still be missing
    problem: str = ""  # why the route cannot be followed to its end (not "missing")

    @property
    def directories(self) -> tuple[str, ...]:
        seen: dict[str, None] = {}
        for link in self.links:
            seen.setdefault(link.directory)
        return tuple(seen)


def _components(path: str) -> list[str]:
    return [part for part in path.split("/") if part not in ("", ".")]


def plan_route(
    path: str,
    *,
    lstat: Callable[[str], os.stat_result] = os.lstat,
    readlink: Callable[[str], str] = os.readlink,
) -> Route:
    """Resolve ``path`` component by component, never failing.

    Symlinks are followed as :func:`capkeeper.files.open_declared` follows
    them (an absolute target restarts at ``/``). Where a component is missing
    or not a directory, the route ends at the deepest existing directory,
    watched for that name, so its creation is seen.
    """
    todo = _components(path)
    current = "/"
    links: list[Link] = []
    symlinks = 0
    while todo:
        name = todo.pop(0)
        if name == "..":
            current = os.path.dirname(current) or "/"
            continue
        here = posixjoin(current, name)
        try:
            st = lstat(here)
        except OSError as exc:
            links.append(Link(current, name, final=not todo))
            if exc.errno in (errno.ENOENT, errno.ENOTDIR):
                return Route(path, tuple(links), complete=not todo)
            return Route(path, tuple(links), complete=False, problem=_route_problem(exc, current))
        if stat.S_ISLNK(st.st_mode):
            links.append(Link(current, name, final=False))
            symlinks += 1
            try:
                target = readlink(here)
            except OSError:
                return Route(path, tuple(links), complete=False)
            if symlinks > _MAX_SYMLINKS:
                return Route(path, tuple(links), complete=False)
            if target.startswith("/"):
                current = "/"
            todo[:0] = _components(target)
            continue
        links.append(Link(current, name, final=not todo))
        if not todo:
            break
        if not stat.S_ISDIR(st.st_mode):
            return Route(path, tuple(links), complete=False)
        current = here
    return Route(path, tuple(links), complete=True)


def _route_problem(exc: OSError, directory: str) -> str:
    if exc.errno == errno.ENAMETOOLONG:
        return (
            f"the path is longer than PATH_MAX ({os.pathconf('/', 'PC_PATH_MAX')} bytes) or "
            f"a name than NAME_MAX below {directory}: inotify cannot watch there, so a "
            "deploy is caught only by the periodic rescan"
        )
    return f"cannot look below {directory}: {exc.strerror or exc}"


class WatchPlan:
    """Which directories to watch, and which entries each ``(directory, name)`` concerns.

    Routes are replaced one at a time; the directories are reference counted,
    so a directory shared by many entries costs one watch.
    """

    def __init__(self) -> None:
        self._routes: dict[str, Route] = {}
        self._index: dict[tuple[str, str], dict[str, Link]] = {}
        self._through: dict[str, set[str]] = {}

    def __len__(self) -> int:
        return len(self._routes)

    def route(self, path: str) -> Route | None:
        return self._routes.get(path)

    @property
    def paths(self) -> frozenset[str]:
        return frozenset(self._routes)

    def directories(self) -> frozenset[str]:
        """Every directory some route goes through."""
        return frozenset(self._through)

    def set_route(self, route: Route) -> bool:
        """Install ``route`` for its path; return whether it differs from the previous one."""
        old = self._routes.get(route.path)
        if old == route:
            return False
        if old is not None:
            self._unlink(old)
        self._routes[route.path] = route
        for link in route.links:
            self._index.setdefault((link.directory, link.name), {})[route.path] = link
            self._through.setdefault(link.directory, set()).add(route.path)
        return True

    def remove(self, path: str) -> None:
        old = self._routes.pop(path, None)
        if old is not None:
            self._unlink(old)

    def _unlink(self, route: Route) -> None:
        for link in route.links:
            key = (link.directory, link.name)
            users = self._index.get(key)
            if users is not None:
                users.pop(route.path, None)
                if not users:
                    del self._index[key]
            through = self._through.get(link.directory)
            if through is not None:
                through.discard(route.path)
                if not through:
                    del self._through[link.directory]

    def lookup(self, directory: str, name: str) -> Mapping[str, Link]:
        """The entries whose route goes through ``name`` in ``directory``, with their link."""
        return self._index.get((directory, name), {})

    def through(self, directory: str) -> frozenset[str]:
        """The entries whose route goes through ``directory``."""
        return frozenset(self._through.get(directory, ()))


# -- the watcher ------------------------------------------------------------------------


class WatchError(CapkeeperError):
    """inotify itself cannot be used (no instance, no binding)."""


@dataclass(frozen=True)
class WatchFailure:
    """A directory that could not be watched, with a readable reason."""

    directory: str
    errno: int
    reason: str

    @property
    def vanished(self) -> bool:
        """The directory went away between planning and watching (a race, not a fault)."""
        return self.errno in (errno.ENOENT, errno.ENOTDIR)


def _read_limit(name: str) -> str:
    try:
        with open(f"/proc/sys/fs/inotify/{name}", encoding="ascii") as handle:
            return handle.read().strip()
    except OSError:
        return "?"


def describe_watch_errno(code: int) -> str:
    """A sentence, with what to do, for an ``inotify_add_watch`` errno."""
    if code == errno.ENOSPC:
        return (
            "the inotify watch limit is reached (fs.inotify.max_user_watches = "
            f"{_read_limit('max_user_watches')}); raise it, e.g. "
            "sysctl -w fs.inotify.max_user_watches=524288"
        )
    if code == errno.EMFILE:
        return (
            "too many inotify instances (fs.inotify.max_user_instances = "
            f"{_read_limit('max_user_instances')}); raise it or stop other watchers"
        )
    if code == errno.EACCES:
        return "permission denied: capkeeper needs read access to the directory"
    if code == errno.ENOENT:
        return "the directory no longer exists"
    if code == errno.ENOTDIR:
        return "not a directory (any more)"
    return os.strerror(code)


def _route_pyinotify_logs() -> None:
    """Send pyinotify's own log lines (it prints to stderr by default) to ours, at debug.

    capkeeper keeps its own directory per watch descriptor, so pyinotify's
    path-tracking complaints are noise; failed watches are reported by
    :meth:`Watcher.sync` instead.
    """
    logger = logging.getLogger("pyinotify")
    logger.handlers[:] = [_ForwardHandler()]
    logger.propagate = False


class _ForwardHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        structlog.get_logger("capkeeper").debug("pyinotify_message", message=record.getMessage())


class _Collector(pyinotify.ProcessEvent):  # type: ignore[misc]
    """The ``default_proc_fun``: every event, ``IN_Q_OVERFLOW`` included, lands here.

    pyinotify hands an overflow only to the notifier's default function (it has
    no watch descriptor), so no per-watch ``proc_fun`` is ever installed.
    """

    def my_init(self, *, sink: Callable[[int, int, str], None]) -> None:
        self._sink = sink

    def __call__(self, event: Any) -> None:
        self._sink(getattr(event, "wd", -1), int(event.mask), getattr(event, "name", "") or "")


class _Notifier(pyinotify.Notifier):  # type: ignore[misc]
    """pyinotify's notifier, reading with :func:`parse_events` (fsdecoded names)."""

    def read_events(self) -> None:
        size = array.array("i", [0])
        fcntl.ioctl(self._fd, termios.FIONREAD, size, True)
        if size[0] <= 0:
            return
        data = os.read(self._fd, size[0])
        for wd, mask, cookie, name in parse_events(data):
            self._eventq.append(pyinotify._RawEvent(wd, mask, cookie, name))


class Watcher:
    """One inotify instance watching a set of directories with :data:`DIRECTORY_MASK`."""

    def __init__(self, *, mask: int = DIRECTORY_MASK) -> None:
        _route_pyinotify_logs()
        try:
            self._wm = pyinotify.WatchManager()
        except (OSError, pyinotify.InotifyBindingNotFoundError) as exc:
            raise WatchError(
                f"cannot start inotify: {exc}",
                hint="raise fs.inotify.max_user_instances (now "
                f"{_read_limit('max_user_instances')}) or stop other inotify users",
            ) from exc
        fd = self._wm.get_fd()
        fcntl.fcntl(fd, fcntl.F_SETFD, fcntl.fcntl(fd, fcntl.F_GETFD) | fcntl.FD_CLOEXEC)
        self._mask = mask
        self._raw: list[tuple[int, int, str]] = []
        self._notifier = _Notifier(
            self._wm, default_proc_fun=_Collector(sink=lambda *raw: self._raw.append(raw))
        )
        self._wd_by_dir: dict[str, int] = {}
        self._dirs_by_wd: dict[int, set[str]] = {}
        self._closed = False

    def fileno(self) -> int:
        """The inotify descriptor, readable when events are queued."""
        return int(self._wm.get_fd())

    @property
    def directories(self) -> frozenset[str]:
        return frozenset(self._wd_by_dir)

    @property
    def watch_count(self) -> int:
        """inotify watches in use (directories reached by two paths share one)."""
        return len(self._dirs_by_wd)

    def sync(self, wanted: Iterable[str]) -> list[WatchFailure]:
        """Watch exactly ``wanted``: drop the others, add the missing ones, parents first."""
        target = set(wanted)
        for directory in [d for d in self._wd_by_dir if d not in target]:
            self._drop(directory)
        failures = []
        for directory in sorted(target - self._wd_by_dir.keys(), key=_depth_first):
            failure = self._add(directory)
            if failure is not None:
                failures.append(failure)
        return failures

    def invalidate(self, path: str) -> bool:
        """Forget the watches on ``path`` and below: those inodes left that path.

        A watch follows its inode, so after a rename the directory now found at
        ``path`` must be watched anew; :meth:`sync` re-adds what is still wanted.
        """
        prefix = path.rstrip("/") + "/"
        gone = [d for d in self._wd_by_dir if d == path or d.startswith(prefix)]
        for directory in gone:
            self._drop(directory)
        return bool(gone)

    def _add(self, directory: str) -> WatchFailure | None:
        try:
            result = self._wm.add_watch(directory, self._mask, quiet=True)
            wd = int(result.get(directory, -1))
        except UnicodeEncodeError:
            return WatchFailure(directory, errno.EINVAL, "the path cannot be encoded")
        if wd < 0:
            code = self._wm._inotify_wrapper.get_errno() or errno.EIO
            return WatchFailure(directory, code, describe_watch_errno(code))
        self._wd_by_dir[directory] = wd
        self._dirs_by_wd.setdefault(wd, set()).add(directory)
        return None

    def _drop(self, directory: str) -> None:
        wd = self._wd_by_dir.pop(directory, None)
        if wd is None:
            return
        sharing = self._dirs_by_wd.get(wd, set())
        sharing.discard(directory)
        if not sharing:
            self._dirs_by_wd.pop(wd, None)
            # EINVAL when the kernel already ended the watch; nothing to undo then.
            self._wm.rm_watch(wd, quiet=True)

    def read(self) -> list[WatchEvent]:
        """Read and decode every queued event (call when :meth:`fileno` is readable).

        An event pyinotify cannot dispatch is reported as an overflow: the
        caller then rescans everything rather than trusting a partial batch.
        """
        try:
            self._notifier.read_events()
            self._notifier.process_events()
        except (pyinotify.ProcessEventError, pyinotify.NotifierError, OSError):
            self._raw.clear()
            return [WatchEvent("", "", Change.Q_OVERFLOW)]
        raw, self._raw = self._raw, []
        events: list[WatchEvent] = []
        for wd, mask, name in raw:
            if mask & pyinotify.IN_Q_OVERFLOW:
                events.append(decode_event(mask, "", ""))
                continue
            directories = self._dirs_by_wd.get(wd)
            if not directories:
                continue  # a watch we dropped; its last events are stale
            if mask & pyinotify.IN_IGNORED:
                self._dirs_by_wd.pop(wd, None)
                for directory in directories:
                    self._wd_by_dir.pop(directory, None)
            events.extend(decode_event(mask, name, d) for d in sorted(directories))
        return events

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._notifier.stop()

    def __enter__(self) -> Watcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _depth_first(directory: str) -> tuple[int, str]:
    return (0 if directory == "/" else directory.count("/"), directory)
