"""``capkeeper audit``: every file on the host that carries capabilities, accounted for.

Three layers:

* :func:`walk` — the imperative shell. It walks local file systems only (pseudo
  and network mounts are skipped unless asked for), never follows symlinks,
  and reads ``security.capability`` the way ``getcap -r`` does, so the two find
  the same files. The tree is shared between forked worker processes that ask
  for more work when idle (see :class:`_Scanner`); an unreadable directory is
  recorded and the walk goes on.
* :func:`classify` and :func:`rate` — pure: a finding is managed and in sync,
  managed but drifted (or refused by the trust policy), or unmanaged; an
  unmanaged finding is rated by what it exposes, each reason spelled out.
* :func:`cmd_audit` and the renderers — a table, JSON lines, or ``getcap -r``
  lines.

Exit status: 0 clean (every file with capabilities is managed and in sync),
1 findings (anything unmanaged, drifted or refused), 2 when nothing was found
to report but the walk hit errors (an unreadable directory, a worker failure):
an incomplete walk never reads as clean, and findings outrank errors because
they need action either way; errors are always printed on stderr.
"""

from __future__ import annotations

import argparse
import errno
import json
import marshal
import mmap
import os
import posixpath
import select
import signal
import stat
import struct
import sys
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any, TextIO

from capkeeper.capabilities import (
    CapSet,
    capability_name,
    capability_number,
    decode,
    format_text,
)
from capkeeper.errors import CapkeeperError, InvalidCapabilityData, StateNotFound, printable
from capkeeper.exit_codes import ExitStatus
from capkeeper.files import XATTR_NAME, observe
from capkeeper.interpreters import runs_other_code
from capkeeper.kernel import cap_last_cap
from capkeeper.model import Entry, Kind, Observation
from capkeeper.mounts import NETWORK_FS, PSEUDO_FS, MountInfo, MountTable, mount_id, read_mounts
from capkeeper.reconcile import Status, decide, describe
from capkeeper.state import State, load_state
from capkeeper.trust import Refusal, assess

if TYPE_CHECKING:
    from pathlib import Path

    from capkeeper.settings import Settings

HELP = "list every file with capabilities, classified against the state"
DESCRIPTION = (
    "Walk local file systems (default /) for every file that carries "
    "security.capability and classify each against the state: in-sync, drifted, "
    "refused or unmanaged; unmanaged files are rated with their reasons. Pseudo and "
    "network file systems are skipped unless named with --include-fs; symlinks are "
    "never followed. Exit status: 0 clean, 1 findings (unmanaged, drifted or refused), "
    "2 errors (e.g. an unreadable directory) and nothing else to report."
)

__all__ = [
    "ROOT_EQUIVALENT",
    "AuditReport",
    "Finding",
    "Level",
    "Rating",
    "RawFinding",
    "StateIndex",
    "Verdict",
    "WalkOptions",
    "WalkResult",
    "audit",
    "classify",
    "cmd_audit",
    "index_state",
    "rate",
    "walk",
]

ROOT_EQUIVALENT: frozenset[int] = frozenset(
    capability_number(name)
    for name in (
        "cap_chown",  # take ownership of any file, e.g. /etc/shadow
        "cap_dac_override",  # write any file
        "cap_dac_read_search",  # read any file (open_by_handle_at escapes too)
        "cap_fowner",  # chmod any file
        "cap_setgid",
        "cap_setuid",
        "cap_setpcap",
        "cap_setfcap",  # grant itself or anything every capability
        "cap_sys_module",  # load kernel code
        "cap_sys_rawio",  # raw memory and disk access
        "cap_sys_ptrace",  # inject into any process
        "cap_sys_admin",
        "cap_sys_boot",  # kexec another kernel
        "cap_mknod",  # make a block device of the root disk
        "cap_bpf",
    )
)
"""Capabilities that hand their holder a short path to full root."""

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_PROBE_FLAGS = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
_IGNORED_XATTR_ERRORS = frozenset({errno.ENODATA, errno.EOPNOTSUPP, errno.ENOENT})
_FRAME = struct.Struct("<I")
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
            value = os.getxattr(name, XATTR_NAME, follow_symlinks=False)
        except OSError as exc:
            if exc.errno in (errno.ENODATA, errno.ENOENT):
                return  # removed since listxattr
            if exc.errno in (errno.EINVAL, errno.EOVERFLOW):
                self.found.append((path, None, exc.errno))
            else:
                self.errors.append((path, f"cannot read {XATTR_NAME}: {exc.strerror}"))
            return
        self.found.append((path, value, 0))

    def run(
        self,
        stack: list[tuple[str, int]],
        hungry: mmap.mmap,
        share: Callable[[list[tuple[str, int]]], None],
        slot: int,
    ) -> None:
        """Scan ``stack`` (``(directory, mount id)`` pairs) and everything below it."""
        listxattr = os.listxattr
        scandir = os.scandir
        fchdir = os.fchdir
        open_ = os.open
        close = os.close
        name_wanted = XATTR_NAME
        mount_children = self.mount_children
        errors = self.errors
        ignored = _IGNORED_XATTR_ERRORS
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
                                names = listxattr(name, follow_symlinks=False)
                            except OSError as exc:
                                if exc.errno not in ignored:
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


def _send(fd: int, message: Any) -> None:
    data = marshal.dumps(message)
    view = memoryview(_FRAME.pack(len(data)) + data)
    while view:
        view = view[os.write(fd, view) :]


def _read_exactly(fd: int, size: int) -> bytes:
    chunks = []
    while size:
        chunk = os.read(fd, min(size, 1 << 20))
        if not chunk:
            raise EOFError
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


def _receive(fd: int) -> Any:
    (size,) = _FRAME.unpack(_read_exactly(fd, _FRAME.size))
    # The bytes come from our own forked worker over a private pipe.
    return marshal.loads(_read_exactly(fd, size))  # noqa: S302


@dataclass
class _Worker:
    pid: int
    tasks: int  # write end: directories to scan
    results: int  # read end: "share", "done" and the final result
    busy: bool = False


def _worker_main(task_fd: int, result_fd: int, scanner: _Scanner, shm: mmap.mmap, slot: int) -> int:
    def share(directories: list[tuple[str, int]]) -> None:
        _send(result_fd, ("share", directories))

    while True:
        try:
            task = _receive(task_fd)
        except EOFError:
            return 1  # the coordinator went away
        if task is None:
            break
        scanner.run([tuple(item) for item in task], shm, share, slot)
        _send(result_fd, ("done",))
    _send(result_fd, ("result", *scanner.result()))
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
                    _send(worker.tasks, [pending.popleft()])  # shallowest, so largest, first
                    worker.busy = True
            busy = [w.results for w in workers if w.busy]
            if not busy:
                break
            shm[0] = 1 if len(busy) < len(workers) else 0
            timeout = _PROGRESS_EVERY if progress is not None and progress.enabled else None
            ready, _, _ = select.select(busy, [], [], timeout)
            for fd in ready:
                try:
                    message = _receive(fd)
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
            _send(worker.tasks, None)
        for worker in workers:
            try:
                message = _receive(worker.results)
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
            names = os.listxattr(path, follow_symlinks=False)
        except OSError as exc:
            if exc.errno not in _IGNORED_XATTR_ERRORS:
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


# -- classification and rating --------------------------------------------------------


class Verdict(StrEnum):
    """Where a file with capabilities stands against the state."""

    UNMANAGED = "unmanaged"
    DRIFTED = "drifted"
    REFUSED = "refused"  # declared, but the trust policy refuses to enforce it
    IN_SYNC = "in-sync"

    @property
    def is_finding(self) -> bool:
        """Whether this asks for action (anything but in sync)."""
        return self is not Verdict.IN_SYNC


class Level(StrEnum):
    """How much an unmanaged file with capabilities exposes."""

    CRITICAL = "critical"
    HIGH = "high"
    MEDIUM = "medium"
    LOW = "low"

    @classmethod
    def of(cls, score: int) -> Level:
        if score >= 60:
            return cls.CRITICAL
        if score >= 30:
            return cls.HIGH
        if score >= 10:
            return cls.MEDIUM
        return cls.LOW


@dataclass(frozen=True)
class Rating:
    """A risk score with every reason that contributed to it."""

    score: int
    reasons: tuple[str, ...]

    @property
    def level(self) -> Level:
        return Level.of(self.score)


# Weights of the trust policy's refusal rules when rating an unmanaged file.
_RULE_WEIGHTS: Mapping[str, int] = {
    "directory-writable": 30,  # anyone who can write the directory can replace the binary
    "directory-owner": 30,
    "symlink": 30,
    "file-writable": 30,
    "owner": 30,
    "setuid": 20,
    "elf": 10,  # a script, or not an executable at all
    "regular": 10,
}
_IGNORED_RULES = frozenset({"sha256", "inheritable", "kernel"})  # not about the file
_RUNS_CODE = 60  # a loader or interpreter with capabilities: critical whatever it holds


def rate(
    caps: CapSet | None,
    problem: str | None,
    observation: Observation | None,
    refusals: Sequence[Refusal] = (),
) -> Rating:
    """Rate an unmanaged file: what could its capabilities be used for, and by whom?

    ``refusals`` are the trust policy's objections to the file (who can write
    or replace it, setuid, script); each adds its weight and its message.
    """
    score = 0
    reasons: list[str] = []
    if caps is not None and not caps.is_empty:
        score += 1
        dangerous = sorted(caps.capabilities() & ROOT_EQUIVALENT)
        if dangerous:
            names = ", ".join(capability_name(n) for n in dangerous)
            verb = "amounts" if len(dangerous) == 1 else "amount"
            score += 40
            reasons.append(f"{names} {verb} to root")
    if problem is not None:
        score += 10
        reasons.append(f"{problem}; the kernel may still honour it at exec")
    capable = (caps is not None and not caps.is_empty) or problem is not None
    if capable and observation is not None and observation.kind is Kind.ELF:
        name = posixpath.basename(observation.resolved)
        runs = runs_other_code(name, observation.elf)
        if runs is not None:
            score += _RUNS_CODE
            reasons.append(f"{name} {runs} gets these capabilities")
    for refusal in refusals:
        if refusal.rule in _IGNORED_RULES or refusal.rule == "interpreter":  # rated above
            continue
        score += _RULE_WEIGHTS.get(refusal.rule, 5)
        reasons.append(refusal.message)
    return Rating(score, tuple(reasons))


@dataclass(frozen=True)
class Finding:
    """One file with capabilities (or a declared one that lost them), classified."""

    path: str  # absolute, symlink-free
    display: str  # as getcap -r prints it for the root given
    caps: CapSet | None
    problem: str | None
    verdict: Verdict
    entry: Entry | None = None
    rating: Rating | None = None  # unmanaged files, and refused ones that run other code
    note: str = ""

    @property
    def caps_text(self) -> str:
        return describe(self.caps, self.problem)

    def record(self) -> dict[str, Any]:
        """The JSON form of this finding."""
        data: dict[str, Any] = {
            "type": "finding",
            "path": self.path,
            "caps": format_text(self.caps) if self.caps is not None else None,
            "verdict": str(self.verdict),
        }
        if self.problem:
            data["problem"] = self.problem
        if self.entry is not None:
            data["expected"] = self.entry.caps_text
            data["declared_in"] = self.entry.source
        if self.rating is not None:
            data["rating"] = str(self.rating.level)
            data["score"] = self.rating.score
            data["reasons"] = list(self.rating.reasons)
        if self.note:
            data["note"] = self.note
        return data


@dataclass(frozen=True)
class StateIndex:
    """Declared entries keyed by the path their file resolves to and by inode."""

    by_path: Mapping[str, Entry]
    by_inode: Mapping[tuple[int, int], Entry]
    observations: Mapping[str, Observation]  # entry.path -> what is there now, by that route


def index_state(state: State, observe_entry: Callable[..., Observation] = observe) -> StateIndex:
    """Observe every declared file once (hashing pinned ones) through its declared path;
    entries whose file is missing are left out."""
    by_path: dict[str, Entry] = {}
    by_inode: dict[tuple[int, int], Entry] = {}
    observations: dict[str, Observation] = {}
    for entry in state.entries:
        try:
            observation = observe_entry(entry.path, hash=entry.sha256 is not None)
        except CapkeeperError:
            continue
        observations[entry.path] = observation
        by_path.setdefault(observation.resolved, entry)
        by_inode.setdefault((observation.dev, observation.ino), entry)
    return StateIndex(by_path, by_inode, observations)


def _decode(raw: RawFinding) -> tuple[CapSet | None, str | None]:
    if raw.value is None:
        if raw.error == errno.EOVERFLOW:
            return None, "present but owned by another user namespace (v3 rootid not mapped)"
        return None, "present but unreadable (legacy v1 or malformed value)"
    try:
        return decode(raw.value), None
    except InvalidCapabilityData as exc:
        return None, exc.message


def _synthetic_entry(path: str, caps: CapSet | None) -> Entry:
    """An entry declaring what the file carries, to ask the trust policy about it."""
    found = caps or CapSet()
    return Entry(path=path, caps=found, caps_text="", allow_inheritable=True)


def classify(
    raw: RawFinding,
    display: str,
    observation: Observation | None,
    index: StateIndex,
    *,
    last_cap: int,
) -> Finding:
    """Classify one file found with capabilities against the declared state (pure)."""
    caps, problem = _decode(raw)
    entry = index.by_path.get(raw.path)
    note = ""
    if entry is None and observation is not None:
        entry = index.by_inode.get((observation.dev, observation.ino))
        if entry is not None:
            note = f"hard link of declared {entry.path}"
    if entry is None or observation is None:
        refusals = (
            assess(_synthetic_entry(raw.path, caps), observation, last_cap=last_cap)
            if observation is not None
            else ()
        )
        rating = rate(caps, problem, observation, refusals)
        return Finding(raw.path, display, caps, problem, Verdict.UNMANAGED, rating=rating)
    # The trust policy judges the route of the declared path, not the walk's: a declared
    # path through another user's directory may lead to this file, and the entry is
    # refused whatever route the walk took to it.
    declared = index.observations.get(entry.path, observation)
    decision = decide(entry, declared, last_cap=last_cap)
    if decision.status is Status.REFUSED:
        reasons = "; ".join(str(r) for r in decision.refusals)
        # A declared loader or interpreter that already carries capabilities is as
        # exposed as an unmanaged one: rate it so it ranks with the worst.
        runs_code = any(r.rule == "interpreter" for r in decision.refusals)
        return Finding(
            raw.path,
            display,
            caps,
            problem,
            Verdict.REFUSED,
            entry,
            rating=rate(caps, problem, observation, decision.refusals) if runs_code else None,
            note=note or reasons,
        )
    verdict = Verdict.IN_SYNC if decision.status is Status.IN_SYNC else Verdict.DRIFTED
    if verdict is Verdict.DRIFTED and decision.extra:
        note = (note + "; " if note else "") + "extra capabilities: possible tampering"
    return Finding(raw.path, display, caps, problem, verdict, entry, note=note)


@dataclass
class AuditReport:
    """The classified result of an audit."""

    findings: list[Finding]
    walk: WalkResult

    def count(self, verdict: Verdict) -> int:
        return sum(1 for f in self.findings if f.verdict is verdict)

    @property
    def worst(self) -> Finding | None:
        """The rated finding with the highest score."""
        rated = [f for f in self.findings if f.rating is not None]
        return max(rated, key=lambda f: f.rating.score if f.rating else 0, default=None)


def _display(path: str, roots: Sequence[tuple[str, str]]) -> str:
    """``path`` spelled as ``getcap -r`` prints it for the root the user gave."""
    for given, canonical in roots:
        if path == canonical:
            return given
        prefix = canonical.rstrip("/") + "/"
        if path.startswith(prefix):
            base = given if given == "/" else given.rstrip("/")
            return posixpath.join(base, path[len(prefix) :])
    return path


def _within(path: str, result: WalkResult) -> bool:
    """Whether ``path`` lies in the part of the tree the walk covered."""

    def under(top: str) -> bool:
        return path == top or path.startswith(top.rstrip("/") + "/")

    return any(under(canonical) for _, canonical in result.roots) and not any(
        under(s.path) for s in result.skipped
    )


def audit(
    roots: Sequence[str],
    state: State,
    options: WalkOptions | None = None,
    *,
    progress: TextIO | None = None,
    last_cap: int | None = None,
    table: MountTable | None = None,
) -> AuditReport:
    """Walk ``roots`` and classify every file with capabilities against ``state``.

    Declared files below the roots that exist but carry no capabilities at all
    are reported as drifted too.
    """
    limit = cap_last_cap() if last_cap is None else last_cap
    result = walk(roots, options, progress=progress, table=table)
    index = index_state(state)
    findings: list[Finding] = []
    seen: set[str] = set()
    for raw in result.found:
        entry = index.by_path.get(raw.path)
        pinned = entry is not None and entry.sha256 is not None
        try:
            observation: Observation | None = observe(raw.path, hash=pinned)
        except CapkeeperError as exc:
            result.errors.append(WalkError(raw.path, f"cannot inspect: {exc.message}"))
            observation = None
        display = _display(raw.path, result.roots)
        findings.append(classify(raw, display, observation, index, last_cap=limit))
        seen.add(raw.path)
    for entry in state.entries:
        observation = index.observations.get(entry.path)
        if observation is None or observation.resolved in seen:
            continue
        lost = observation.caps is None and observation.caps_problem is None
        if lost and _within(observation.resolved, result):
            refusals = assess(entry, observation, last_cap=limit)
            findings.append(
                Finding(
                    observation.resolved,
                    _display(observation.resolved, result.roots),
                    None,
                    None,
                    Verdict.REFUSED if refusals else Verdict.DRIFTED,
                    entry,
                    note="; ".join(str(r) for r in refusals) or "declared capabilities are missing",
                )
            )
    return AuditReport(_ordered(findings), result)


_VERDICT_ORDER = {Verdict.UNMANAGED: 0, Verdict.DRIFTED: 1, Verdict.REFUSED: 2, Verdict.IN_SYNC: 3}


def _ordered(findings: Iterable[Finding]) -> list[Finding]:
    """Worst first: rated findings by falling score, then unmanaged, drifted, refused,
    in sync; then by path."""
    return sorted(
        findings,
        key=lambda f: (
            -(f.rating.score if f.rating is not None else 0),
            _VERDICT_ORDER[f.verdict],
            f.path,
        ),
    )


# -- output ---------------------------------------------------------------------------


def render_getcap(report: AuditReport) -> list[str]:
    """The lines ``getcap -r`` prints on stdout for the same tree (sorted by path).

    A name is printed as getcap prints it unless it holds a control or format
    character or an undecodable byte: then it is escaped (:func:`printable`),
    so one file is always one line. getcap itself writes such a name raw, and
    a newline in it reads as a second file.
    """
    return [
        f"{printable(f.display)} {format_text(f.caps)}"
        for f in sorted(report.findings, key=lambda f: f.path)
        if f.caps is not None
    ]


def render_table(report: AuditReport) -> list[str]:
    """A readable table: one line per finding, its reasons indented below it."""
    lines = []
    for finding in report.findings:
        level = str(finding.rating.level) if finding.rating is not None else "-"
        caps = finding.caps_text
        if finding.entry is not None and finding.verdict is not Verdict.IN_SYNC:
            caps += f" (declared {finding.entry.caps_text})"
        lines.append(f"{level:<9} {finding.verdict:<10} {printable(finding.path)}  {caps}")
        reasons = list(finding.rating.reasons) if finding.rating is not None else []
        if finding.note:
            reasons.append(finding.note)
        lines.extend(f"{'':<20} - {printable(reason)}" for reason in reasons)
    return lines


def summary(report: AuditReport) -> str:
    """One line: what was found and how much was walked."""
    walked = report.walk
    counts = [f"{report.count(v)} {v}" for v in Verdict if report.count(v)] or [
        "nothing with capabilities"
    ]
    text = (
        f"{len(report.findings)} files: {', '.join(counts)}; walked {walked.directories} "
        f"directories, {walked.files} files in {walked.seconds:.2f}s"
    )
    if walked.errors:
        text += f"; {len(walked.errors)} error(s)"
    if walked.skipped:
        types = sorted({s.fstype for s in walked.skipped})
        text += f"; skipped {len(walked.skipped)} mount(s) ({', '.join(types)})"
    return printable(text)


def _exit_status(report: AuditReport) -> ExitStatus:

    if any(f.verdict.is_finding for f in report.findings):
        return ExitStatus.DRIFT
    if report.walk.errors:
        return ExitStatus.FAILED
    return ExitStatus.OK


def load_state_or_empty(path: Path) -> tuple[State, str | None]:
    """The state, or an empty one with a note when the file does not exist.

    An audit is how an unmanaged host is first looked at, so a missing state
    is not an error: every finding is then unmanaged. An invalid state is.
    """
    try:
        return load_state(path), None
    except StateNotFound:
        return State(entries=(), files=()), f"no state at {path}: every finding is unmanaged"


def _jobs(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive number, not {text!r}")
    return value


def add_walk_arguments(parser: argparse.ArgumentParser) -> None:
    """The options choosing what the walk enters (``audit`` and ``adopt --from-audit``)."""
    parser.add_argument(
        "-x", "--one-file-system", action="store_true", help="do not cross into other mounts"
    )
    parser.add_argument(
        "--include-fs",
        action="append",
        metavar="TYPE",
        help="also walk mounts of this type, e.g. nfs4 or sysfs (repeatable or comma-separated; "
        "pseudo and network file systems are skipped by default)",
    )
    parser.add_argument(
        "-j", "--jobs", type=_jobs, metavar="N", help="worker processes (default: CPUs, at most 4)"
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``audit`` command line."""
    parser.add_argument("roots", nargs="*", metavar="ROOT", help="where to walk (default /)")
    output = parser.add_mutually_exclusive_group()
    output.add_argument(
        "--format",
        choices=("table", "json", "getcap"),
        default="table",
        help="table (default), JSON lines, or what 'getcap -r' prints (a name with control "
        "or format characters escaped, so one file is one line; getcap prints it raw)",
    )
    output.add_argument(
        "--json", dest="format", action="store_const", const="json", help="--format json"
    )
    add_walk_arguments(parser)


def walk_options(args: argparse.Namespace) -> WalkOptions:
    """The walk options of the ``audit`` and ``adopt --from-audit`` command lines."""
    include = frozenset(
        part.strip() for value in (args.include_fs or ()) for part in value.split(",") if part
    )
    jobs = args.jobs if args.jobs is not None else default_jobs()
    return WalkOptions(one_file_system=args.one_file_system, include_fs=include, jobs=jobs)


def report_walk_problems(result: WalkResult, err: TextIO) -> None:
    """Print what the walk could not read on stderr."""
    for error in result.errors:
        err.write(f"capkeeper: audit: {printable(error.path)}: {printable(error.message)}\n")


def cmd_audit(args: argparse.Namespace, settings: Settings, out: TextIO) -> ExitStatus:
    """``capkeeper audit [ROOT...]``."""
    err = sys.stderr
    state, note = load_state_or_empty(settings.state)
    if note and args.format != "getcap":
        err.write(f"capkeeper: audit: {printable(note)}\n")
    report = audit(args.roots or ["/"], state, walk_options(args), progress=err)
    report_walk_problems(report.walk, err)
    if args.format == "getcap":
        for finding in report.findings:
            if finding.caps is None and finding.problem is not None:
                err.write(
                    f"Failed to get capabilities of file '{printable(finding.display)}' "
                    f"({finding.problem})\n"
                )
        out.writelines(line + "\n" for line in render_getcap(report))
    elif args.format == "json":
        for finding in report.findings:
            out.write(json.dumps(finding.record()) + "\n")
        for error in report.walk.errors:
            out.write(json.dumps({"type": "error", "path": error.path, "message": error.message}))
            out.write("\n")
        for skipped in report.walk.skipped:
            record = {"type": "skipped", "path": skipped.path, "fstype": skipped.fstype}
            out.write(json.dumps({**record, "reason": skipped.reason}) + "\n")
        out.write(json.dumps(_summary_record(report)) + "\n")
    else:
        out.writelines(line + "\n" for line in render_table(report))
        out.write(summary(report) + "\n")
    return _exit_status(report)


def _summary_record(report: AuditReport) -> dict[str, Any]:
    walked = report.walk
    return {
        "type": "summary",
        "files_with_capabilities": len(report.findings),
        **{str(v): report.count(v) for v in Verdict},
        "errors": len(walked.errors),
        "skipped_mounts": len(walked.skipped),
        "directories": walked.directories,
        "files": walked.files,
        "seconds": round(walked.seconds, 3),
    }
