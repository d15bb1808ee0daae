"""The start-up check of a large state, shared with one forked helper process.

At start-up the daemon checks every entry before READY=1, and with thousands of
entries that is seconds of one CPU. On a machine with a second CPU, a forked
copy of the daemon checks entries from the last one backwards (observe, decide,
restore: the same code on the same files, with the same privileges, each file
by its own fd-pinned walk) while the daemon checks them from the first one
forwards, until the two meet. The helper logs nothing and keeps nothing: it
sends what it found as plain data over a private pipe (:mod:`capkeeper.frames`),
then the ELF facts it learnt, and exits. The daemon logs, paces and records the
helper's outcomes as its own, so every alert, the status file and the metrics
read as if it had checked them itself.

Where they meet, each says in a shared page how far it got (:meth:`Helper.claim`).
That is only a hint: the daemon knows at the end which entries it checked and
which ones the helper reported, and checks itself any entry neither did. A
check is idempotent: an entry both checked is one restore and one "in sync",
and is reported once, with the daemon's verdict, unless the helper changed
the file after the daemon judged it (a restore, a refusal): that is reported
too, and counted instead.

The helper sends an outcome other than "in sync" as soon as it has it, and the
daemon reads to the end whatever it sent. When the helper exits early or the
daemon stops, the helper is killed (if it still runs) and what it sent is still
read; the daemon checks itself every entry whose outcome it did not take (those
missing, and those that do not read), and says so. A failure or a stop can
lose the alert of the one restore in flight, and that of an outcome that does
not read, never a restore. The helper dies with the daemon
(``PR_SET_PDEATHSIG``): nothing of capkeeper writes after the daemon is gone.
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any

from capkeeper.frames import Garbled, Reader, send

__all__ = ["MIN_ENTRIES", "Helper", "helper_worth"]

MIN_ENTRIES = 1000  # below this the fork and the hand-over cost more than they save
# The shared page holds two marks (see claim()): [_FRONT], the entry after the last one
# the daemon took; [_BACK], the last one the helper took. Each writes only its own, as
# one aligned 8-byte store (a memoryview item: struct.pack_into zeroes the bytes first).
_FRONT, _BACK = 0, 1
_CHUNK = 256  # outcomes "in sync" sent per message
_PIPE_SIZE = 1 << 20  # bytes: /proc/sys/fs/pipe-max-size by default
_WAIT = 0.5  # seconds between the daemon's ticks while it waits for the helper
_LAST_WORDS = 2.0  # seconds the daemon reads a killed helper's pipe before leaving it
_STOPS = frozenset({signal.SIGTERM, signal.SIGINT, signal.SIGHUP})
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>: the signal a process gets when its parent dies


def helper_worth(entries: int) -> bool:
    """Whether a start-up check of ``entries`` entries is worth a helper: enough of them,
    and a second CPU this process may run on."""
    if entries < MIN_ENTRIES:
        return False
    try:
        return len(os.sched_getaffinity(0)) >= 2
    except OSError:  # a system call filter may refuse it: take one CPU
        return False


class Helper:
    """The daemon's end of one forked helper: see the module docstring."""

    def __init__(self, pid: int, fd: int, page: mmap.mmap, marks: memoryview, count: int) -> None:
        self.pid = pid
        self._fd = fd
        self._reader = Reader(fd)
        self._page = page
        self._marks = marks
        self.lowest = count  # the helper sent entries lowest.. (it goes backwards)
        self.facts: object = None  # what it sent at the end (the ELF facts it learnt)
        self.failure: str | None = None  # why it failed (or was stopped): it is killed
        self.left = 0  # then, the entries between the two marks: the daemon's now
        self.trouble = ""  # what it sent that does not read (a bug), the first of it
        self.lost: list[int] = []  # entries whose outcome does not read, or did not come
        self._killed_at: float | None = None  # when it was killed: only its last words left
        self._done = False  # nothing more to read

    @classmethod
    def fork(
        cls,
        count: int,
        look: Callable[[int], tuple[bool, Any]],
        finish: Callable[[], object],
    ) -> Helper | None:
        """Fork a helper that calls ``look`` on the entries ``count - 1``, ``count - 2``...
        (their indexes) until it meets the daemon, sends what each call returns, then
        sends ``finish()``; None when no helper can be forked.

        ``look`` returns ``(urgent, record)``, ``record`` plain data; an urgent
        record is sent at once, the others in chunks.
        """
        try:
            page = mmap.mmap(-1, mmap.PAGESIZE)
        except OSError:  # ENOMEM: check alone
            return None
        marks = memoryview(page).cast("q")
        marks[_FRONT], marks[_BACK] = 0, count
        try:
            read_end, write_end = os.pipe2(os.O_CLOEXEC)
        except OSError:  # EMFILE, ENFILE: check alone
            marks.release()
            page.close()
            return None
        # Room for its outcomes while the daemon plans the routes before it reads any
        # (64 KiB by default: a few hundred outcomes); EPERM past a user's pipe quota.
        with contextlib.suppress(OSError):
            fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, _PIPE_SIZE)
        daemon = os.getpid()
        # Blocked across the fork: a stop arriving before the helper has its own signal
        # dispositions would run the daemon's handler in it (a flag it never reads).
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, _STOPS)
        try:
            with warnings.catch_warnings():
                # Python 3.12+ warns about fork() in a process with threads (the tests
                # run the daemon in one); the helper takes no lock another thread may hold:
                # it neither logs nor writes to a stream, and leaves with os._exit.
                warnings.simplefilter("ignore", DeprecationWarning)
                pid = os.fork()
        except OSError:  # EAGAIN (a task limit), EPERM (a filter): check alone
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
            os.close(read_end)
            os.close(write_end)
            marks.release()
            page.close()
            return None
        if pid == 0:  # pragma: no cover - the helper; its outcomes are asserted
            code = 70
            try:
                os.close(read_end)
                _become_helper(daemon)
                _help(write_end, marks, count, look, finish)
                code = 0
            finally:
                os._exit(code)  # no atexit handler, no flush of the daemon's buffers
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        os.close(write_end)
        return cls(pid, read_end, page, marks, count)

    def claim(self, index: int) -> bool:
        """Whether the daemon may check entry ``index`` (its next, in order): not when
        the helper sent it or says it took it. The daemon's mark says it did."""
        if index >= self.lowest:
            return False
        if self.failure is not None:  # everything the helper did not send is the daemon's
            return True
        self._marks[_FRONT] = index + 1
        back: int = self._marks[_BACK]
        return index < back

    def arrived(self) -> Iterator[tuple[int, Any]]:
        """The ``(index, record)`` the helper sent so far, without waiting for more."""
        while not self._done and self._reader.wait(0):
            yield from self._next()

    def rest(
        self, stopping: Callable[[], bool], tick: Callable[[], None]
    ) -> Iterator[tuple[int, Any]]:
        """Every ``(index, record)`` still to come, until the helper is done or failed (see
        :attr:`failure`); ``tick`` is called while waiting. On ``stopping()`` the helper is
        killed and what it sent before is still read."""
        while not self._done:
            if stopping() and self._killed_at is None:
                self.abandon("the daemon is stopping")
            if self._reader.wait(_WAIT):
                yield from self._next()
                continue
            tick()
            if self._killed_at is not None and time.monotonic() - self._killed_at > _LAST_WORDS:
                self._done = True  # killed, yet not gone: stuck in the kernel (a hung mount)

    def _next(self) -> Iterator[tuple[int, Any]]:
        try:
            message = self._reader.receive()
        except Garbled as exc:  # a bug in one message: those after it still read
            self._trouble(f"it sent a message that does not read: {exc}")
            return
        except EOFError:  # it exited (or was killed) without its last word
            self.abandon(f"it exited before its last entry was sent ({self.lowest})")
            self._done = True
            return
        kind, payload = message if type(message) is tuple and len(message) == 2 else (None, None)
        if kind == "records" and type(payload) is list:
            for item in payload:
                if type(item) is not tuple or len(item) != 2 or type(item[0]) is not int:
                    self._trouble(f"it sent a record that does not read: {item!r:.80}")
                    continue
                index, record = item
                if not 0 <= index < self.lowest:
                    self._trouble(f"it sent entry {index} after entry {self.lowest}")
                    continue
                # It sends every entry it checks, in order: a gap is what did not read.
                self.lost.extend(range(index + 1, self.lowest))
                self.lowest = index
                yield index, record
        elif kind == "end":
            self.facts = payload
            self._done = True
        else:
            self._trouble(f"it sent a message that does not read: {kind!r:.80}")

    def unread(self, index: int, reason: str) -> None:
        """The outcome it sent for entry ``index`` does not read, for ``reason`` (a bug in
        one outcome): that entry is the daemon's to check, and the others still read."""
        self.lost.append(index)
        self._trouble(reason)

    def _trouble(self, reason: str) -> None:
        self.trouble = self.trouble or reason

    def abandon(self, reason: str) -> None:
        """The helper failed, for ``reason`` (or the daemon is stopping): it is killed at
        once, and what it sent before is still read (:meth:`arrived`, :meth:`rest`)."""
        self._failed(reason)
        if self._killed_at is None:
            self._killed_at = time.monotonic()
            os.kill(self.pid, signal.SIGKILL)

    def _failed(self, reason: str) -> None:
        if self.failure is None:
            self.failure = reason
            self.left = max(self.lowest - self._marks[_FRONT], 0)

    def close(self) -> None:
        """Stop the helper if it still runs, reap it and close the pipe. A helper that
        does not die (stuck in the kernel: a hung mount) is reaped when it does, by a
        thread that waits for it: the daemon goes on, or stops, meanwhile."""
        if not self._done:
            self.abandon("the daemon stopped waiting for it")
        os.kill(self.pid, signal.SIGKILL)  # done or not, nothing more of it is needed
        deadline = time.monotonic() + _LAST_WORDS
        while os.waitpid(self.pid, os.WNOHANG) == (0, 0):
            if time.monotonic() > deadline:
                reaper = threading.Thread(
                    target=os.waitpid, args=(self.pid, 0), name="helper-reaper", daemon=True
                )
                reaper.start()
                break
            time.sleep(0.001)
        os.close(self._fd)
        self._marks.release()
        self._page.close()


def _become_helper(daemon: int) -> None:  # pragma: no cover - runs in the helper
    """Signals as for any process: a stop of the service ends the helper at once (the
    daemon's handlers would only set a flag the helper never reads); and the helper
    dies with the daemon, which alone reports what it does."""
    for sig in _STOPS:
        signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOPS)
    # The daemon's wake-up pipe is the daemon's (ValueError: forked from another thread
    # than the main one, as in the tests, where there is none).
    with contextlib.suppress(ValueError):
        signal.set_wakeup_fd(-1)
    import ctypes  # noqa: PLC0415 - the helper's alone: 6 ms the daemon does not spend

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")
    if os.getppid() != daemon:  # it died before the prctl
        raise ProcessLookupError(daemon)


def _help(
    fd: int,
    marks: memoryview,
    count: int,
    look: Callable[[int], tuple[bool, Any]],
    finish: Callable[[], object],
) -> None:  # pragma: no cover - runs in the helper
    chunk: list[Any] = []
    for index in range(count - 1, -1, -1):
        marks[_BACK] = index  # taken (the daemon's claim reads it)
        if index < marks[_FRONT]:  # the daemon took it already
            break
        urgent, record = look(index)
        chunk.append((index, record))
        if urgent or len(chunk) >= _CHUNK:
            send(fd, ("records", chunk))
            chunk = []
    if chunk:
        send(fd, ("records", chunk))
    send(fd, ("end", finish()))
