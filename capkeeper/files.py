"""Safe, fd-pinned observation and writing of ``security.capability``.

The declared path is walked one component at a time from ``/`` with
``O_NOFOLLOW`` and ``dir_fd``, recording who owns every directory and symlink
on the way, so that :mod:`capkeeper.trust` can judge the exact route the
kernel would take. The final file is opened with ``O_NOFOLLOW`` and the same
descriptor is then inspected (ELF magic, hash) and written, so a concurrent
rename cannot redirect the write to another inode.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from collections.abc import Collection, Iterator
from contextlib import contextmanager

import xattr

from capkeeper.capabilities import CapSet, decode, encode
from capkeeper.elf import ElfError, ElfFacts, parse
from capkeeper.errors import CapabilitiesNotKept, FileAccessError, InvalidCapabilityData
from capkeeper.interpreters import MARKER_SYMBOLS
from capkeeper.model import Hop, Kind, Observation

XATTR_NAME = "security.capability"
NO_XATTR = (
    "the file system does not support extended attributes, so it cannot keep "
    "security.capability (hint: keep managed binaries on ext4, xfs, btrfs or tmpfs)"
)
_MAX_SYMLINKS = 40  # the kernel's MAXSYMLINKS
_DIR_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_PATH_FLAGS = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
_LIST_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _oserror(exc: OSError, path: str, action: str) -> FileAccessError:
    """Turn an OS error into a sentence with a hint."""
    code = exc.errno
    hints = {
        errno.EPERM: "run as root or grant CAP_SETFCAP (the file may also be immutable)",
        errno.EACCES: "capkeeper needs search permission on every directory and read access",
        errno.EROFS: "the file system is read-only here; under ProtectSystem=strict list the "
        "directory in ReadWritePaths= (capkeeper systemd-dropin writes it)",
        errno.EOPNOTSUPP: "this file system does not support extended attributes",
        errno.ENOENT: "the file does not exist",
        errno.ELOOP: "too many symlinks, or a symlink where none may be",
        errno.ENOTDIR: "a component of the path is not a directory",
    }
    reason = os.strerror(code) if code is not None else str(exc)
    if code == errno.EOPNOTSUPP:
        reason = "extended attributes not supported"
    return FileAccessError(
        f"cannot {action}: {reason}", context=path, hint=hints.get(code or 0), errno=code
    )


def _split(path: str) -> list[str]:
    return [part for part in path.split("/") if part not in ("", ".")]


REPLACED = "replaced while opening"
"""The reason given when the file changed between the walk and the open."""


@contextmanager
def open_declared(path: str, *, directory: bool = False) -> Iterator[tuple[int, list[Hop], str]]:
    """Walk ``path`` safely and yield ``(fd, hops, resolved)`` for its final file.

    ``hops`` is the route to the final component (not the component itself).
    With ``directory`` the final component must be a directory, opened for
    reading (listing); otherwise a regular file is opened for reading and
    anything else with ``O_PATH``.

    Raises :class:`FileAccessError` (``errno`` ENOENT when the file is missing,
    EAGAIN with :data:`REPLACED` when it was replaced between walk and open).
    """
    stack: list[tuple[int, str]] = []  # (fd, path) of directories, "/" first
    fd: int | None = None
    try:
        try:
            fd, hops, resolved = _walk(path, stack, directory=directory)
        except OSError as exc:
            raise _oserror(exc, path, "open") from exc
        # Outside the try above: an error of the caller's is not an error opening.
        yield fd, hops, resolved
    finally:
        if fd is not None:
            os.close(fd)
        for dir_fd, _ in stack:
            os.close(dir_fd)


def _walk(
    path: str, stack: list[tuple[int, str]], *, directory: bool
) -> tuple[int, list[Hop], str]:
    """The walk of :func:`open_declared`; directory descriptors are left on ``stack``."""
    hops: list[Hop] = []
    root = os.open("/", _DIR_FLAGS)
    stack.append((root, "/"))
    st = os.fstat(root)
    hops.append(Hop("/", st.st_uid, st.st_mode))
    todo = _split(path)
    links = 0
    while todo:
        name = todo.pop(0)
        dir_fd, dir_path = stack[-1]
        if name == "..":
            if len(stack) > 1:
                os.close(stack.pop()[0])
            continue
        here = posixjoin(dir_path, name)
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        if stat.S_ISLNK(st.st_mode):
            links += 1
            if links > _MAX_SYMLINKS:
                raise OSError(errno.ELOOP, os.strerror(errno.ELOOP))
            target = os.readlink(name, dir_fd=dir_fd)
            hops.append(Hop(here, st.st_uid, st.st_mode, is_symlink=True, target=target))
            if target.startswith("/"):
                while len(stack) > 1:
                    os.close(stack.pop()[0])
            todo[:0] = _split(target)
            continue
        if todo:  # an intermediate component must be a directory
            sub = os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
            stack.append((sub, here))
            st = os.fstat(sub)
            hops.append(Hop(here, st.st_uid, st.st_mode))
            continue
        if directory:
            flags = _LIST_FLAGS
        else:
            # Only regular files are opened for reading: opening a device or FIFO
            # can have side effects. O_PATH suffices to describe anything else.
            flags = _FILE_FLAGS if stat.S_ISREG(st.st_mode) else _PATH_FLAGS
        fd = os.open(name, flags, dir_fd=dir_fd)
        opened = os.fstat(fd)
        if (opened.st_ino, opened.st_dev) != (st.st_ino, st.st_dev):
            os.close(fd)
            raise FileAccessError(
                f"{REPLACED}: it changed between the walk and the open; "
                "the next event or retry looks again",
                context=path,
                errno=errno.EAGAIN,
            )
        return fd, hops, here
    raise OSError(errno.EISDIR, os.strerror(errno.EISDIR))


def posixjoin(directory: str, name: str) -> str:
    return f"/{name}" if directory == "/" else f"{directory}/{name}"


def read_caps(fd: int) -> tuple[CapSet | None, str | None]:
    """The capabilities on ``fd``: ``(caps, None)``, ``(None, None)`` when absent,
    or ``(None, problem)`` when a value is present but cannot be read.

    Raises :class:`OSError` otherwise, EOPNOTSUPP included (a file system
    without extended attributes cannot keep capabilities at all)."""
    try:
        value = xattr.xattr(fd).get(XATTR_NAME)
    except OSError as exc:
        if exc.errno == errno.ENODATA:
            return None, None
        if exc.errno in UNREADABLE_CAPS:
            return caps_of_value(None, exc.errno)
        raise  # EOPNOTSUPP included: no extended attributes at all is not "no capabilities"
    return caps_of_value(bytes(value), 0)


def _kind(fd: int, mode: int) -> tuple[Kind, str]:
    if not stat.S_ISREG(mode):
        return Kind.NOT_REGULAR, ""
    head = os.pread(fd, 256, 0)
    if head.startswith(b"\x7fELF"):
        return Kind.ELF, ""
    if head.startswith(b"#!"):
        line = head[2:].split(b"\n", 1)[0].strip()
        return Kind.SCRIPT, line.decode("utf-8", "replace")
    return Kind.OTHER, ""


def sha256_of(fd: int) -> str:
    digest = hashlib.sha256()
    offset = 0
    while chunk := os.pread(fd, 1 << 20, offset):
        digest.update(chunk)
        offset += len(chunk)
    return digest.hexdigest()


def observe_fd(path: str, fd: int, hops: list[Hop], resolved: str, *, hash: bool) -> Observation:
    """Gather the :class:`Observation` of an already opened file."""
    try:
        st = os.fstat(fd)
        kind, interpreter = _kind(fd, st.st_mode)
        elf = inspect_fd(fd, MARKER_SYMBOLS) if kind is Kind.ELF else None
        regular = kind is not Kind.NOT_REGULAR
        caps, problem, supported = None, None, True
        if regular:
            try:
                caps, problem = read_caps(fd)
            except OSError as exc:
                if exc.errno != errno.EOPNOTSUPP:
                    raise
                supported = False
        # Size and mtime once more, after the capabilities: write(2) strips them before
        # it updates mtime (file_modified(): remove privs, then update time), so a strip
        # read here comes with the new mtime unless both reads fall between those two.
        after = os.fstat(fd)
        digest = sha256_of(fd) if hash and regular else None
    except OSError as exc:
        raise _oserror(exc, path, "read") from exc
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
        xattr.xattr(fd).set(XATTR_NAME, encode(caps))
        found, problem = read_caps(fd)
    except OSError as exc:
        raise _oserror(exc, path, "write security.capability") from exc
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
        xattr.xattr(fd).remove(XATTR_NAME)
    except OSError as exc:
        if exc.errno != errno.ENODATA:
            raise _oserror(exc, path, "remove security.capability") from exc


def read_path_caps(path: str) -> tuple[CapSet | None, bytes | None]:
    """Read the raw value like ``getcap`` does (following symlinks)."""
    try:
        value = os.getxattr(path, XATTR_NAME)
    except OSError as exc:
        if exc.errno in (errno.ENODATA, errno.EOPNOTSUPP):
            return None, None
        raise _oserror(exc, path, "get capabilities") from exc
    return decode(value), value


def inspect_fd(fd: int, symbols: Collection[str] = ()) -> ElfFacts | None:
    """:func:`capkeeper.elf.parse` over an open file with ``os.pread``; ``None`` when not
    readable ELF.

    An ``OSError`` of the reads propagates (it is about the file, not its content).
    """

    def read(offset: int, size: int) -> bytes:
        return os.pread(fd, size, offset)

    try:
        return parse(read, symbols)
    except ElfError:
        return None


# -- the errno policy of security.capability, and the reads of the audit walk ----------------

UNREADABLE_CAPS: dict[int, str] = {
    # The kernel refuses to return v1 and malformed values (still honoured at exec).
    errno.EINVAL: "present but unreadable (legacy v1 or malformed value)",
    # A v3 value whose rootid is not mapped into the reader's user namespace.
    errno.EOVERFLOW: "present but owned by another user namespace (v3 rootid not mapped)",
}
"""The errors with which ``getxattr`` refuses a ``security.capability`` value that is
present, and what each means: the one place these are spelled out."""

_NO_ATTRIBUTES = frozenset({errno.ENODATA, errno.EOPNOTSUPP, errno.ENOENT})


def caps_of_value(value: bytes | None, refused: int) -> tuple[CapSet | None, str | None]:
    """Decode a raw ``security.capability`` value: ``(caps, None)``, or ``(None, problem)``
    when it is malformed or the kernel refused it with errno ``refused`` (``value`` None)."""
    if value is None:
        return None, UNREADABLE_CAPS.get(refused, UNREADABLE_CAPS[errno.EINVAL])
    try:
        return decode(value), None
    except InvalidCapabilityData as exc:
        return None, exc.message


def list_xattr_names(name: str) -> list[str]:
    """The extended attribute names of ``name`` (relative to the working directory, a
    symlink not followed), as ``getcap -r`` lists them; empty when the file has none,
    its file system keeps none, or it is gone. Raises :class:`OSError` otherwise."""
    try:
        return os.listxattr(name, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in _NO_ATTRIBUTES:
            return []
        raise


def read_caps_value(name: str) -> tuple[bytes | None, int]:
    """The raw ``security.capability`` value of ``name`` (a symlink not followed):
    ``(value, 0)``; ``(None, errno)`` when it is present but the kernel refuses to return
    it (a key of :data:`UNREADABLE_CAPS`); ``(None, 0)`` when it is absent or the file is
    gone. Raises :class:`OSError` otherwise."""
    try:
        return os.getxattr(name, XATTR_NAME, follow_symlinks=False), 0
    except OSError as exc:
        if exc.errno in UNREADABLE_CAPS:
            return None, exc.errno
        if exc.errno in (errno.ENODATA, errno.ENOENT):
            return None, 0
        raise
