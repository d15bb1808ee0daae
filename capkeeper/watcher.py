"""The watch plan, and the watcher that keeps inotify watches on it.

A declared path is turned into a :class:`Route`: every ``(directory, name)`` it
goes through, symlinks resolved the way :func:`capkeeper.files.open_declared`
resolves them. Every directory of every route is watched once (shared between
entries) with :data:`DIRECTORY_MASK`; an event matters to an entry only when
its name is the next component of that entry's route. Events are decoded once
into frozen :class:`WatchEvent` values; the rest of capkeeper never tests
inotify bits.

Facts this relies on (inotify(7)): a watch
on the file itself dies with its inode when the file is renamed over, so only
directories are watched; ``IN_Q_OVERFLOW`` has no watch descriptor, so it can
only be told apart by the instance it arrives on; a watch follows an inode,
not a path, and inotify reports no mounts (a mount over a watched directory
hides the watched inode without any event).

inotify itself is :mod:`capkeeper.inotify` (pyinotify through its public API).
Reading with the plan (:meth:`Watcher.read`) drops events on names no route
goes through by watch descriptor and raw name, before any object is built.
"""

from __future__ import annotations

import errno
import logging
import os
import posixpath
import select
import stat
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import NamedTuple, TypeVar

from capkeeper import inotify
from capkeeper.errors import WatchError
from capkeeper.kernel import inotify_limits
from capkeeper.log import get_logger
from capkeeper.paths import Walk, posixjoin
from capkeeper.trust import open_to_others

# Every directory on a route: replacements (IN_MOVED_TO, IN_CREATE), removals,
# in-place writes (IN_MODIFY: a strip by write raises no IN_ATTRIB), xattr and
# owner changes (IN_ATTRIB), and the directory itself going away. IN_EXCL_UNLINK
# silences unlinked temporary files (.dpkg-tmp).
DIRECTORY_MASK: int = (
    inotify.IN_CLOSE_WRITE
    | inotify.IN_MOVED_TO
    | inotify.IN_MOVED_FROM
    | inotify.IN_CREATE
    | inotify.IN_DELETE
    | inotify.IN_ATTRIB
    | inotify.IN_MODIFY
    | inotify.IN_MOVE_SELF
    | inotify.IN_DELETE_SELF
    | inotify.IN_ONLYDIR
    | inotify.IN_DONT_FOLLOW
    | inotify.IN_EXCL_UNLINK
)

Change = inotify.Change  # what an event says happened (the kernel's IN_* bits)


_KNOWN = 0
for _member in Change:
    _KNOWN |= _member.value
# WatchEvent's predicates test plain ints: an operator on two Change members builds an
# enum member each time (measured: 1.4 µs, against 0.1 µs for int(changes) & bits), and
# an event is tested a dozen times on the way from the kernel to a restore.
_NAMESPACE = int(Change.CREATE | Change.DELETE | Change.MOVED_FROM | Change.MOVED_TO)
_GONE = int(Change.DELETE_SELF | Change.MOVE_SELF | Change.UNMOUNT | Change.IGNORED)
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
_CAUSES = tuple((int(change), f"IN_{change.name}") for change in _CAUSE_ORDER)
_CHANGES: dict[int, Change] = {}  # the Change of each mask seen (at most 2**12), built once


class WatchEvent(NamedTuple):
    """One inotify event, decoded: ``name`` inside the watched ``directory``.

    ``name`` is empty when the event concerns the watched directory itself, and
    ``directory`` is empty for a queue overflow; ``exposed`` tells which
    instance (see :class:`Watcher`) it came from.
    """

    directory: str
    name: str
    changes: Change
    is_dir: bool = False
    exposed: bool = False  # seen on the instance of directories others can write to

    @property
    def path(self) -> str:
        return posixjoin(self.directory, self.name) if self.name else self.directory

    @property
    def is_overflow(self) -> bool:
        """Events were lost: only a full rescan can tell what changed."""
        return bool(int(self.changes) & inotify.IN_Q_OVERFLOW)

    @property
    def is_directory_gone(self) -> bool:
        """The watched directory itself was moved, deleted or unmounted, or its watch ended."""
        return not self.name and bool(int(self.changes) & _GONE)

    @property
    def is_watch_ended(self) -> bool:
        """The kernel dropped this watch (``IN_IGNORED``): the directory must be watched anew."""
        return bool(int(self.changes) & inotify.IN_IGNORED)

    @property
    def is_namespace(self) -> bool:
        """The name now refers to another inode, or to nothing (create, delete, rename)."""
        return bool(int(self.changes) & _NAMESPACE)

    @property
    def is_created(self) -> bool:
        return bool(int(self.changes) & inotify.IN_CREATE)

    @property
    def is_write(self) -> bool:
        """Data was written: a write may still be in progress."""
        return bool(int(self.changes) & inotify.IN_MODIFY)

    @property
    def is_write_closed(self) -> bool:
        """A writer closed the file: its write is complete."""
        return bool(int(self.changes) & inotify.IN_CLOSE_WRITE)

    @property
    def is_attrib(self) -> bool:
        """Metadata changed: an xattr (capabilities), owner, mode or times."""
        return bool(int(self.changes) & inotify.IN_ATTRIB)

    @property
    def cause(self) -> str:
        """The inotify name of the most telling change, e.g. ``IN_MOVED_TO``."""
        changes = int(self.changes)
        for bit, cause in _CAUSES:
            if changes & bit:
                return cause
        return "inotify"


def decode_event(mask: int, name: str, directory: str, *, exposed: bool = False) -> WatchEvent:
    """Decode one raw event of a watch on ``directory`` into a :class:`WatchEvent`."""
    known = mask & _KNOWN
    changes = _CHANGES.get(known)
    if changes is None:
        changes = _CHANGES[known] = Change(known)
    return WatchEvent(directory, name, changes, bool(mask & inotify.IN_ISDIR), exposed)


def parse_events(data: bytes) -> Iterator[tuple[int, int, int, str]]:
    """Split a buffer read from an inotify descriptor into ``(wd, mask, cookie, name)``.

    See :func:`capkeeper.inotify.decode` (this keeps every event).
    """
    for event in inotify.decode(data):
        yield event.wd, event.mask, event.cookie, event.name


# -- the watch plan ---------------------------------------------------------------------


class Link(NamedTuple):
    """One name a route goes through: ``name`` inside ``directory``.

    ``final`` marks the declared binary itself; every other link is a
    directory or a symlink on the way, whose change re-plans the route.
    """

    # A tuple, not a dataclass: a plan of 10,000 entries builds, hashes and
    # compares tens of thousands of these, and a tuple does all three in C.
    directory: str
    name: str
    final: bool


class Route(NamedTuple):
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


def plan_route(
    path: str,
    *,
    lstat: Callable[[str], os.stat_result] = os.lstat,
    readlink: Callable[[str], str] = os.readlink,
) -> Route:
    """Resolve ``path`` component by component, never failing.

    The resolution is :class:`capkeeper.paths.Walk`, the one that
    :func:`capkeeper.files.open_declared` makes over descriptors, here over
    strings with ``lstat`` and ``readlink``. Where a component is missing or not
    a directory, the route ends at the deepest existing directory, watched for
    that name, so its creation is seen.
    """
    walk: Walk[str] = Walk(path, "/")
    links: list[Link] = []
    while (name := walk.next_name()) is not None:
        current = walk.directory[1]
        here = posixjoin(current, name)
        final = walk.last
        try:
            st = lstat(here)
        except OSError as exc:
            links.append(Link(current, name, final))
            if exc.errno in (errno.ENOENT, errno.ENOTDIR):
                return Route(path, tuple(links), complete=final)
            return Route(path, tuple(links), complete=False, problem=_route_problem(exc, current))
        if stat.S_ISLNK(st.st_mode):
            links.append(Link(current, name, False))
            try:
                target = readlink(here)
            except OSError:
                return Route(path, tuple(links), complete=False)
            if not walk.follow(target):  # a loop: the kernel gives ELOOP
                return Route(path, tuple(links), complete=False)
            continue
        links.append(Link(current, name, final))
        if final:
            break
        if not stat.S_ISDIR(st.st_mode):
            return Route(path, tuple(links), complete=False)
        walk.enter(here, here)
    return Route(path, tuple(links), complete=True)


_T = TypeVar("_T")


def _remembered(call: Callable[[str], _T]) -> Callable[[str], _T]:
    """``call`` made once per name: later calls return (or raise) what the first did."""
    found: dict[str, _T | OSError] = {}

    def remembered(name: str) -> _T:
        if name not in found:
            try:
                found[name] = call(name)
            except OSError as exc:
                found[name] = exc
        answer = found[name]
        if isinstance(answer, OSError):
            raise answer
        return answer

    return remembered


# The links of a walk to a directory, and that directory's path.
_Prefix = tuple[tuple[Link, ...], str]
# Names wanted in one directory from which one listing costs less than an lstat each.
_LISTED_FROM = 16
# Paths shorter than this many characters are below PATH_MAX (4096 bytes) even in UTF-8
# (4 bytes a character at most): a listed name needs no lstat to tell ENAMETOOLONG.
_SHORT_PATH = 1000


class _Looks:
    """The file system at one moment, by name: each directory and symlink on the way
    is looked up once (``lstat``, ``readlink``) for every route planned with it, and
    equal links are one object."""

    def __init__(self) -> None:
        self.lstat = _remembered(os.lstat)
        self.readlink = _remembered(os.readlink)
        self._links: dict[Link, Link] = {}
        self.prefixes: dict[str, _Prefix | None] = {}  # parent -> prefix(parent)
        self._listings: dict[str, dict[str, bool] | None] = {}

    def route(self, path: str) -> Route:
        """:func:`plan_route` of ``path``, with these looks."""
        route = plan_route(path, lstat=self.lstat, readlink=self.readlink)
        return Route(route.path, self.shared(route.links), route.complete, route.problem)

    def shared(self, links: Iterable[Link]) -> tuple[Link, ...]:
        return tuple(self._links.setdefault(link, link) for link in links)

    def listing(self, directory: str, wanted: int) -> dict[str, bool] | None:
        """Whether each name in ``directory`` is a symlink, from one listing, when
        ``wanted`` names are to be looked up there and only root can add names to it;
        None when each name is to be looked up on its own.

        A directory others can write to is never listed: anyone could fill it with
        names and make every plan read them all.
        """
        if directory in self._listings:
            return self._listings[directory]
        if wanted < _LISTED_FROM:
            return None
        found = None
        try:
            st = self.lstat(directory)
            if stat.S_ISDIR(st.st_mode) and not open_to_others(st.st_uid, st.st_mode):
                with os.scandir(directory) as entries:
                    # d_type from getdents(2): no lstat per name (DT_UNKNOWN makes one).
                    found = {entry.name: entry.is_symlink() for entry in entries}
                # Reading a directory needs its r bit, looking a name up in it its x
                # bit: an lstat of one listed name proves the lookups would succeed.
                for name in found:
                    os.lstat(posixjoin(directory, name))
                    break
        except OSError:
            found = None
        self._listings[directory] = found
        return found

    def prefix(self, parent: str) -> _Prefix | None:
        """The links of a walk through ``parent`` to the directory it names, and that
        directory; None when ``parent`` does not simply end in a directory."""
        if parent in self.prefixes:
            return self.prefixes[parent]
        found = None
        route = plan_route(parent, lstat=self.lstat, readlink=self.readlink)
        last = route.links[-1] if route.links else None
        if route.complete and not route.problem and last is not None and last.final:
            directory = posixjoin(last.directory, last.name)
            try:
                is_directory = stat.S_ISDIR(self.lstat(directory).st_mode)
            except OSError:
                is_directory = False
            if is_directory:
                # Walked on to a name below it, the last link is an intermediate one.
                walked = (*route.links[:-1], Link(last.directory, last.name, False))
                found = (self.shared(walked), directory)
        self.prefixes[parent] = found
        return found


def _parent_of_names(
    looks: _Looks, parent: str, wanted: int
) -> tuple[tuple[Link, ...], str, str, dict[str, bool] | None] | None:
    """For :func:`plan_routes`: the walk to the directory ``parent`` simply names, that
    directory, it with a ``/`` after it, and its listing for ``wanted`` names; None when
    ``parent`` does not simply name a directory."""
    found = looks.prefix(parent)
    if found is None:
        return None
    links, directory = found
    base = directory + "/" if directory != "/" else "/"
    return links, directory, base, looks.listing(directory, wanted)


def plan_routes(paths: Iterable[str]) -> Iterator[Route]:
    """:func:`plan_route` of each of ``paths``, at one moment: the directories and
    symlinks on the way are looked up once for all of them (thousands of entries
    share a few directories), and equal links are one object.

    A path whose parent simply names a directory needs only to know whether its
    own name is a symlink (then the full plan follows it): its route is the walk
    to that directory and the name, whether the name exists or not. That is one
    ``lstat``, or, for many names in a directory only root can write to, one
    listing of it (:meth:`_Looks.listing`).
    """
    paths = list(paths)
    wanted = Counter(path.rpartition("/")[0] for path in paths)
    looks = _Looks()
    # Per parent, looked up at its first path: the walk to the directory it names, that
    # directory with a "/" after it, and its listing (None: look each name up).
    parents: dict[str, tuple[tuple[Link, ...], str, str, dict[str, bool] | None] | None] = {}
    lstat, is_link = os.lstat, stat.S_ISLNK
    for path in paths:
        parent, _, name = path.rpartition("/")
        if parent and name not in ("", ".", ".."):
            try:
                known = parents[parent]
            except KeyError:
                known = parents[parent] = _parent_of_names(looks, parent, wanted[parent])
            if known is not None:
                links, directory, base, listing = known
                symlink = (
                    listing.get(name)
                    if listing is not None and len(base) + len(name) < _SHORT_PATH
                    else None
                )
                if symlink is None:
                    here = base + name
                    try:
                        symlink = is_link(lstat(here).st_mode)
                    except OSError as exc:
                        final = (*links, Link(directory, name, True))
                        if exc.errno in (errno.ENOENT, errno.ENOTDIR):
                            yield Route(path, final, True)
                        else:
                            yield Route(path, final, False, _route_problem(exc, directory))
                        continue
                if not symlink:
                    yield Route(path, (*links, Link(directory, name, True)), True)
                    continue
        yield looks.route(path)


def plan_directories(paths: Iterable[str]) -> set[str]:
    """The directories on the routes of ``paths`` up to their parents, as far as the
    parents simply name directories: what to watch before planning them (see
    :meth:`capkeeper.keeper.Keeper._replan`)."""
    looks = _Looks()
    found: set[str] = set()
    for parent in {path.rpartition("/")[0] for path in paths}:
        walked = looks.prefix(parent) if parent else None
        if walked is not None:
            found.update(link.directory for link in walked[0])
            found.add(walked[1])
    return found


def _route_problem(exc: OSError, directory: str) -> str:
    if exc.errno == errno.ENAMETOOLONG:
        return (
            f"the path is longer than PATH_MAX ({os.pathconf('/', 'PC_PATH_MAX')} bytes) or "
            f"a name than NAME_MAX below {directory}: inotify cannot watch there, so a "
            "deploy is caught only by the periodic rescan"
        )
    return f"cannot look below {directory}: {exc.strerror or exc}"


def _link_in(links: tuple[Link, ...], directory: str, name: str) -> Link:
    """The link of ``links`` through ``name`` in ``directory`` (the last, as the
    kernel walks, if they pass there twice)."""
    for link in reversed(links):
        if link.name == name and link.directory == directory:
            return link
    raise KeyError((directory, name))


class WatchPlan:
    """Which directories to watch, and which entries each ``(directory, name)`` concerns.

    Routes are replaced one at a time; the directories are kept while some
    route goes through them, so a directory shared by many entries costs one
    watch. A route is indexed in two parts. Its last link (the binary's own
    name, mostly) by directory and name, to the route. The links before it,
    its way, are shared by every route planned below one directory
    (:func:`plan_routes` makes them one tuple): each way is indexed once, by
    the directory and name of each of its links, and knows the paths that
    take it. So ``/`` and ``/var`` hold the few ways through them, not every
    path of the plan again, and installing a route below a known way costs
    two dictionary entries.
    """

    def __init__(self) -> None:
        self._routes: dict[str, Route] = {}
        # last link: directory -> name -> the route, or the routes by path (two paths to it)
        self._ends: dict[str, dict[str, Route | dict[str, Route]]] = {}
        # way (every link but the last) -> the paths that take it
        self._ways: dict[tuple[Link, ...], dict[str, None]] = {}
        # link of a way: directory -> name -> the ways through it
        self._by_way: dict[str, dict[str, dict[tuple[Link, ...], None]]] = {}
        self.version = 0  # changes whenever the index does

    def __len__(self) -> int:
        return len(self._routes)

    def route(self, path: str) -> Route | None:
        return self._routes.get(path)

    @property
    def paths(self) -> frozenset[str]:
        return frozenset(self._routes)

    def directories(self) -> frozenset[str]:
        """Every directory some route goes through."""
        return frozenset(self._ends.keys() | self._by_way.keys())

    def set_route(self, route: Route) -> bool:
        """Install ``route`` for its path; return whether it differs from the previous one."""
        path = route.path
        old = self._routes.get(path)
        if old == route:
            return False
        if old is not None:
            self._unlink(old)
        self._routes[path] = route
        self.version += 1
        if not route.links:
            return True
        way = route.links[:-1]
        takers = self._ways.get(way)
        if takers is None:
            takers = self._ways[way] = {}
            for link in way:
                through = self._by_way.setdefault(link.directory, {})
                through.setdefault(link.name, {})[way] = None
        takers[path] = None
        last = route.links[-1]
        names = self._ends.get(last.directory)
        if names is None:
            names = self._ends[last.directory] = {}
        users = names.get(last.name)
        if users is None:
            names[last.name] = route
        elif isinstance(users, dict):
            users[path] = route
        else:
            names[last.name] = {users.path: users, path: route}
        return True

    def remove(self, path: str) -> None:
        old = self._routes.pop(path, None)
        if old is not None:
            self._unlink(old)
            self.version += 1

    def _unlink(self, route: Route) -> None:
        if not route.links:
            return
        path = route.path
        way = route.links[:-1]
        takers = self._ways.get(way)
        if takers is not None:
            takers.pop(path, None)
            if not takers:
                del self._ways[way]
                for link in way:
                    _forget_way(self._by_way, link, way)
        last = route.links[-1]
        names = self._ends.get(last.directory, {})
        users = names.get(last.name)
        if isinstance(users, dict):
            users.pop(path, None)
            if len(users) == 1:
                names[last.name] = next(iter(users.values()))
        elif users is not None and users.path == path:
            del names[last.name]
            if not names:
                del self._ends[last.directory]

    def _users(self, directory: str, name: str) -> Iterator[tuple[str, Link]]:
        """``(entry, link)`` for each route through ``name`` in ``directory``; a
        route's last link there comes last."""
        for way in self._by_way.get(directory, {}).get(name, ()):
            link = _link_in(way, directory, name)
            for path in self._ways[way]:
                yield path, link
        users = self._ends.get(directory, {}).get(name)
        if isinstance(users, dict):
            for path, route in users.items():
                yield path, route.links[-1]
        elif users is not None:
            yield users.path, users.links[-1]

    def concerns(self, directory: str, name: str) -> bool:
        """Whether some route goes through ``name`` in ``directory``."""
        return name in self._ends.get(directory, ()) or name in self._by_way.get(directory, ())

    def names_in(self, directory: str) -> frozenset[str]:
        """The names inside ``directory`` that some route goes through."""
        return frozenset(
            self._ends.get(directory, {}).keys() | self._by_way.get(directory, {}).keys()
        )

    def lookup(self, directory: str, name: str) -> Mapping[str, Link]:
        """The entries whose route goes through ``name`` in ``directory``, with their link."""
        return dict(self._users(directory, name))

    def through(self, directory: str) -> frozenset[str]:
        """The entries whose route goes through ``directory``."""
        found: set[str] = set()
        for ways in self._by_way.get(directory, {}).values():
            for way in ways:
                found.update(self._ways[way])
        for users in self._ends.get(directory, {}).values():
            if isinstance(users, dict):
                found.update(users)
            else:
                found.add(users.path)
        return frozenset(found)

    def links_in(self, directory: str) -> Iterator[tuple[str, Link]]:
        """Every ``(entry, link)`` whose link is a name inside ``directory``."""
        for name in self.names_in(directory):
            yield from self._users(directory, name)

    def at_or_below(self, point: str) -> set[str]:
        """The entries whose route goes through ``point`` or anything below it."""
        prefix = point.rstrip("/") + "/"
        found: set[str] = set()
        for directory in self.directories():
            if directory == point or directory.startswith(prefix):
                found |= self.through(directory)
        parent, name = posixpath.split(point.rstrip("/") or "/")
        if name:
            found |= self.lookup(parent, name).keys()
        return found


def _forget_way(
    index: dict[str, dict[str, dict[tuple[Link, ...], None]]], link: Link, way: tuple[Link, ...]
) -> None:
    """Take ``way`` out of ``index[link.directory][link.name]``, dropping what is left empty."""
    names = index.get(link.directory)
    ways = None if names is None else names.get(link.name)
    if names is None or ways is None:
        return  # a way through one name twice: already forgotten
    ways.pop(way, None)
    if not ways:
        del names[link.name]
        if not names:
            del index[link.directory]


# -- the watcher ------------------------------------------------------------------------


class WatchFailure(NamedTuple):
    """A directory that could not be watched, with a readable reason."""

    directory: str
    errno: int
    reason: str

    @property
    def vanished(self) -> bool:
        """The directory went away between planning and watching (a race, not a fault)."""
        return self.errno in (errno.ENOENT, errno.ENOTDIR)


def _limit(value: int | None) -> str:
    return "?" if value is None else str(value)


def describe_watch_errno(code: int) -> str:
    """A sentence, with what to do, for an ``inotify_add_watch`` errno."""
    if code == errno.ENOSPC:
        return (
            "the inotify watch limit is reached (fs.inotify.max_user_watches = "
            f"{_limit(inotify_limits().max_user_watches)}); raise it, e.g. "
            "sysctl -w fs.inotify.max_user_watches=524288"
        )
    if code == errno.EMFILE:
        return (
            "too many inotify instances (fs.inotify.max_user_instances = "
            f"{_limit(inotify_limits().max_user_instances)}); raise it or stop other watchers"
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
    inotify.route_logs(_ForwardHandler())


class _ForwardHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        get_logger().debug("pyinotify_message", message=record.getMessage())


class DirectoryIdentity(NamedTuple):
    """A watched directory as it was when its watch was added: its inode and who may write it.

    A watch follows its inode, not the path: once the path leads elsewhere (a
    mount over it or over a parent, an unmount revealing what was hidden, a
    rename) the watch reports on a directory nobody reaches that way any more.
    """

    dev: int
    ino: int
    uid: int
    mode: int

    @classmethod
    def of(cls, st: os.stat_result) -> DirectoryIdentity:
        return cls(st.st_dev, st.st_ino, st.st_uid, st.st_mode)

    @property
    def exposed(self) -> bool:
        """Users other than root can create names here, and so flood its watch."""
        return open_to_others(self.uid, self.mode)


class _Queue:
    """One inotify instance, the directories its watch descriptors stand for, and the
    names wanted in them (for :func:`capkeeper.inotify.decode`)."""

    def __init__(self, *, exposed: bool) -> None:
        try:
            self.instance = inotify.Instance()
        except OSError as exc:
            raise WatchError(
                f"cannot start inotify: {exc.strerror or exc}",
                hint="raise fs.inotify.max_user_instances (now "
                f"{_limit(inotify_limits().max_user_instances)}) or stop other inotify users",
            ) from exc
        self.fd = self.instance.fileno()
        self.exposed = exposed
        self.dirs_by_wd: dict[int, set[str]] = {}
        # wd -> raw names some route goes through in its directories; valid for one
        # (plan, plan version, watches) triple, rebuilt when any of them changes.
        self.names_by_wd: dict[int, frozenset[bytes]] = {}
        self.names_plan: WatchPlan | None = None
        self.names_for = (-1, -1)
        self.generation = 0  # changes whenever dirs_by_wd does

    def wanted(self, plan: WatchPlan) -> Mapping[int, frozenset[bytes]]:
        key = (plan.version, self.generation)
        if self.names_plan is not plan or self.names_for != key:
            self.names_by_wd = {
                wd: inotify.encode_names(name for d in dirs for name in plan.names_in(d))
                for wd, dirs in self.dirs_by_wd.items()
            }
            self.names_plan, self.names_for = plan, key
        return self.names_by_wd


class Watcher:
    """inotify watches on a set of directories with :data:`DIRECTORY_MASK`.

    Directories that users other than root can write to (``/tmp``, ``/var/tmp``,
    a group-writable release directory) are watched on a second inotify
    instance: anyone can flood such a directory with events, and when its
    queue overflows the overflow (which names no watch) concerns only the
    directories of that instance. The trusted instance's queue is untouched
    by the flood. :meth:`fileno` is one descriptor (an epoll set of both) that
    is readable when either has events.
    """

    def __init__(self, *, mask: int = DIRECTORY_MASK) -> None:
        _route_pyinotify_logs()
        self._mask = mask
        trusted = _Queue(exposed=False)
        try:
            exposed = _Queue(exposed=True)
        except WatchError:
            trusted.instance.close()
            raise
        self._queues = (trusted, exposed)
        self._epoll = select.epoll()
        for queue in self._queues:
            self._epoll.register(queue.fd, select.EPOLLIN)
        self._where: dict[str, tuple[_Queue, int]] = {}
        self._identity: dict[str, DirectoryIdentity] = {}
        self._added: dict[str, int] = {}  # directory -> when its watch was added (a serial)
        self.bytes_read = 0  # of records, by the last read(), relevant or not
        self._serial = 0
        self._closed = False

    def fileno(self) -> int:
        """A descriptor that is readable when events are queued on either instance."""
        return self._epoll.fileno()

    def quiet(self) -> bool:
        """Whether no event is queued, unread, on either instance now. The kernel queues an
        event within the system call that makes the change: a change to any watched
        directory made before this call is unread yet or already read."""
        return all(queue.instance.queued() <= 0 for queue in self._queues)

    def inotify_fds(self) -> tuple[int, int]:
        """The trusted and the exposed inotify descriptors."""
        return (self._queues[0].fd, self._queues[1].fd)

    @property
    def directories(self) -> frozenset[str]:
        return frozenset(self._where)

    @property
    def exposed_directories(self) -> frozenset[str]:
        """The watched directories that users other than root can write to."""
        return frozenset(d for d, (queue, _) in self._where.items() if queue.exposed)

    @property
    def watch_count(self) -> int:
        """inotify watches in use (directories reached by two paths share one)."""
        return sum(len(queue.dirs_by_wd) for queue in self._queues)

    def mark(self) -> int:
        """A point in time for :meth:`added_since`."""
        return self._serial

    def added_since(self, mark: int) -> set[str]:
        """The watched directories whose watch was added after ``mark``: a look into one
        of them before then was not watched (a watch dropped and added again counts)."""
        return {directory for directory, serial in self._added.items() if serial > mark}

    def sync(self, wanted: Iterable[str]) -> list[WatchFailure]:
        """Watch exactly ``wanted``: drop the others, add the missing ones, parents first."""
        target = set(wanted)
        for directory in [d for d in self._where if d not in target]:
            self._drop(directory)
        failures = []
        for directory in sorted(target - self._where.keys(), key=_depth_first):
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
        gone = [d for d in self._where if d == path or d.startswith(prefix)]
        for directory in gone:
            self._drop(directory)
        return bool(gone)

    def revalidate(self, directories: Iterable[str] | None = None) -> list[str]:
        """Drop the watches (of ``directories``, default all) that no longer watch their path.

        A directory is stale when its path now reaches another inode (a mount
        over it or over a parent, an unmount, a replacement whose event was
        lost) or its owner or mode changed (which may move it to the other
        instance). One ``lstat`` per directory. Returns the dropped
        directories; :meth:`sync` re-adds those still wanted.
        """
        stale = []
        for directory in list(self._where) if directories is None else directories:
            known = self._identity.get(directory)
            if known is None:
                continue
            try:
                now: DirectoryIdentity | None = DirectoryIdentity.of(os.lstat(directory))
            except (OSError, ValueError):
                now = None
            if now != known:
                stale.append(directory)
                self._drop(directory)
        return stale

    def _add(self, directory: str) -> WatchFailure | None:
        try:
            before = os.lstat(directory)
        except OSError as exc:
            code = exc.errno or errno.EIO
            return WatchFailure(directory, code, describe_watch_errno(code))
        except (UnicodeEncodeError, ValueError):
            return WatchFailure(directory, errno.EINVAL, "the path cannot be encoded")
        if not stat.S_ISDIR(before.st_mode):
            return WatchFailure(directory, errno.ENOTDIR, describe_watch_errno(errno.ENOTDIR))
        identity = DirectoryIdentity.of(before)
        queue = self._queues[identity.exposed]
        try:
            wd = queue.instance.add(directory, self._mask)
        except UnicodeEncodeError:
            return WatchFailure(directory, errno.EINVAL, "the path cannot be encoded")
        except OSError as exc:
            code = exc.errno or errno.EIO
            return WatchFailure(directory, code, describe_watch_errno(code))
        self._where[directory] = (queue, wd)
        self._identity[directory] = identity
        self._serial += 1
        self._added[directory] = self._serial
        queue.dirs_by_wd.setdefault(wd, set()).add(directory)
        queue.generation += 1
        try:
            after: DirectoryIdentity | None = DirectoryIdentity.of(os.lstat(directory))
        except OSError:
            after = None
        if after != identity:
            # Replaced (or mounted over) between the two looks: the watch may be on
            # either inode. Report it vanished, so the routes through it are re-planned.
            self._drop(directory)
            return WatchFailure(directory, errno.ENOENT, "replaced while being watched")
        return None

    def _drop(self, directory: str) -> None:
        self._identity.pop(directory, None)
        self._added.pop(directory, None)
        where = self._where.pop(directory, None)
        if where is None:
            return
        queue, wd = where
        queue.generation += 1
        sharing = queue.dirs_by_wd.get(wd, set())
        sharing.discard(directory)
        if not sharing:
            queue.dirs_by_wd.pop(wd, None)
            # EINVAL when the kernel already ended the watch; nothing to undo then.
            queue.instance.remove(wd)

    def read(
        self, relevant: WatchPlan | Callable[[str, str], bool] | None = None
    ) -> list[WatchEvent]:
        """Read and decode every queued event (call when :meth:`fileno` is readable).

        Events on names inside a watched directory are kept only when they are
        ``relevant``: with a :class:`WatchPlan`, when some route goes through
        that name (decided from the watch descriptor and the raw name, before
        any object is built, so a flood of other names in a shared directory
        costs little); with a function, when ``relevant(directory, name)``.
        Events on the directory itself, ended watches and overflows are always
        returned. A queue that cannot be read is reported as an overflow of
        that queue: the caller then rescans rather than trusting a partial batch.
        """
        events: list[WatchEvent] = []
        self.bytes_read = 0
        for queue in self._queues:
            try:
                data = queue.instance.read()
            except OSError:
                events.append(WatchEvent("", "", Change.Q_OVERFLOW, exposed=queue.exposed))
                continue
            if not data:
                continue
            self.bytes_read += len(data)
            if isinstance(relevant, WatchPlan):
                self._convert(queue, inotify.decode(data, queue.wanted(relevant)), None, events)
            else:
                self._convert(queue, inotify.decode(data), relevant, events)
        return events

    def _convert(
        self,
        queue: _Queue,
        decoded: list[inotify.Event],
        relevant: Callable[[str, str], bool] | None,
        events: list[WatchEvent],
    ) -> None:
        dirs_by_wd = queue.dirs_by_wd
        for event in decoded:
            if event.is_overflow:
                events.append(WatchEvent("", "", Change.Q_OVERFLOW, exposed=queue.exposed))
                continue
            wd, name = event.wd, event.name
            directories = dirs_by_wd.get(wd)
            if not directories:
                continue  # a watch we dropped; its last events are stale
            if event.is_ignored:
                dirs_by_wd.pop(wd, None)
                queue.generation += 1
                queue.instance.forget(wd)
                for directory in directories:
                    self._where.pop(directory, None)
                    self._identity.pop(directory, None)
                    self._added.pop(directory, None)
            elif name and relevant is not None and not any(relevant(d, name) for d in directories):
                continue
            events.extend(
                decode_event(event.mask, name, d, exposed=queue.exposed)
                for d in sorted(directories)
            )

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._epoll.close()
            for queue in self._queues:
                queue.instance.close()

    def __enter__(self) -> Watcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _depth_first(directory: str) -> tuple[int, str]:
    return (0 if directory == "/" else directory.count("/"), directory)
