"""Safe, fd-pinned observation and writing of ``security.capability``.

The declared path is walked one component at a time from ``/`` with
``O_NOFOLLOW`` and ``dir_fd``, recording who owns every directory and symlink
on the way, so that :mod:`capkeeper.trust` can judge the exact route the
kernel would take. The final file is opened with ``O_NOFOLLOW`` and the same
descriptor is then inspected (ELF magic, hash) and written, so a concurrent
rename cannot redirect the write to another inode.

This is also the one module that touches extended attributes: the ``xattr``
package to write and remove through a descriptor, ``os.getxattr`` to read
(through the descriptor, or by name in :func:`caps_at`'s walk over many files)
and ``os.listxattr`` (C calls, about twice as fast as the package's cffi ones:
every observation reads the value). Every call goes through the four
``_*xattr`` functions below, and every errno through one policy, as in borg's
``xattr.py``: ENOTSUP/EOPNOTSUPP means the file system has no extended
attributes at all (not "no capabilities"); ENODATA means there is none, or it
went away since it was listed; EINVAL and EOVERFLOW mean a value is there that
the kernel will not return (:data:`REFUSED`); E2BIG, ERANGE, ENOSPC, EDQUOT,
EPERM, EACCES and EROFS become sentences with a hint (:func:`file_error`).
"""

from __future__ import annotations

import errno
import functools
import os
import stat
import struct
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, NamedTuple

import xattr

from capkeeper.capabilities import CapSet, decode, encode
from capkeeper.elf import BLOCK as ELF_BLOCK
from capkeeper.elf import EIClass, EIData, ElfError, ElfFacts, ParseMemo, facts_weight, parse
from capkeeper.errors import CapabilitiesNotKept, FileAccessError, InvalidCapabilityData
from capkeeper.interpreters import MARKER_SYMBOLS
from capkeeper.model import Hop, Kind, Observation
from capkeeper.paths import FD_CALLS, FdCalls, Walk, posixjoin

XATTR_NAME = "security.capability"
NO_XATTR = (
    "the file system does not support extended attributes, so it cannot keep "
    "security.capability (hint: keep managed binaries on ext4, xfs, btrfs or tmpfs)"
)
_DIR_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_PATH_FLAGS = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
_LIST_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


XATTR_UNSUPPORTED = frozenset({errno.ENOTSUP, errno.EOPNOTSUPP})
"""The errnos of a file system without extended attributes (the same number on Linux)."""

REFUSED = {
    # getxattr(2) of security.capability goes through cap_inode_getsecurity, which
    # refuses v1 and malformed values (EINVAL) and a v3 value whose rootid is not
    # mapped in the caller's user namespace (EOVERFLOW); exec still honours them.
    errno.EINVAL: "present but unreadable (legacy v1 or malformed value)",
    errno.EOVERFLOW: "present but owned by another user namespace (v3 rootid not mapped)",
}
"""Why a ``security.capability`` value is present but cannot be read, by errno."""

_HINTS = {
    errno.EPERM: "run as root or grant CAP_SETFCAP (the file may also be immutable)",
    errno.EACCES: "capkeeper needs search permission on every directory and read access",
    errno.EROFS: "the file system is read-only here; under ProtectSystem=strict list the "
    "directory in ReadWritePaths= (capkeeper systemd-dropin writes it)",
    errno.EOPNOTSUPP: "this file system does not support extended attributes",
    errno.ENOENT: "the file does not exist",
    errno.ELOOP: "too many symlinks, or a symlink where none may be",
    errno.ENOTDIR: "a component of the path is not a directory",
    errno.E2BIG: "the value is larger than this file system allows for one attribute",
    errno.ERANGE: "an attribute name, value or list is too large for the kernel",
    # ext4 keeps a file's extended attributes in its inode and one block: ENOSPC there
    # can mean that space is full even when the disk is not.
    errno.ENOSPC: "the file system is full, or the file's other extended attributes "
    "fill the space kept for them",
    errno.EDQUOT: "the owner's disk quota is exhausted",
}


def file_error(exc: OSError, path: str, action: str) -> FileAccessError:
    """The one sentence, with a hint, for an OS error while doing ``action`` on ``path``
    (``"read security.capability"``, ``"list attributes"``, ``"open"``...)."""
    code = exc.errno
    reason = exc.strerror or (os.strerror(code) if code is not None else str(exc))
    if code in XATTR_UNSUPPORTED:
        reason = "extended attributes not supported"
    return FileAccessError(
        f"cannot {action}: {reason}", context=path, hint=_HINTS.get(code or 0), errno=code
    )


# -- the only calls of extended attributes -----------------------------------------------


def _getxattr(target: int | str, *, follow_symlinks: bool = False) -> bytes:
    """``security.capability`` of a descriptor (fgetxattr) or of a name (getxattr, or
    lgetxattr without ``follow_symlinks``)."""
    if isinstance(target, int):
        # fgetxattr(2); follow_symlinks cannot be given with a descriptor (ValueError).
        return os.getxattr(target, XATTR_NAME)
    return os.getxattr(target, XATTR_NAME, follow_symlinks=follow_symlinks)


def _setxattr(fd: int, value: bytes) -> None:
    xattr.xattr(fd).set(XATTR_NAME, value)


def _removexattr(fd: int) -> None:
    xattr.xattr(fd).remove(XATTR_NAME)


def _listxattr(name: str) -> list[str]:
    """llistxattr(2): the attribute names of ``name``, a final symlink not followed."""
    return os.listxattr(name, follow_symlinks=False)


class RawCaps(NamedTuple):
    """A ``security.capability`` value as read, before decoding."""

    value: bytes | None  # None: present, but the kernel refused to return it
    error: int = 0  # then a key of REFUSED (EINVAL or EOVERFLOW)

    def decode(self) -> tuple[CapSet | None, str | None]:
        """``(caps, None)``, or ``(None, problem)`` when the value cannot be read."""
        if self.value is None:
            return None, REFUSED.get(self.error, REFUSED[errno.EINVAL])
        return _decoded(self.value)


@functools.lru_cache(maxsize=256)
def _decoded(value: bytes) -> tuple[CapSet | None, str | None]:
    """:meth:`RawCaps.decode` of a value, remembered: thousands of files carry the same few."""
    try:
        return decode(value), None
    except InvalidCapabilityData as exc:
        return None, exc.message


def _raw(target: int | str, *, follow_symlinks: bool = False) -> RawCaps | None:
    """The raw value of ``target``; None when it has none (ENODATA).

    Raises :class:`OSError` for every other errno, ENOTSUP and ENOENT included.
    """
    try:
        return RawCaps(_getxattr(target, follow_symlinks=follow_symlinks))
    except OSError as exc:
        if exc.errno == errno.ENODATA:
            return None
        if exc.errno in REFUSED:
            return RawCaps(None, exc.errno)
        raise


_NOTHING_THERE = XATTR_UNSUPPORTED | {errno.ENODATA, errno.ENOENT}


def caps_at(name: str) -> RawCaps | None:
    """The ``security.capability`` of ``name`` for a walk over many files.

    ``name`` is absolute or relative to the working directory (a walker that
    ``fchdir``s into each directory passes one component); a final symlink is
    not followed. ``listxattr`` first, the value only when it is listed: most
    files carry no attribute at all, as ``getcap -r`` does. None when the file
    has none, its file system has no extended attributes, or it went away
    (ENOENT, ENODATA) since the directory was read.

    Raises :class:`FileAccessError` for anything else: its ``message`` is
    ``cannot list attributes: ...`` or ``cannot read security.capability: ...``.
    """
    try:
        names = _listxattr(name)
    except OSError as exc:
        if exc.errno in _NOTHING_THERE:
            return None
        raise file_error(exc, name, "list attributes") from exc
    if XATTR_NAME not in names:
        return None
    try:
        return _raw(name)
    except OSError as exc:
        if exc.errno in _NOTHING_THERE:
            return None  # removed since it was listed
        raise file_error(exc, name, f"read {XATTR_NAME}") from exc


REPLACED = "replaced while opening"
"""The reason given when the file changed between the walk and the open."""


class Walked(NamedTuple):
    """A directory a walk reached: its device and inode, its resolved path, its route."""

    dev: int
    ino: int
    resolved: str
    hops: tuple[Hop, ...]


class Walks:
    """The directories walks reached, remembered beyond one batch of walks (:class:`Pins`'s
    ``walked``), bounded by their weight (:func:`_route_weight`: the text of every hop's
    path and symlink target). A route heavier than :data:`_WALK_BYTES` is not
    remembered, and all routes together weigh at most :data:`_WALKS_BYTES`: past it,
    they are forgotten. Real routes weigh a few hundred bytes; one through a directory
    of another user's can be stretched by that user, with symlinks of 4 kB targets, to
    tens of thousands of hops."""

    def __init__(self) -> None:
        self._walked: dict[str, tuple[Walked, int]] = {}
        self._weight = 0

    def __contains__(self, parent: str) -> bool:
        return parent in self._walked

    def __len__(self) -> int:
        return len(self._walked)

    def pop(self, parent: str) -> Walked:
        walked, weight = self._walked.pop(parent)
        self._weight -= weight
        return walked

    def add(self, parent: str, walked: Walked) -> None:
        if parent in self._walked:
            self.pop(parent)
        if len(walked.hops) > _WALK_BYTES // _HOP_BYTES:  # heavier whatever its text
            return
        weight = _route_weight(parent, walked)
        if weight > _WALK_BYTES:
            return
        if self._weight + weight > _WALKS_BYTES:
            self.clear()
        self._walked[parent] = (walked, weight)
        self._weight += weight

    def clear(self) -> None:
        self._walked.clear()
        self._weight = 0


_HOP_BYTES = 128  # about what a Hop weighs beyond its text
_WALK_BYTES = 8 << 10  # the heaviest route remembered (real ones: a few hundred bytes)
_WALKS_BYTES = 512 << 10  # all remembered routes together


def _route_weight(parent: str, walked: Walked) -> int:
    """About the bytes a remembered route holds: its hops, their paths and targets."""
    text = len(parent) + len(walked.resolved)
    return text + sum(_HOP_BYTES + len(hop.path) + len(hop.target) for hop in walked.hops)


class Pins:
    """Directories reached by one batch of walks, kept open for the next entries in them.

    A batch (the daemon's full reconcile) opens thousands of declared files in
    a few directories: walking each from ``/`` costs about five system calls
    per path component. The first walk to a declared path's directory pins it
    (a duplicate ``O_PATH`` descriptor and the route to it); a later entry of
    the batch declared in the same directory (the same text before its last
    ``/``) starts there. Its final name is still looked up and opened with
    ``O_NOFOLLOW`` relative to that pinned descriptor, and the directory's own
    owner and mode are read again (``fstat``) at every use; only the ancestors
    are as they were when pinned. A final name that is a symlink, ``..`` or
    missing walks from ``/`` as usual. At most ``limit`` directories stay open
    (the least recently used is closed). :meth:`close` releases them all.

    ``walked`` (the daemon's, kept from one batch to the next) remembers each
    pinned directory without a descriptor: a later batch opens it again by its
    resolved path (``O_NOFOLLOW``) and pins it only if that reaches the very
    directory walked (device and inode), with the route found then, and only if
    ``unchanged()`` says nothing changed since: the daemon forgets every walk at
    any event on a route, and ``unchanged`` says that no event is queued yet
    unread (a change made after the daemon read its events). Otherwise the
    entry walks from ``/``, and so do the batch's later ones. The directory's own
    owner and mode are read again at every use all the same.
    """

    def __init__(
        self,
        *,
        limit: int = 64,
        calls: FdCalls = FD_CALLS,
        walked: Walks | None = None,
        unchanged: Callable[[], bool] | None = None,
    ) -> None:
        self._limit = limit
        self._calls = calls
        self._pinned: dict[str, tuple[int, str, tuple[Hop, ...]]] = {}
        self._walked = walked
        self._unchanged = unchanged

    def __enter__(self) -> Pins:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def get(self, parent: str) -> tuple[int, str, tuple[Hop, ...]] | None:
        """The descriptor, resolved path and route of the directory ``parent`` names."""
        pinned = self._pinned.pop(parent, None)
        if pinned is not None:
            self._pinned[parent] = pinned  # most recently used last
        elif self._walked is not None and parent in self._walked:
            pinned = self._reopen(parent, self._walked)
        return pinned

    def _reopen(self, parent: str, walked: Walks) -> tuple[int, str, tuple[Hop, ...]] | None:
        """Pin ``parent`` again from what an earlier batch walked; None: walk anew."""
        known = walked.pop(parent)
        try:
            fd = self._calls.open(known.resolved, _DIR_FLAGS)
        except (OSError, ValueError):
            return None
        try:
            here = self._calls.fstat(fd)
            if (here.st_dev, here.st_ino) != (known.dev, known.ino):
                return None
            # After the open: a route change made before it is queued by now.
            if self._unchanged is not None and not self._unchanged():
                self._walked = None  # this batch walks from "/" from now on
                return None
            self.pin(parent, fd, known.resolved, list(known.hops), here)
        except OSError:
            return None
        finally:
            self._calls.close(fd)
        return self._pinned.get(parent)

    def pin(
        self,
        parent: str,
        fd: int,
        resolved: str,
        hops: list[Hop],
        st: os.stat_result | None = None,
    ) -> None:
        """Keep a duplicate of ``fd``, the directory ``parent`` reached by ``hops``
        (``st`` its fstat, if taken)."""
        if parent in self._pinned:
            return
        if len(self._pinned) >= self._limit:
            oldest = next(iter(self._pinned))
            self._calls.close(self._pinned.pop(oldest)[0])
        route = tuple(hops)
        self._pinned[parent] = (os.dup(fd), resolved, route)
        if self._walked is not None:
            here = st if st is not None else self._calls.fstat(fd)
            self._walked.add(parent, Walked(here.st_dev, here.st_ino, resolved, route))

    def close(self) -> None:
        while self._pinned:
            self._calls.close(self._pinned.popitem()[1][0])


def _split(path: str) -> tuple[str, str]:
    """The text before the last ``/`` of ``path`` and its final name ("" when none)."""
    parent, _, name = path.rstrip("/").rpartition("/")
    if name in ("", ".", "..") or path.endswith("/"):
        return "", ""
    return parent or "/", name


@contextmanager
def open_declared(
    path: str,
    *,
    directory: bool = False,
    calls: FdCalls = FD_CALLS,
    pins: Pins | None = None,
) -> Iterator[tuple[int, list[Hop], str]]:
    """Walk ``path`` safely and yield ``(fd, hops, resolved)`` for its final file.

    The walk is :class:`capkeeper.paths.Walk` over descriptors: every directory
    is opened with ``O_NOFOLLOW`` relative to the one before, so no name is
    resolved twice. ``hops`` is the route to the final component (not the
    component itself). With ``directory`` the final component must be a
    directory, opened for reading (listing); otherwise a regular file is opened
    for reading and anything else with ``O_PATH``. ``calls`` are the system
    calls (tests inject races there). With ``pins``, the walk starts at the
    directory an earlier walk of the same batch pinned (see :class:`Pins`).

    Raises :class:`FileAccessError` (``errno`` ENOENT when the file is missing,
    EAGAIN with :data:`REPLACED` when it was replaced between walk and open).
    """
    fd, hops, resolved, _ = _open(path, calls=calls, pins=pins, directory=directory)
    try:
        yield fd, list(hops), resolved
    finally:
        calls.close(fd)


_Opened = tuple[int, Sequence[Hop], str, os.stat_result]
"""The final file of a walk: its descriptor, the route to it, where it is, its fstat."""


def _open(path: str, *, calls: FdCalls, pins: Pins | None, directory: bool) -> _Opened:
    """The walk of :func:`open_declared`, its directories closed once the file is open."""
    walk: Walk[int] | None = None
    try:
        opened = _from_pin(path, pins, calls, directory=directory)
        if opened is None:
            walk = Walk(path, calls.open("/", _DIR_FLAGS), release=calls.close)
            opened = _walk(path, walk, calls, directory=directory, pins=pins)
    except OSError as exc:
        raise file_error(exc, path, "open") from exc
    finally:
        if walk is not None:
            walk.close()
    return opened


def _from_pin(path: str, pins: Pins | None, calls: FdCalls, *, directory: bool) -> _Opened | None:
    """The final file opened from a pinned directory; None: walk from ``/`` instead."""
    if pins is None:
        return None
    parent, name = _split(path)
    pinned = pins.get(parent) if name else None
    if pinned is None:
        return None
    dir_fd, dir_path, route = pinned
    try:
        st = calls.stat(name, dir_fd=dir_fd)
    except FileNotFoundError:
        return None  # said by the full walk, with the route as it is now
    if stat.S_ISLNK(st.st_mode):
        return None
    here = calls.fstat(dir_fd)
    last = route[-1]
    hops: Sequence[Hop] = route
    if (here.st_uid, here.st_mode) != (last.uid, last.mode):
        hops = (*route[:-1], Hop(last.path, here.st_uid, here.st_mode))
    # Unchanged: the pinned route itself, one object for the whole directory, whose
    # verdict trust.route_refusals then remembers by identity.
    return _open_final(path, name, st, (dir_fd, dir_path), hops, calls=calls, directory=directory)


def _walk(
    path: str, walk: Walk[int], calls: FdCalls, *, directory: bool, pins: Pins | None = None
) -> _Opened:
    """The walk of :func:`open_declared`; directory descriptors are left to ``walk``."""
    st = calls.fstat(walk.directory[0])
    hops = [Hop("/", st.st_uid, st.st_mode)]
    parent = _split(path)[0] if pins is not None else ""
    while (name := walk.next_name()) is not None:
        dir_fd, dir_path = walk.directory
        if pins is not None and parent and walk.last:
            # The first name with nothing after it is the declared final name: the
            # directory it is looked up in is the one its parent text names. Pin it
            # only when the route's last hop is that very directory, entered: after a
            # symlink to ".", ".." or "/" the last hop is the symlink, and a later
            # entry judged on a route ending in the directory would lose it.
            last = hops[-1]
            if not last.is_symlink and last.path == dir_path:
                pins.pin(parent, dir_fd, dir_path, hops)
            parent = ""
        here = posixjoin(dir_path, name)
        st = calls.stat(name, dir_fd=dir_fd)
        if stat.S_ISLNK(st.st_mode):
            target = calls.readlink(name, dir_fd=dir_fd)
            hops.append(Hop(here, st.st_uid, st.st_mode, is_symlink=True, target=target))
            if not walk.follow(target):
                raise OSError(errno.ELOOP, os.strerror(errno.ELOOP))
            continue
        if not walk.last:  # an intermediate component must be a directory
            sub = calls.open(name, _DIR_FLAGS, dir_fd=dir_fd)
            walk.enter(sub, here)
            st = calls.fstat(sub)
            hops.append(Hop(here, st.st_uid, st.st_mode))
            continue
        where = (dir_fd, dir_path)
        return _open_final(path, name, st, where, hops, calls=calls, directory=directory)
    raise OSError(errno.EISDIR, os.strerror(errno.EISDIR))


def _open_final(
    path: str,
    name: str,
    st: os.stat_result,
    where: tuple[int, str],
    hops: Sequence[Hop],
    *,
    calls: FdCalls,
    directory: bool,
) -> _Opened:
    """Open the final ``name`` (not a symlink, ``st`` its lstat) in the directory
    ``where`` (descriptor, resolved path)."""
    dir_fd, dir_path = where
    # Only regular files are opened for reading: opening a device or FIFO can have
    # side effects. O_PATH suffices to describe anything else.
    flags = _FILE_FLAGS if stat.S_ISREG(st.st_mode) else _PATH_FLAGS
    if directory:
        flags = _LIST_FLAGS
    fd = calls.open(name, flags, dir_fd=dir_fd)
    opened = calls.fstat(fd)
    if (opened.st_ino, opened.st_dev) != (st.st_ino, st.st_dev):
        calls.close(fd)
        raise FileAccessError(
            f"{REPLACED}: it changed between the walk and the open; "
            "the next event or retry looks again",
            context=path,
            errno=errno.EAGAIN,
        )
    return fd, hops, posixjoin(dir_path, name), opened


def read_caps(fd: int) -> tuple[CapSet | None, str | None]:
    """The capabilities on ``fd``: ``(caps, None)``, ``(None, None)`` when absent,
    or ``(None, problem)`` when a value is present but cannot be read.

    Raises :class:`OSError` otherwise, ENOTSUP included (a file system
    without extended attributes cannot keep capabilities at all)."""
    raw = _raw(fd)
    return (None, None) if raw is None else raw.decode()


_SHEBANG_BYTES = 256  # of a script's first line, the interpreter shown in a refusal


def _kind(fd: int, mode: int) -> tuple[Kind, str, bytes]:
    """The kind of file ``fd`` is, a script's interpreter line, and the first block of a
    regular file: the ELF inspection starts from it instead of reading it again."""
    if not stat.S_ISREG(mode):
        return Kind.NOT_REGULAR, "", b""
    head = os.pread(fd, ELF_BLOCK, 0)
    if head.startswith(b"\x7fELF"):
        return Kind.ELF, "", head
    if head.startswith(b"#!"):
        line = head[2:_SHEBANG_BYTES].split(b"\n", 1)[0].strip()
        return Kind.SCRIPT, line.decode("utf-8", "replace"), head
    return Kind.OTHER, "", head


def read_at_most(fd: int, limit: int) -> bytes | None:
    """The whole content of ``fd`` from its offset, or None when it holds more than
    ``limit`` bytes. Raises :class:`OSError`."""
    chunks: list[bytes] = []
    size = 0
    # The file may grow after any fstat: never read more than the limit allows.
    while size <= limit and (chunk := os.read(fd, min(1 << 20, limit + 1 - size))):
        chunks.append(chunk)
        size += len(chunk)
    return None if size > limit else b"".join(chunks)


def sha256_of(fd: int) -> str:
    # Imported here: loading OpenSSL's libcrypto costs a few ms, and only pinned
    # entries (sha256 = ...) and adopt hash a file.
    import hashlib  # noqa: PLC0415

    digest = hashlib.sha256()
    offset = 0
    while chunk := os.pread(fd, 1 << 20, offset):
        digest.update(chunk)
        offset += len(chunk)
    return digest.hexdigest()


# dev, ino, size, mtime_ns, ctime_ns packed: 73 bytes a file instead of ~210 as a tuple.
_ELF_KEY = struct.Struct("=QQqqq")
_UNKNOWN: Any = object()  # not in the cache (its values include None)
_IDENTITY = 32  # the bytes of the key without ctime
_ELF_CACHE_SIZE = 1 << 15
# The most the distinct facts may weigh (see elf.facts_weight). The names an ELF file lists
# are its author's to choose: 128 DT_NEEDED names of 255 bytes weigh 40 kB a file,
# and anyone who can rewrite a file on a declared path makes new facts at each
# write. 10,000 real binaries weigh about 3 MB.
_ELF_CACHE_BYTES = 16 << 20


class _ElfCache:
    """The :class:`ElfFacts` of files already inspected, keyed by what any change of
    their content moves: device, inode, size, mtime and ctime.

    A write moves mtime and ctime; setting mtime back (``utimensat``) moves ctime,
    which no system call sets back, and only a trusted owner may do either to a
    file we would grant capabilities to. Since Linux 6.13 (multigrain timestamps)
    a ctime that was read is never reused by the next change; before, a change
    in the same clock tick as a read could keep it, which needs the owner's
    write anyway. Our own ``setxattr`` moves ctime too: :func:`write_caps`
    carries the facts over to the new ctime when nothing else changed
    (:meth:`carry`). Equal facts are shared, so thousands of copies of one
    binary cost one :class:`ElfFacts`. Both the number of files and the weight of
    the distinct facts are bounded: past either, it starts afresh.
    """

    def __init__(self, size: int = _ELF_CACHE_SIZE, weight: int = _ELF_CACHE_BYTES) -> None:
        self._size = size
        self._max_weight = weight
        self._weight = 0  # of the facts in _shared
        self._facts: dict[bytes, ElfFacts | None] = {}
        self._shared: dict[ElfFacts, ElfFacts] = {}
        self.changed = False  # anything learnt or carried since export() or restore()
        # Facts another process saved (restore()), moved to _facts when a file asks for
        # them; what is left when they are exported is stale and dropped.
        self._restored: dict[bytes, ElfFacts | None] = {}

    @staticmethod
    def key(st: os.stat_result) -> bytes:
        return _ELF_KEY.pack(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)

    def known(self, st: os.stat_result) -> tuple[bool, ElfFacts | None]:
        """``(True, facts)`` when the file whose fstat is ``st`` was inspected already
        (facts None: ELF magic, but not readable ELF), else ``(False, None)``.

        Only files whose first bytes are the ELF magic are inspected, so a known key
        also says that the file is ELF: its content is the one inspected then.
        """
        key = self.key(st)
        facts = self._facts.get(key, _UNKNOWN)
        if facts is not _UNKNOWN:
            return True, facts
        if key in self._restored:  # a warm start: each file's first look, no exception
            changed, facts = self.changed, self._restored.pop(key)
            self._remember(key, facts)
            self.changed = changed  # known already: nothing new to save
            return True, facts
        return False, None

    def learn(self, fd: int, st: os.stat_result, head: bytes | None = None) -> ElfFacts | None:
        """Inspect the ELF file ``fd`` whose fstat is ``st`` (:meth:`known` did not know
        it) and remember its facts; ``head`` as for :func:`inspect_fd`."""
        key = self.key(st)
        facts = inspect_fd(fd, MARKER_SYMBOLS, head=head)
        if facts is not None:
            facts = self._share(facts)
        self._remember(key, facts)
        return facts

    def _share(self, facts: ElfFacts) -> ElfFacts:
        known = self._shared.get(facts)
        if known is not None:
            return known
        self._weight += facts_weight(facts)
        if self._weight > self._max_weight:
            self._facts.clear()
            self._shared.clear()
            self._weight = facts_weight(facts)
        self._shared[facts] = facts
        return facts

    def carry(self, before: os.stat_result, after: os.stat_result) -> None:
        """The file went from ``before`` to ``after`` by our own ``setxattr`` alone."""
        old = self.key(before)
        if old not in self._facts or old[:_IDENTITY] != self.key(after)[:_IDENTITY]:
            return
        self._remember(self.key(after), self._facts.pop(old))

    def _remember(self, key: bytes, facts: ElfFacts | None) -> None:
        if len(self._facts) >= self._size:
            self._facts.clear()
            self._shared.clear()
            self._weight = 0
        self._facts[key] = facts
        self.changed = True

    def export(self) -> dict[str, object]:
        """Every fact with its key, as JSON types (for :mod:`capkeeper.cache`): the distinct
        facts once, the keys as one hexadecimal string, and each key's index of facts."""
        index: dict[ElfFacts, int] = {}
        numbers: list[int | None] = []
        for facts in self._facts.values():
            numbers.append(None if facts is None else index.setdefault(facts, len(index)))
        self.changed = False
        self._restored.clear()  # not asked for since they were restored: stale
        return {
            "symbols": list(MARKER_SYMBOLS),
            "facts": [_facts_row(facts) for facts in index],
            "keys": b"".join(self._facts).hex(),
            "of": numbers,
        }

    def restore(self, data: object) -> int:
        """Take the facts :meth:`export` gave (another process's, read back from the cache);
        the number of files restored. Anything malformed restores nothing, and nothing
        beyond this cache's bound is taken. A restored fact is used when a file with its
        key asks for it; the others are dropped at the next :meth:`export`."""
        try:
            facts, rows = _checked_export(data, self._size)
        except (TypeError, ValueError):
            return 0
        shared: dict[ElfFacts, ElfFacts] = {}
        self._restored = {
            key: None if number is None else shared.setdefault(facts[number], facts[number])
            for key, number in rows
        }
        return len(rows)

    def absorb(self, data: object) -> int:
        """Take, beside what this cache knows, the facts another process of ours learnt
        (a start-up helper's :meth:`export`); the number of files taken. Anything
        malformed takes nothing."""
        try:
            facts, rows = _checked_export(data, self._size)
        except (TypeError, ValueError):
            return 0
        known = self._facts
        fresh = [(key, number) for key, number in rows if key not in known]
        used = {number for _, number in fresh if number is not None}
        shared = {number: self._share(facts[number]) for number in used}  # once each
        for key, number in fresh:
            self._remember(key, None if number is None else shared[number])
        return len(fresh)

    @property
    def stale(self) -> bool:
        """Whether an :meth:`export` now would drop restored facts nobody asked for."""
        return bool(self._restored)


def _facts_row(facts: ElfFacts) -> list[object]:
    return [
        int(facts.elf_class),
        int(facts.data),
        facts.type,
        facts.machine,
        facts.interp,
        facts.dynamic,
        list(facts.needed),
        facts.soname,
        sorted(facts.exports),
    ]


def _checked(value: object, *kinds: type) -> Any:
    # Exact types: JSON's true is no number here, nor 1 a boolean.
    if type(value) not in kinds:
        raise TypeError(value)
    return value


def _names(value: object) -> tuple[str, ...]:
    return tuple(_checked(name, str) for name in _checked(value, list))


def _facts_of(row: object) -> ElfFacts:
    """An :class:`ElfFacts` from :func:`_facts_row`'s list; TypeError or ValueError if not."""
    fields = _checked(row, list)
    if len(fields) != 9:
        raise ValueError(row)
    elf_class, data, kind, machine, interp, dynamic, needed, soname, exports = fields
    names = _names(exports)
    if not set(names) <= set(MARKER_SYMBOLS):
        raise ValueError(exports)
    return ElfFacts(
        elf_class=EIClass(_checked(elf_class, int)),
        data=EIData(_checked(data, int)),
        type=_checked(kind, int),
        machine=_checked(machine, int),
        interp=_checked(interp, str, type(None)),
        dynamic=_checked(dynamic, bool),
        needed=_names(needed),
        soname=_checked(soname, str, type(None)),
        exports=frozenset(names),
    )


def _checked_export(
    data: object, size: int
) -> tuple[list[ElfFacts], list[tuple[bytes, int | None]]]:
    """The facts and ``(key, index)`` rows of an :meth:`_ElfCache.export`; TypeError or
    ValueError for anything else (other marker symbols, a bad key or index, too many)."""
    document = _checked(data, dict)
    if document.get("symbols") != list(MARKER_SYMBOLS):
        raise ValueError("looked up other symbols")
    facts = [_facts_of(row) for row in _checked(document.get("facts"), list)]
    keys = bytes.fromhex(_checked(document.get("keys"), str))
    numbers = _checked(document.get("of"), list)
    if len(numbers) > size or len(keys) != len(numbers) * _ELF_KEY.size:
        raise ValueError("keys and indexes disagree, or more than the cache holds")
    rows: list[tuple[bytes, int | None]] = []
    for offset, number in zip(range(0, len(keys), _ELF_KEY.size), numbers, strict=True):
        if number is not None and not 0 <= _checked(number, int) < len(facts):
            raise ValueError(number)
        rows.append((keys[offset : offset + _ELF_KEY.size], number))
    return facts, rows


_ELF_CACHE = _ElfCache()


def export_elf_facts() -> dict[str, object] | None:
    """The ELF facts learnt so far, as JSON types; None when nothing changed since the
    last export or restore (nothing learnt, carried, or left unused of what was restored)."""
    return _ELF_CACHE.export() if _ELF_CACHE.changed or _ELF_CACHE.stale else None


def restore_elf_facts(data: object) -> int:
    """Take the facts of :func:`export_elf_facts` (read back from a trusted cache); the
    number of files restored, 0 when ``data`` is malformed in any way."""
    return _ELF_CACHE.restore(data)


def absorb_elf_facts(data: object) -> int:
    """Take, beside those learnt here, the facts of another process's
    :func:`export_elf_facts` (a start-up helper's); the number of files taken."""
    return 0 if data is None else _ELF_CACHE.absorb(data)


def observe_fd(path: str, fd: int, hops: list[Hop], resolved: str, *, hash: bool) -> Observation:
    """Gather the :class:`Observation` of an already opened file."""
    try:
        st = os.fstat(fd)
    except OSError as exc:
        raise file_error(exc, path, "read") from exc
    return _observe(path, fd, hops=hops, resolved=resolved, st=st, hash=hash)


def observe_declared(path: str, *, hash: bool, pins: Pins | None = None) -> tuple[int, Observation]:
    """Open ``path`` as :func:`open_declared` does and observe it: ``(fd, observation)``.

    The caller closes ``fd`` (it is closed here when the observation fails).
    The fstat taken right after the open, to tell a file replaced between the
    walk and the open, is the one the observation starts from. Raises
    :class:`FileAccessError` like :func:`open_declared` and :func:`observe_fd`.
    """
    fd, hops, resolved, st = _open(path, calls=FD_CALLS, pins=pins, directory=False)
    try:
        return fd, _observe(path, fd, hops=hops, resolved=resolved, st=st, hash=hash)
    except BaseException:
        FD_CALLS.close(fd)
        raise


def _observe(
    path: str, fd: int, *, hops: Sequence[Hop], resolved: str, st: os.stat_result, hash: bool
) -> Observation:
    """The :class:`Observation` of ``fd``, reached by ``hops`` at ``resolved``, whose
    fstat after the open is ``st``."""
    try:
        known, elf = _ELF_CACHE.known(st) if stat.S_ISREG(st.st_mode) else (False, None)
        if known:  # inspected already, with this very content: ELF
            kind, interpreter = Kind.ELF, ""
        else:
            kind, interpreter, head = _kind(fd, st.st_mode)
            elf = _ELF_CACHE.learn(fd, st, head) if kind is Kind.ELF else None
        regular = kind is not Kind.NOT_REGULAR
        caps, problem, supported = None, None, True
        if regular:
            try:
                caps, problem = read_caps(fd)
            except OSError as exc:
                if exc.errno not in XATTR_UNSUPPORTED:
                    raise
                supported = False
        # Size and mtime once more, after the capabilities: write(2) strips them before
        # it updates mtime (file_modified(): remove privs, then update time), so a strip
        # read here comes with the new mtime unless both reads fall between those two.
        after = os.fstat(fd)
        digest = sha256_of(fd) if hash and regular else None
    except OSError as exc:
        raise file_error(exc, path, "read") from exc
    return Observation(
        path=path,
        resolved=resolved,
        hops=tuple(hops),
        uid=st.st_uid,
        gid=st.st_gid,
        mode=st.st_mode,
        dev=st.st_dev,
        ino=st.st_ino,
        kind=kind,
        interpreter=interpreter,
        caps=caps,
        caps_problem=problem,
        sha256=digest,
        nlink=st.st_nlink,
        size=after.st_size,
        mtime_ns=after.st_mtime_ns,
        xattr_supported=supported,
        elf=elf,
    )


def observe(path: str, *, hash: bool = False) -> Observation:
    """Observe ``path`` without changing anything."""
    with open_declared(path) as (fd, hops, resolved):
        return observe_fd(path, fd, hops, resolved, hash=hash)


def write_caps(fd: int, caps: CapSet, *, path: str) -> None:
    """Write ``caps`` on ``fd`` and read them back.

    A file system that accepts the write but does not keep the value is
    reported as such.
    """
    try:
        before = os.fstat(fd)
        _setxattr(fd, encode(caps))
        found, problem = read_caps(fd)
        _ELF_CACHE.carry(before, os.fstat(fd))
    except OSError as exc:
        raise file_error(exc, path, "write security.capability") from exc
    if found != caps:
        raise CapabilitiesNotKept(
            "the file system did not keep security.capability "
            f"(read back {problem or ('nothing' if found is None else 'a different value')})",
            context=path,
            hint="use a file system with xattr support (ext4, xfs, btrfs, tmpfs)",
        )


def remove_caps(fd: int, *, path: str) -> None:
    """Remove ``security.capability`` from ``fd`` (absent already is fine)."""
    try:
        _removexattr(fd)
    except OSError as exc:
        if exc.errno != errno.ENODATA:
            raise file_error(exc, path, "remove security.capability") from exc


def read_path_caps(path: str) -> tuple[CapSet | None, bytes | None]:
    """Read the raw value like ``getcap`` does (following symlinks); ``(None, None)``
    when there is none or the file system has no extended attributes."""
    try:
        value = _getxattr(path, follow_symlinks=True)
    except OSError as exc:
        if exc.errno == errno.ENODATA or exc.errno in XATTR_UNSUPPORTED:
            return None, None
        raise file_error(exc, path, "get capabilities") from exc
    return decode(value), value


# Copies of one binary (each deploy's new inode, a ctime anyone's setxattr moved) are
# recognised from the blocks the parser reads, without parsing (elf.ParseMemo).
_PARSED = ParseMemo(MARKER_SYMBOLS)


def inspect_fd(
    fd: int, symbols: Collection[str] = (), *, head: bytes | None = None
) -> ElfFacts | None:
    """:func:`capkeeper.elf.parse` over an open file with ``os.pread``; ``None`` when not
    readable ELF. With :data:`MARKER_SYMBOLS`, through the memo :data:`_PARSED`.
    ``head``: what ``os.pread(fd, ELF_BLOCK, 0)`` returned already, used for that read.

    An ``OSError`` of the reads propagates (it is about the file, not its content).
    """

    def read(offset: int, size: int) -> bytes:
        if offset == 0 and size == ELF_BLOCK and head is not None:
            return head
        return os.pread(fd, size, offset)

    try:
        if symbols is MARKER_SYMBOLS:
            return _PARSED.parse(read)
        return parse(read, symbols)
    except ElfError:
        return None


# -- the reads of the audit walk (scan.py), over the calls above ----------------------------


def caps_of_value(value: bytes | None, refused: int) -> tuple[CapSet | None, str | None]:
    """Decode a raw ``security.capability`` value: ``(caps, None)``, or ``(None, problem)``
    when it is malformed or the kernel refused it with errno ``refused`` (``value`` None)."""
    return RawCaps(value, refused).decode()


def list_xattr_names(name: str) -> list[str]:
    """The extended attribute names of ``name`` (relative to the working directory, a
    symlink not followed), as ``getcap -r`` lists them; empty when the file has none,
    its file system keeps none, or it is gone. Raises :class:`OSError` otherwise."""
    try:
        return _listxattr(name)
    except OSError as exc:
        if exc.errno in _NOTHING_THERE:
            return []
        raise


def read_caps_value(name: str) -> tuple[bytes | None, int]:
    """The raw ``security.capability`` value of ``name`` (a symlink not followed):
    ``(value, 0)``; ``(None, errno)`` when it is present but the kernel refuses to return
    it (a key of :data:`REFUSED`); ``(None, 0)`` when it is absent or the file is
    gone. Raises :class:`OSError` otherwise."""
    try:
        raw = _raw(name)
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            return None, 0
        raise
    return (None, 0) if raw is None else (raw.value, raw.error)
