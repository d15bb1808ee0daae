"""The walk of ``capkeeper audit``: every file below some roots that carries capabilities.

It walks local file systems only (pseudo and network mounts are skipped unless
asked for), never follows symlinks, and reads ``security.capability`` the way
``getcap -r`` does, so the two find the same files. The tree is shared between
forked worker processes that ask for more work when idle (see
:class:`_Scanner`); an unreadable directory is recorded and the walk goes on.
Extended attributes are read through :mod:`capkeeper.files`, the one xattr
adapter; what a finding means is decided in :mod:`capkeeper.classify`.
"""

from __future__ import annotations

import mmap
import os
import posixpath
import select
import signal
import stat
import struct
import time
import warnings
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

from capkeeper.capabilities import CapSet
from capkeeper.errors import CapkeeperError
from capkeeper.files import XATTR_NAME, caps_of_value, list_xattr_names, read_caps_value
from capkeeper.frames import receive, send
from capkeeper.mounts import NETWORK_FS, PSEUDO_FS, MountInfo, MountTable, mount_id, read_mounts

__all__ = [
    "RawFinding",
    "SkippedMount",
    "WalkError",
    "WalkOptions",
    "WalkResult",
    "decode_finding",
    "default_jobs",
    "walk",
]

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_PROBE_FLAGS = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
_COUNTERS = struct.Struct("<QQQ")  # directories, files, found: per worker, for the progress line
_PROGRESS_EVERY = 0.2  # seconds


# -- the walk ----------------------------------------------------------------------------


@dataclass(frozen=True)
class WalkOptions:
    """Which mounts the walk enters, and how many worker processes share it."""

    one_file_system: bool = False
    include_fs: frozenset[str] = frozenset()
    jobs: int = 2

    def skip_reason(self, mount: MountInfo) -> str | None:
        """Why the walk does not enter ``mount``; None when it does."""
        if mount.fstype in self.include_fs:
            return None
        if mount.fstype in PSEUDO_FS:
            return "pseudo file system"
        if mount.fstype in NETWORK_FS:
            return "network file system"
        return None


def default_jobs() -> int:
    """One worker per CPU this process may run on, at most 4 (the walk is syscall-bound)."""
    return max(1, min(4, len(os.sched_getaffinity(0))))


@dataclass(frozen=True)
class RawFinding:
    """A file that carries ``security.capability``, as the walk saw it."""

    path: str  # absolute, symlink-free
    value: bytes | None  # None: present, but the kernel refused to return it
    error: int = 0  # errno of that refusal (EINVAL: v1 or malformed, EOVERFLOW: foreign v3)


@dataclass(frozen=True)
class WalkError:
    """Something the walk could not read; reported, never fatal."""

    path: str
    message: str


@dataclass(frozen=True)
class SkippedMount:
    """A mount point the walk did not enter."""

    path: str
    fstype: str
    reason: str


@dataclass
class WalkResult:
    """Everything a walk found, with what it skipped and could not read."""

    found: list[RawFinding] = field(default_factory=list)
    errors: list[WalkError] = field(default_factory=list)
    skipped: list[SkippedMount] = field(default_factory=list)
    directories: int = 0
    files: int = 0
    seconds: float = 0.0
    roots: list[tuple[str, str]] = field(default_factory=list)  # (as given, canonical)


class _Scanner:
    """The directory loop run by each worker process.

    A worker keeps a stack of directories to scan. It changes into each one
    (``fchdir``) so that every per-file system call takes a one-component
    name, relies on ``d_type`` from ``getdents`` to tell files, directories and
    symlinks apart without a ``stat``, and calls ``listxattr`` on every
    non-directory, non-symlink entry, reading the value only where the name is
    listed: the same set of files ``getcap -r`` (``nftw`` with ``FTW_PHYS``)
    reads. When the coordinator flags that another worker is idle, it hands
    over the shallower half of its stack.
    """

    def __init__(self, options: WalkOptions, table: MountTable) -> None:
        self.options = options
        self.by_id = table.by_id()
        children: dict[str, set[str]] = {}
        for point in table.mount_points():
            if point != "/":
                parent, name = posixpath.split(point)
                children.setdefault(parent, set()).add(name)
        self.mount_children = {parent: frozenset(names) for parent, names in children.items()}
        self.found: list[tuple[str, bytes | None, int]] = []
        self.errors: list[tuple[str, str]] = []
        self.skipped: list[tuple[str, str, str]] = []
        self.directories = 0
        self.files = 0

    def enter(self, name: str, path: str, here: int) -> int | None:
        """The mount id to walk ``name`` (in the current directory) with, or None to skip it."""
        try:
            fd = os.open(name, _PROBE_FLAGS)
        except OSError:
            return here  # gone or unreadable: the walk itself reports it
        try:
            ident = mount_id(fd)
        except (OSError, ValueError):
            return here
        finally:
            os.close(fd)
        if ident == here:
            return here  # listed as a mount point, but that mount is covered by ours
        mount = self.by_id.get(ident)
        fstype = mount.fstype if mount is not None else "unknown"
        if self.options.one_file_system:
            self.skipped.append((path, fstype, "another mount (--one-file-system)"))
            return None
        reason = self.options.skip_reason(mount) if mount is not None else None
        if reason is not None:
            self.skipped.append((path, fstype, reason))
            return None
        return ident

    def read_value(self, name: str, path: str) -> None:
        """Record the value of ``name``; a value the kernel refuses to return is still found."""
        try:
            value, refused = read_caps_value(name)
        except OSError as exc:
            self.errors.append((path, f"cannot read {XATTR_NAME}: {exc.strerror}"))
            return
        if value is not None or refused:
            self.found.append((path, value, refused))
        # else: removed since listxattr

    def run(
        self,
        stack: list[tuple[str, int]],
        hungry: mmap.mmap,
        share: Callable[[list[tuple[str, int]]], None],
        slot: int,
    ) -> None:
        """Scan ``stack`` (``(directory, mount id)`` pairs) and everything below it."""
        list_names = list_xattr_names
        scandir = os.scandir
        fchdir = os.fchdir
        open_ = os.open
        close = os.close
        name_wanted = XATTR_NAME
        mount_children = self.mount_children
        errors = self.errors
        pack = _COUNTERS.pack_into
        offset = 8 + _COUNTERS.size * slot
        directories = self.directories
        files = self.files
        while stack:
            if hungry[0] and len(stack) > 1:
                hungry[0] = 0
                half = len(stack) // 2
                share(stack[:half])
                del stack[:half]
            path, here = stack.pop()
            try:
                fd = open_(path, _DIR_FLAGS)
            except OSError as exc:
                errors.append((path, f"cannot open directory: {exc.strerror}"))
                continue
            try:
                fchdir(fd)
                entries = scandir(fd)
            except OSError as exc:
                close(fd)
                errors.append((path, f"cannot read directory: {exc.strerror}"))
                continue
            directories += 1
            prefix = path + "/" if path != "/" else "/"
            special = mount_children.get(path)
            try:
                with entries:
                    for entry in entries:
                        name = entry.name
                        mount = here
                        if special is not None and name in special:
                            entered = self.enter(name, prefix + name, here)
                            if entered is None:
                                continue
                            mount = entered
                        if entry.is_dir(follow_symlinks=False):
                            stack.append((prefix + name, mount))
                        elif not entry.is_symlink():
                            files += 1
                            try:
                                names = list_names(name)
                            except OSError as exc:
                                errors.append(
                                    (prefix + name, f"cannot list attributes: {exc.strerror}")
                                )
                                continue
                            if names and name_wanted in names:
                                self.read_value(name, prefix + name)
            except OSError as exc:
                errors.append((path, f"cannot read directory: {exc.strerror}"))
            finally:
                close(fd)
            pack(hungry, offset, directories, files, len(self.found))
        self.directories = directories
        self.files = files

    def result(self) -> tuple[Any, ...]:
        return (self.found, self.errors, self.skipped, self.directories, self.files)


@dataclass
class _Worker:
    pid: int
    tasks: int  # write end: directories to scan
    results: int  # read end: "share", "done" and the final result
    busy: bool = False


def _worker_main(task_fd: int, result_fd: int, scanner: _Scanner, shm: mmap.mmap, slot: int) -> int:
    def share(directories: list[tuple[str, int]]) -> None:
        send(result_fd, ("share", directories))

    while True:
        try:
            task = receive(task_fd)
        except EOFError:
            return 1  # the coordinator went away
        if task is None:
            break
        scanner.run([tuple(item) for item in task], shm, share, slot)
        send(result_fd, ("done",))
    send(result_fd, ("result", *scanner.result()))
    return 0


def _fork_worker(scanner: _Scanner, shm: mmap.mmap, slot: int, inherited: list[int]) -> _Worker:
    task_r, task_w = os.pipe()
    result_r, result_w = os.pipe()
    with warnings.catch_warnings():
        # Python 3.12+ warns about fork() in a process with threads; the worker
        # only makes system calls and leaves with os._exit, never touching a lock
        # another thread could hold.
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child; its results are asserted
        code = 1
        try:
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # the coordinator handles Ctrl-C
            for fd in (task_w, result_r, *inherited):
                os.close(fd)
            code = _worker_main(task_r, result_w, scanner, shm, slot)
        except BaseException as exc:
            os.write(2, f"capkeeper: audit worker failed: {exc!r}\n".encode())
        finally:
            os._exit(code)
    os.close(task_r)
    os.close(result_w)
    return _Worker(pid, task_w, result_r)


class _Progress:
    """A one-line progress indicator, drawn only when the stream is a terminal."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.enabled = stream.isatty()
        self.last = 0.0
        self.drawn = False

    def update(self, directories: int, files: int, found: int, *, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not force and now - self.last < _PROGRESS_EVERY:
            return
        self.last = now
        self.drawn = True
        self.stream.write(
            f"\rcapkeeper audit: {directories} directories, {files} files, "
            f"{found} with capabilities\x1b[K"
        )
        self.stream.flush()

    def clear(self) -> None:
        if self.drawn:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self.drawn = False


def _coordinate(
    roots: list[tuple[str, int]],
    scanner: _Scanner,
    jobs: int,
    progress: _Progress | None,
) -> list[tuple[Any, ...]]:
    """Share ``roots`` and everything below them between ``jobs`` forked workers."""
    shm = mmap.mmap(-1, 8 + _COUNTERS.size * jobs)
    workers: list[_Worker] = []
    results: list[tuple[Any, ...]] = []
    pending: deque[tuple[str, int]] = deque(roots)
    try:
        for slot in range(jobs):
            inherited = [fd for w in workers for fd in (w.tasks, w.results)]
            workers.append(_fork_worker(scanner, shm, slot, inherited))
        by_fd = {w.results: w for w in workers}
        while True:
            for worker in workers:
                if not worker.busy and pending:
                    send(worker.tasks, [pending.popleft()])  # shallowest, so largest, first
                    worker.busy = True
            busy = [w.results for w in workers if w.busy]
            if not busy:
                break
            shm[0] = 1 if len(busy) < len(workers) else 0
            timeout = _PROGRESS_EVERY if progress is not None and progress.enabled else None
            ready, _, _ = select.select(busy, [], [], timeout)
            for fd in ready:
                try:
                    message = receive(fd)
                except EOFError:
                    raise CapkeeperError("an audit worker exited unexpectedly") from None
                if message[0] == "share":
                    pending.extend(tuple(item) for item in message[1])
                else:
                    by_fd[fd].busy = False
            if progress is not None:
                totals = [
                    sum(c)
                    for c in zip(
                        *(_COUNTERS.unpack_from(shm, 8 + _COUNTERS.size * i) for i in range(jobs)),
                        strict=True,
                    )
                ]
                progress.update(*totals)
        for worker in workers:
            send(worker.tasks, None)
        for worker in workers:
            try:
                message = receive(worker.results)
            except EOFError:
                raise CapkeeperError("an audit worker exited unexpectedly") from None
            results.append(tuple(message[1:]))
    finally:
        finished = len(results) == len(workers)
        statuses = []
        for worker in workers:
            os.close(worker.tasks)
            os.close(worker.results)
            if not finished:
                os.kill(worker.pid, signal.SIGKILL)
            statuses.append(os.waitpid(worker.pid, 0)[1])
        shm.close()
    if any(statuses):
        raise CapkeeperError(f"an audit worker failed (wait statuses {statuses})")
    return results


def _canonical_root(root: str) -> str:
    """``root`` made absolute with the symlinks of its parent resolved; the last
    component is left alone, so a symlink given as root is not followed."""
    absolute = posixpath.normpath(os.path.abspath(root))
    if absolute == "/":
        return "/"
    parent, name = posixpath.split(absolute)
    return posixpath.join(os.path.realpath(parent), name)


def walk(
    roots: Sequence[str],
    options: WalkOptions | None = None,
    *,
    progress: TextIO | None = None,
    table: MountTable | None = None,
) -> WalkResult:
    """Find every file below ``roots`` that carries ``security.capability``.

    ``progress`` receives a progress line while the walk runs, if it is a terminal.
    """
    options = options or WalkOptions()
    started = time.monotonic()
    mounts = table if table is not None else read_mounts()
    by_id = mounts.by_id()
    scanner = _Scanner(options, mounts)
    files_scanner = _Scanner(options, mounts)  # roots that are files, checked here
    result = WalkResult()
    tasks: list[tuple[str, int]] = []
    for root in roots:
        path = _canonical_root(root)
        result.roots.append((root, path))
        try:
            st = os.lstat(path)
            fd = os.open(path, _PROBE_FLAGS)
            try:
                ident = mount_id(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            result.errors.append(WalkError(path, f"cannot audit: {exc.strerror}"))
            continue
        if stat.S_ISLNK(st.st_mode):
            target = os.readlink(path)
            message = f"is a symlink to {target}; not followed (audit the target instead)"
            result.errors.append(WalkError(path, message))
            continue
        mount = by_id.get(ident)
        reason = options.skip_reason(mount) if mount is not None else None
        if mount is not None and reason is not None:
            result.skipped.append(SkippedMount(path, mount.fstype, reason))
            continue
        if stat.S_ISDIR(st.st_mode):
            tasks.append((path, ident))
            continue
        result.files += 1
        try:
            names = list_xattr_names(path)
        except OSError as exc:
            result.errors.append(WalkError(path, f"cannot list attributes: {exc.strerror}"))
            continue
        if XATTR_NAME in names:
            files_scanner.read_value(path, path)
    line = _Progress(progress) if progress is not None else None
    outputs = [files_scanner.result()]
    if tasks:
        outputs += _coordinate(tasks, scanner, max(1, options.jobs), line)
    if line is not None:
        line.clear()
    for found, errors, skipped, directories, files in outputs:
        result.found.extend(RawFinding(p, v, e) for p, v, e in found)
        result.errors.extend(WalkError(p, m) for p, m in errors)
        result.skipped.extend(SkippedMount(p, t, r) for p, t, r in skipped)
        result.directories += directories
        result.files += files
    result.found.sort(key=lambda f: f.path)
    result.errors.sort(key=lambda e: e.path)
    result.skipped.sort(key=lambda s: s.path)
    result.seconds = time.monotonic() - started
    return result


def decode_finding(raw: RawFinding) -> tuple[CapSet | None, str | None]:
    """The capabilities of a finding, or why its value cannot be read."""
    return caps_of_value(raw.value, raw.error)
