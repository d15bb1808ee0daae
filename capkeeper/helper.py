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
which ones the helper reported, checks itself any entry neither did, and never
reports one twice. A check is idempotent: an entry both checked is one restore
and one "in sync".

If the helper fails in any way (it exits early, sends something unexpected),
the daemon checks itself every entry the helper did not report, and says so.
The helper sends an outcome other than "in sync" as soon as it has it, so a
failure can lose at most the alert of the one restore in flight, never the
restore.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import select
import signal
import warnings
from collections.abc import Callable, Iterator
from typing import Any

from capkeeper.frames import receive, send

__all__ = ["MIN_ENTRIES", "Helper", "helper_worth"]

MIN_ENTRIES = 1000  # below this the fork and the hand-over cost more than they save
# The shared page holds two marks (see claim()): [_FRONT], the entry after the last one
# the daemon took; [_BACK], the last one the helper took. Each writes only its own, as
# one aligned 8-byte store (a memoryview item: struct.pack_into zeroes the bytes first).
_FRONT, _BACK = 0, 1
_CHUNK = 256  # outcomes "in sync" sent per message
_WAIT = 0.5  # seconds between the daemon's ticks while it waits for the helper


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
        self._page = page
        self._marks = marks
        self.lowest = count  # the helper reported entries lowest.. (it goes backwards)
        self.facts: object = None  # what it sent at the end (the ELF facts it learnt)
        self.failure: str | None = None  # why it failed, once it did
        self.left = 0  # the entries neither had checked then: now the daemon's
        self._done = False

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
        page = mmap.mmap(-1, mmap.PAGESIZE)
        marks = memoryview(page).cast("q")
        marks[_FRONT], marks[_BACK] = 0, count
        read_end, write_end = os.pipe2(os.O_CLOEXEC)
        try:
            with warnings.catch_warnings():
                # Python 3.12+ warns about fork() in a process with threads (the tests
                # run the daemon in one); the helper takes no lock another thread may hold:
                # it neither logs nor writes to a stream, and leaves with os._exit.
                warnings.simplefilter("ignore", DeprecationWarning)
                pid = os.fork()
        except OSError:  # EAGAIN (a task limit), EPERM (a filter): check alone
            os.close(read_end)
            os.close(write_end)
            marks.release()
            page.close()
            return None
        if pid == 0:  # pragma: no cover - the helper; its outcomes are asserted
            code = 70
            try:
                os.close(read_end)
                _become_helper()
                _help(write_end, marks, count, look, finish)
                code = 0
            finally:
                os._exit(code)  # no atexit handler, no flush of the daemon's buffers
        os.close(write_end)
        return cls(pid, read_end, page, marks, count)

    def claim(self, index: int) -> bool:
        """Whether the daemon may check entry ``index`` (its next, in order): not when
        the helper reported it or says it took it. The daemon's mark says it did."""
        if index >= self.lowest:
            return False
        if self.failure is not None:  # everything the helper did not report is the daemon's
            return True
        self._marks[_FRONT] = index + 1
        back: int = self._marks[_BACK]
        return index < back

    def arrived(self) -> Iterator[tuple[int, Any]]:
        """The ``(index, record)`` the helper sent so far, without waiting for more."""
        while not self._done and select.select([self._fd], [], [], 0)[0]:
            yield from self._next()

    def rest(
        self, stopping: Callable[[], bool], tick: Callable[[], None]
    ) -> Iterator[tuple[int, Any]]:
        """Every ``(index, record)`` still to come, until the helper is done or failed (see
        :attr:`failure`), or ``stopping()``; ``tick`` is called while waiting."""
        while not self._done:
            if stopping():
                return
            if select.select([self._fd], [], [], _WAIT)[0]:
                yield from self._next()
            else:
                tick()

    def _next(self) -> Iterator[tuple[int, Any]]:
        try:
            kind, payload = receive(self._fd)
            if kind == "records" and isinstance(payload, list):
                for index, record in payload:
                    if type(index) is not int or not 0 <= index < self.lowest:
                        raise ValueError(f"entry {index!r} out of order")
                    self.lowest = index
                    yield index, record
                return
            if kind != "end":
                raise ValueError(f"a message {kind!r}")
            self.facts = payload
        except EOFError:
            self.abandon(f"it exited before its last entry was reported ({self.lowest})")
            return
        except (ValueError, TypeError) as exc:
            self.abandon(f"it sent something unexpected: {exc}")
            return
        self._done = True

    def abandon(self, reason: str) -> None:
        """Take nothing more from the helper: it failed, for ``reason``."""
        self.failure = reason
        self.left = max(self.lowest - self._marks[_FRONT], 0)
        self._done = True

    def close(self) -> None:
        """Stop the helper if it still runs, reap it and close the pipe."""
        if not self._done:
            self.abandon("the daemon stopped waiting for it")
        os.kill(self.pid, signal.SIGKILL)  # done or not, nothing more of it is needed
        os.waitpid(self.pid, 0)
        os.close(self._fd)
        self._marks.release()
        self._page.close()


def _become_helper() -> None:  # pragma: no cover - runs in the helper
    """Signals as for any process: a stop of the service ends the helper at once (the
    daemon's handlers would only set a flag the helper never reads)."""
    signals = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    for sig in signals:
        signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, signals)
    # The daemon's wake-up pipe is the daemon's (ValueError: forked from another thread
    # than the main one, as in the tests, where there is none).
    with contextlib.suppress(ValueError):
        signal.set_wakeup_fd(-1)


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
