"""The watch daemon: one loop that keeps every declared binary's capabilities.

Start: load the state, watch every directory on every declared path, reconcile
everything, then ``READY=1``. The loop sleeps in one ``poll()`` on the inotify
descriptor and a signal wake-up pipe, with a timeout that is the nearest of:
the next periodic rescan, the next watchdog ping, a write that is settling, a
refused or failed entry's next retry, a due status file write. Nothing else
wakes it: events on names no route goes through are read and dropped without
the loop's bookkeeping, and a change after a quiet moment writes the status
file in the same wake-up (only a burst leaves one write for later).

Each batch of events is coalesced: every affected entry is reconciled once,
through the same :func:`capkeeper.reconcile.reconcile` as ``apply``. A write in
progress (``IN_MODIFY``, or a file just created) is acted on at
``IN_CLOSE_WRITE``, a rename, or after ``settle_time`` without events. A
change to a directory or symlink on a path re-plans that path's watches.
``IN_Q_OVERFLOW``, a newly failed watch, a reload and the periodic rescan
reconcile everything.

Per entry the daemon remembers the last verdict and logs only changes, so a
refused or missing binary is reported once, not at every rescan; refused and
failed entries are retried with a growing delay, never in a tight loop. Our
own ``setxattr`` raises ``IN_ATTRIB``: the re-check finds the file in sync and
logs at debug only.

Signals only set flags (the wake-up pipe interrupts the poll): SIGHUP reloads
the state atomically (an invalid state is rejected and the old one stays),
SIGTERM and SIGINT stop cleanly.
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
import select
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

from capkeeper.capabilities import kernel_last_cap
from capkeeper.errors import CapkeeperError, StateError
from capkeeper.files import Observation, posixjoin
from capkeeper.log import get_logger
from capkeeper.mounts import MountWatch
from capkeeper.notify import Notifier
from capkeeper.reconcile import Decision, Outcome, Status, log_outcome, reconcile
from capkeeper.schedule import Brake, Identity, identity_of, retry_delay
from capkeeper.settings import Settings
from capkeeper.state import Entry, State, load_state
from capkeeper.status import StatusBook, write_metrics, write_status
from capkeeper.watcher import (
    Link,
    Route,
    Watcher,
    WatchEvent,
    WatchFailure,
    WatchPlan,
    plan_route,
)

CAP_SETFCAP = 31
DAEMON_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT, signal.SIGHUP})
# Causes that announce new content or another inode at the path (not just attributes).
_ANNOUNCED = frozenset(
    {"IN_MOVED_TO", "IN_MOVED_FROM", "IN_DELETE", "IN_CREATE", "IN_CLOSE_WRITE", "IN_MODIFY"}
)
_FIGHT_PACE = 0.1  # seconds inotify is left unread after a batch that only deferred
# Refusals that a file caught in the middle of a write would also get, and how long
# such a refusal must persist, without write events, before it is reported.
_CONTENT_RULES = frozenset({"elf", "sha256", "interpreter"})
_CONFIRM_REFUSAL = 1.0
_MAX_POLL_MS = 86_400_000  # poll() takes a C int of milliseconds
_REPLAN_ROUNDS = 3  # directories vanishing while being watched: re-plan at most this often
# The status snapshot costs ~20 ms of CPU per 1,000 entries: write it once events have
# been quiet for a moment, at most once a second, and at the latest after a few seconds.
_STATUS_QUIET = 0.2
_STATUS_EVERY = 1.0
_STATUS_STALE = 5.0
# Anyone can overflow the queue of a directory others can write to, as often as they
# like: warn about it at most this often (seconds); the rescans it causes are cheap.
_EXPOSED_OVERFLOW_WARN_EVERY = 60.0


class PrivilegeError(CapkeeperError):
    """The daemon lacks what it needs to write ``security.capability``."""


def effective_capabilities(status_path: str = "/proc/self/status") -> int:
    """This process's effective capability set (``CapEff:``) as a bit mask."""
    with open(status_path, encoding="ascii") as handle:
        for line in handle:
            if line.startswith("CapEff:"):
                return int(line.split(":", 1)[1].strip(), 16)
    raise PrivilegeError(f"no CapEff line in {status_path}")


def require_setfcap(status_path: str = "/proc/self/status") -> None:
    """Raise :class:`PrivilegeError` unless CAP_SETFCAP is in the effective set."""
    try:
        effective = effective_capabilities(status_path)
    except OSError as exc:
        raise PrivilegeError(f"cannot read {status_path}: {exc.strerror}") from exc
    if not effective >> CAP_SETFCAP & 1:
        who = "root" if os.geteuid() == 0 else f"uid {os.geteuid()}"
        raise PrivilegeError(
            "capkeeper watch needs the CAP_SETFCAP capability to restore "
            f"security.capability, and this process ({who}) does not have it "
            f"(effective capabilities: {effective:#x})",
            hint="run it as root (sudo), or grant only that capability, as the shipped "
            "unit does: AmbientCapabilities=CAP_SETFCAP",
        )


@dataclass
class _Tracked:
    """What the daemon remembers about one declared binary between checks."""

    status: Status | None = None
    detail: str = ""
    failures: int = 0  # consecutive refused/failed verdicts
    retry_at: float = 0.0  # monotonic; events before this are deferred
    identity: Identity | None = None  # the file at the last check
    brake: Brake = field(default_factory=Brake)


@dataclass(frozen=True)
class _Drift:
    path: str
    status: str
    found: str
    expected: str
    cause: str
    at: str  # wall clock, ISO 8601


class Daemon:
    """The ``capkeeper watch`` loop. :meth:`run` returns when asked to stop."""

    def __init__(
        self,
        settings: Settings,
        *,
        logger: Any = None,
        notifier: Notifier | None = None,
        clock: Callable[[], float] = time.monotonic,
        install_signals: bool | None = None,
    ) -> None:
        self._settings = settings
        self._log = logger if logger is not None else get_logger()
        self._owns_notifier = notifier is None
        self._notify = notifier if notifier is not None else Notifier(self._log)
        self._clock = clock
        self._install_signals = (
            threading.current_thread() is threading.main_thread()
            if install_signals is None
            else install_signals
        )
        self._stop = False
        self._reload = False
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._last_cap = kernel_last_cap()
        self._state = State(entries=(), files=())
        self._entries: dict[str, Entry] = {}
        self._plan = WatchPlan()
        self._watcher: Watcher | None = None
        self._mounts: MountWatch | None = None
        self._exposed_warned = -math.inf
        self._exposed_overflows = 0  # since the last warning
        self._tracked: dict[str, _Tracked] = {}
        self._verdicts: Counter[Status] = Counter()  # entries per last verdict
        self._settle: dict[str, tuple[float, str]] = {}  # writes in progress: deadline, cause
        self._deferred: dict[str, str] = {}  # refused/failed entries touched again: cause
        self._failed_watches: dict[str, int] = {}
        self._route_problems: dict[str, str] = {}  # paths not watchable to their end
        self._quiet_until = 0.0  # inotify is left unread until then (a fight's noise)
        self._paused = False
        self._batch = Counter[str]()  # what the current batch of events led to
        self._watcher_dirty = False  # a watch was dropped: sync even if no route changed
        interval = self._notify.watchdog_interval
        self._next_ping = clock() if interval else math.inf
        self._last_drift: _Drift | None = None
        self._rejected: tuple[str, list[str]] | None = None
        self._book = StatusBook(rescan_interval=settings.rescan_interval)
        self._published_status = ""
        self._status_written = -math.inf
        self._dirty_since: float | None = None
        self._last_activity = -math.inf
        self._isolated = False  # the last inotify wake-up came after a quiet moment
        self._status_error: str | None = None
        self.ready = threading.Event()  # set after READY=1, for in-process callers

    # -- control (thread-safe; signal handlers only set the same flags) ----------------

    def request_stop(self) -> None:
        self._stop = True
        self._wake()

    def request_reload(self) -> None:
        self._reload = True
        self._wake()

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.write(self._wake_w, b"\0")

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        if signum == signal.SIGHUP:
            self._reload = True
        else:
            self._stop = True

    @contextlib.contextmanager
    def _signal_handling(self) -> Iterator[None]:
        if not self._install_signals:
            yield
            return
        previous = {sig: signal.signal(sig, self._on_signal) for sig in DAEMON_SIGNALS}
        # The C-level handler writes the signal number here, waking the poll.
        old_fd = signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        # ``capkeeper watch`` blocks these while Python imports (capkeeper.__main__): the
        # kernel keeps a signal sent meanwhile pending, and delivers it here, handled.
        old_mask = signal.pthread_sigmask(signal.SIG_UNBLOCK, DAEMON_SIGNALS)
        try:
            yield
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
            signal.set_wakeup_fd(old_fd)
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    # -- lifecycle ---------------------------------------------------------------------

    def run(self) -> int:
        """Load the state, watch and reconcile until stopped; return the exit status (0).

        The signal handlers come first: a SIGHUP during start-up is a reload once
        started, a SIGTERM stops it cleanly.
        """
        try:
            with self._signal_handling():
                state = load_state(self._settings.state)  # StateError: the caller reports it
                self._run(state)
        finally:
            if self._mounts is not None:
                self._mounts.close()
            os.close(self._wake_r)
            os.close(self._wake_w)
            if self._owns_notifier:
                self._notify.close()
        return 0

    def _run(self, state: State) -> None:
        with Watcher() as watcher:
            self._watcher = watcher
            self._start(state)
            self._loop(watcher)
            self._log.info("daemon_stopping", entries=len(self._entries))
            self._notify.stopping("stopping")
            if self._book.dirty:
                self._write_status()

    def _start(self, state: State) -> None:
        self._mounts = self._watch_mounts()  # before the first plan: no mount goes unseen
        self._install(state)
        self._log.info(
            "state_loaded", entries=len(state.entries), files=", ".join(map(str, state.files))
        )
        self._full_reconcile("startup")
        self._log.info(
            "daemon_started",
            entries=len(self._entries),
            directories=len(self._plan.directories()),
            watches=self._watcher_count(),
            rescan_interval=self._settings.rescan_interval,
        )
        # Start-up objects (modules, the state, the plan) live until exit: keep them out of
        # the cyclic collector, whose full pass over them stalls the loop (~25 ms measured
        # with 1,000 entries; ~0 once frozen).
        gc.collect()
        gc.freeze()
        self._published_status = self._status_text()
        self._notify.ready(self._published_status)
        self._publish()
        self.ready.set()

    def _loop(self, watcher: Watcher) -> None:
        poller = select.poll()
        inotify_fd = watcher.fileno()
        poller.register(inotify_fd, select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        mounts_fd = -1
        if self._mounts is not None:
            mounts_fd = self._mounts.fileno()
            poller.register(mounts_fd, select.POLLPRI)  # see MountWatch: never POLLIN
        next_rescan = self._clock() + self._settings.rescan_interval
        while not self._stop:
            self._tick()
            self._pace(poller, inotify_fd)
            ready, events, woke = self._wait(poller, watcher, self._timeout_ms(next_rescan))
            if inotify_fd in ready:
                self._isolated = woke - self._last_activity >= _STATUS_QUIET
                self._last_activity = woke
            if self._wake_r in ready:
                self._drain_wake()
            if self._stop:
                break
            if self._reload:
                self._reload = False
                self._do_reload()
                next_rescan = self._clock() + self._settings.rescan_interval
            if mounts_fd in ready:
                self._mounts_changed(woke)
            if inotify_fd in ready:
                self._handle(watcher.read(self._plan) if events is None else events, woke)
            self._run_due()
            if self._clock() >= next_rescan:
                self._full_reconcile("periodic")
                next_rescan = self._clock() + self._settings.rescan_interval
            self._publish()

    def _wait(
        self, poller: select.poll, watcher: Watcher, timeout_ms: int
    ) -> tuple[set[int], list[WatchEvent] | None, float]:
        """Poll until the loop has work: a deadline, a signal, the mount table, or inotify
        events some route cares about; return what is ready, the events if already read,
        and when it woke.

        A batch with nothing but events on names no route goes through (anyone who can
        write to a watched directory can raise them as fast as the kernel queues them) is
        read and dropped here, without the loop's bookkeeping, until the deadline.
        """
        inotify_fd = watcher.fileno()
        deadline = self._clock() + timeout_ms / 1000
        while True:
            ready = {fd for fd, _ in poller.poll(timeout_ms)}
            woke = self._clock()
            if ready != {inotify_fd}:
                return ready, None, woke
            events = watcher.read(self._plan)
            if events or woke >= deadline:
                return ready, events, woke
            timeout_ms = max(0, math.ceil((deadline - woke) * 1000))

    def _timeout_ms(self, next_rescan: float) -> int:
        deadlines = [next_rescan, self._next_ping]
        deadlines.extend(deadline for deadline, _ in self._settle.values())
        deadlines.extend(self._tracked[p].retry_at for p in self._deferred if p in self._tracked)
        deadlines.append(self._status_deadline())
        if self._quiet_until:
            deadlines.append(self._quiet_until)
        delay = min(deadlines) - self._clock()
        return min(max(0, math.ceil(delay * 1000)), _MAX_POLL_MS)

    def _tick(self) -> None:
        """Ping the watchdog when due (also called inside long reconciles)."""
        interval = self._notify.watchdog_interval
        if interval and self._clock() >= self._next_ping:
            self._notify.watchdog()
            self._next_ping = self._clock() + interval

    def _pace(self, poller: select.poll, inotify_fd: int) -> None:
        """Stop reading inotify for a moment after a batch that only deferred entries.

        A process that sets and strips the xattr in a loop (a fight), or touches a
        refused file in a loop, raises IN_ATTRIB as fast as the daemon can read them;
        each is merely deferred (brake or back-off), but reading them one by one would
        cost a core. While unread, the kernel merges repeated identical events
        (inotify(7)), so little queues up; other entries' events wait at most
        :data:`_FIGHT_PACE` longer, and only while such a flood lasts.
        """
        quiet = self._clock() < self._quiet_until
        if quiet != self._paused:
            poller.modify(inotify_fd, 0 if quiet else select.POLLIN)
            self._paused = quiet
        if not quiet:
            self._quiet_until = 0.0

    def _drain_wake(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while os.read(self._wake_r, 512):
                pass

    # -- state and plan ----------------------------------------------------------------

    def _install(self, state: State) -> None:
        keep = {entry.path for entry in state.entries}
        for path in self._plan.paths - keep:
            self._plan.remove(path)
            self._route_problems.pop(path, None)
            gone = self._tracked.pop(path, None)
            if gone is not None and gone.status is not None:
                self._verdicts[gone.status] -= 1
            self._settle.pop(path, None)
            self._deferred.pop(path, None)
        self._state = state
        self._entries = state.by_path()
        self._book.load({e.path: e.caps_text for e in state.entries}, [str(f) for f in state.files])

    def _do_reload(self) -> None:
        self._notify.reloading()
        try:
            state = load_state(self._settings.state)
        except Exception as exc:
            # A reload only replaces a working state: anything that stops loading
            # the new one (a problem, or a fault the loader did not foresee) keeps
            # the old state enforced rather than ending the daemon.
            if isinstance(exc, StateError):
                problems = exc.problems
            elif isinstance(exc, CapkeeperError):
                problems = [str(exc)]
            else:
                problems = [f"cannot load: {exc.__class__.__name__}: {exc}"]
            self._rejected = (time.strftime("%H:%M:%S"), problems)
            self._log.error("state_rejected", error="; ".join(problems), problems=problems)
            self._book.rejected_reloads += 1
            self._book.last_error = "state rejected: " + "; ".join(problems)
            self._book.dirty = True
            self._notify.ready(self._status_text())
            return
        self._rejected = None
        self._book.reloads += 1
        self._install(state)
        self._log.info(
            "state_loaded", entries=len(state.entries), files=", ".join(map(str, state.files))
        )
        self._full_reconcile("reload")
        self._notify.ready(self._status_text())

    def _active_watcher(self) -> Watcher:
        if self._watcher is None:
            raise RuntimeError("the daemon is not running")
        return self._watcher

    def _watcher_count(self) -> int:
        return self._watcher.watch_count if self._watcher is not None else 0

    def _replan(self, paths: Iterable[str]) -> bool:
        """Re-resolve ``paths`` and watch what they now go through.

        Returns True when a watch failed that had not failed before (the
        caller then reconciles everything: changes there are invisible).
        """
        watcher = self._active_watcher()
        todo = {p for p in paths if p in self._entries}
        changed = False
        new_failure = False
        for _ in range(_REPLAN_ROUNDS):
            for path in todo:
                route = plan_route(path)
                changed |= self._plan.set_route(route)
                self._note_route(route)
            if not changed and not self._watcher_dirty:
                break
            self._watcher_dirty = False
            failures = watcher.sync(self._plan.directories())
            new_failure |= self._note_failures(failures)
            vanished = [f for f in failures if f.vanished]
            if not vanished:
                break
            todo = set().union(*(self._plan.through(f.directory) for f in vanished))
            changed = False
            self._watcher_dirty = True
        return new_failure

    def _note_route(self, route: Route) -> None:
        """Report once a path whose route cannot be watched to its end (PATH_MAX)."""
        if not route.problem:
            self._route_problems.pop(route.path, None)
            return
        if self._route_problems.get(route.path) != route.problem:
            directory = route.links[-1].directory if route.links else "/"
            self._book.last_error = f"cannot watch {route.path}: {route.problem}"
            self._log.error(
                "watch_failed", directory=directory, path=route.path, reason=route.problem
            )
        self._route_problems[route.path] = route.problem

    def _note_failures(self, failures: list[WatchFailure]) -> bool:
        current = {f.directory: f for f in failures if not f.vanished}
        new = False
        for directory, failure in current.items():
            if self._failed_watches.get(directory) != failure.errno:
                new = True
                self._book.last_error = f"cannot watch {directory}: {failure.reason}"
                self._log.error(
                    "watch_failed",
                    directory=directory,
                    reason=failure.reason,
                    errno=failure.errno,
                    entries=len(self._plan.through(directory)),
                )
        for directory in set(self._failed_watches) - set(current):
            if directory in (self._watcher.directories if self._watcher else ()):
                self._log.info("watch_recovered", directory=directory)
        self._failed_watches = {d: f.errno for d, f in current.items()}
        return new

    # -- events ------------------------------------------------------------------------

    def _handle(self, events: list[WatchEvent], woke: float) -> None:
        """Coalesce one batch of events and reconcile every affected entry once."""
        watcher = self._active_watcher()
        overflow = exposed_overflow = False
        replan: set[str] = set()
        ready: dict[str, str] = {}
        for event in events:
            if event.is_overflow:
                if event.exposed:
                    exposed_overflow = True
                else:
                    overflow = True
                continue
            if event.is_directory_gone:
                self._watcher_dirty |= watcher.invalidate(event.directory)
                for path in self._plan.through(event.directory):
                    replan.add(path)
                    self._note(path, None, event, woke, ready)
                continue
            for path, link in self._plan.lookup(event.directory, event.name).items():
                if event.is_namespace or not link.final:
                    replan.add(path)
                    if not link.final and event.is_namespace:
                        self._watcher_dirty |= watcher.invalidate(event.path)
                    elif not link.final and event.is_attrib:
                        # A new owner or mode may move the directory to the other queue.
                        self._watcher_dirty |= bool(watcher.revalidate([event.path]))
                self._note(path, link, event, woke, ready)
        if overflow:
            self._log.warning("queue_overflow", events=len(events))
            self._book.overflows += 1
            self._full_reconcile("overflow", since=woke)
            return
        if replan and self._replan(replan):
            self._full_reconcile("watch_failed", since=woke)
            return
        self._batch.clear()
        if exposed_overflow:
            for path in self._exposed_overflow(woke):
                ready.pop(path, None)
        for path, cause in ready.items():
            self._check_or_defer(path, cause, woke)
            self._tick()
        if self._batch["deferred"] and not self._batch["checked"] and not replan:
            self._quiet_until = woke + _FIGHT_PACE

    def _exposed_overflow(self, since: float) -> set[str]:
        """The queue of the directories others can write to overflowed: rescan what it covers.

        Only events on names inside those directories were lost. A declared
        binary there is reconciled. A directory there is watched on its own
        (on whichever queue suits it), so only its identity can have changed
        unseen: it is re-validated. A symlink or missing name there is
        re-planned. Returns the entries reconciled.
        """
        watcher = self._active_watcher()
        now = self._clock()
        self._book.overflows += 1
        self._exposed_overflows += 1
        if now - self._exposed_warned >= _EXPOSED_OVERFLOW_WARN_EVERY:
            self._log.warning(
                "queue_overflow",
                queue="exposed",
                overflows=self._exposed_overflows,
                directories=", ".join(sorted(watcher.exposed_directories)),
            )
            self._exposed_warned, self._exposed_overflows = now, 0
        check: set[str] = set()
        replan: set[str] = set()
        looks: set[str] = set(watcher.exposed_directories)
        watched = watcher.directories
        for directory in watcher.exposed_directories:
            for path, link in self._plan.links_in(directory):
                if link.final:
                    check.add(path)
                elif (child := posixjoin(directory, link.name)) in watched:
                    looks.add(child)
                else:
                    replan.add(path)
        for directory in watcher.revalidate(looks):
            self._watcher_dirty = True
            check |= self._plan.through(directory)
        before = {path: self._plan.route(path) for path in replan}
        if self._replan(replan | check):
            self._full_reconcile("watch_failed", since=since)
            return set(self._entries)
        check |= {path for path, route in before.items() if self._plan.route(path) != route}
        self._rescan(check, "overflow", since=since, scope="exposed")
        return check

    def _mounts_changed(self, since: float) -> None:
        """The mount table changed: re-watch and reconcile the routes the change reaches.

        inotify sees no mounts: a mount over a watched directory, or over one
        of its parents, hides the watched inode (its watch then reports on
        nothing anybody reaches), and an unmount reveals another directory.
        Every route through a changed mount point is re-watched and its entry
        reconciled; every watched directory is re-validated too (a mount id can
        be reused for a new mount on the same point).
        """
        watcher = self._active_watcher()
        if self._mounts is None:
            return
        try:
            points = self._mounts.changed()
        except (OSError, ValueError) as exc:
            self._log.warning("mount_watch_failed", error=str(exc))
            self._full_reconcile("mount", since=since)
            return
        affected: set[str] = set()
        for point in points:
            self._watcher_dirty |= watcher.invalidate(point)
            affected |= self._plan.at_or_below(point)
        for directory in watcher.revalidate():
            self._watcher_dirty = True
            affected |= self._plan.through(directory)
        self._log.debug("mounts_changed", mount_points=sorted(points), entries=len(affected))
        if not affected and not self._watcher_dirty:
            return
        if self._replan(affected):
            self._full_reconcile("watch_failed", since=since)
            return
        self._rescan(affected, "mount", since=since, mount_points=", ".join(sorted(points)))

    def _rescan(self, paths: Iterable[str], cause: str, *, since: float, **fields: Any) -> None:
        """Reconcile ``paths`` (part of the state) and log one ``rescan`` event for them."""
        started = self._clock()
        counts: dict[str, int] = {}
        todo = sorted(p for p in paths if p in self._entries)
        for path in todo:
            if self._stop:
                break
            outcome = self._check_entry(path, cause, since)
            if outcome is not None:
                counts[str(outcome.status)] = counts.get(str(outcome.status), 0) + 1
            self._tick()
        self._book.dirty = True
        # Anyone can cause overflow rescans: log them above debug only when they found drift.
        quiet = cause == "overflow" and set(counts) <= {str(Status.IN_SYNC)}
        (self._log.debug if quiet else self._log.info)(
            "rescan",
            cause=cause,
            entries=len(todo),
            duration_ms=round((self._clock() - started) * 1000, 3),
            **fields,
            **{k.replace("-", "_"): v for k, v in counts.items()},
        )

    def _watch_mounts(self) -> MountWatch | None:
        try:
            return MountWatch()
        except (OSError, ValueError) as exc:
            self._log.warning("mount_watch_failed", error=str(exc))
            return None

    def _note(
        self, path: str, link: Link | None, event: WatchEvent, woke: float, ready: dict[str, str]
    ) -> None:
        """Decide whether ``event`` makes ``path`` ready now or after its write settles."""
        final = link is not None and link.final
        if final and (event.is_write or event.is_created):
            # Data is being written (or a new file is about to be): wait for the close.
            self._settle[path] = (woke + self._settings.settle_time, event.cause)
            ready.pop(path, None)
            return
        if final and path in self._settle and not (event.is_write_closed or event.is_namespace):
            return  # e.g. the writer's fchmod: the close will follow
        self._settle.pop(path, None)
        if path not in ready or _announced(event.cause):
            ready[path] = event.cause  # the most telling cause of the batch

    def _run_due(self) -> None:
        now = self._clock()
        for path, (deadline, cause) in list(self._settle.items()):
            if deadline <= now:
                del self._settle[path]
                self._check_or_defer(path, f"{cause}+settle", deadline)
        for path, cause in list(self._deferred.items()):
            tracked = self._tracked.get(path)
            if tracked is None or tracked.retry_at <= now:
                del self._deferred[path]
                if path not in self._settle:  # being written: its close or settle checks it
                    self._check_entry(path, cause, None)

    def _check_or_defer(self, path: str, cause: str, since: float | None) -> None:
        """Check ``path`` now, or when its back-off ends if nothing new is at the path.

        A refused or failed entry waits unless the event announces a new file or new
        content; a braked entry (a fight) waits unless the file is no longer the one
        we restored: a new deploy is never held back by either.
        """
        tracked = self._tracked.get(path)
        if tracked is not None and tracked.retry_at > self._clock():
            if tracked.status is Status.RESTORED:
                fresh = self._stat_identity(path) != tracked.brake.restored
            else:
                fresh = _announced(cause)
            if not fresh:
                self._deferred.setdefault(path, cause)
                self._batch["deferred"] += 1
                return
        self._batch["checked"] += 1
        self._check_entry(path, cause, since)

    @staticmethod
    def _stat_identity(path: str) -> Identity | None:
        """The identity of what ``path`` names now, from one stat() (None if it cannot)."""
        try:
            st = os.stat(path)
        except (OSError, ValueError):
            return None
        return Identity(
            st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_uid, st.st_gid, st.st_mode
        )

    # -- reconciling -------------------------------------------------------------------

    def _full_reconcile(self, cause: str, *, since: float | None = None) -> None:
        started = self._clock()
        self._watcher_dirty = True  # also retries watches that failed before
        # A watch on a directory hidden by a mount (or replaced unseen) keeps its path
        # string: compare the inode it watches with what the path reaches now.
        self._active_watcher().revalidate()
        self._replan(self._entries)
        self._deferred.clear()  # every entry is checked now; failed ones re-queue themselves
        counts: dict[str, int] = {}
        for entry in self._state.entries:
            if self._stop:
                break
            outcome = self._check_entry(entry.path, cause, since)
            if outcome is not None:
                counts[str(outcome.status)] = counts.get(str(outcome.status), 0) + 1
            self._tick()
        self._book.rescans += 1
        self._book.dirty = True
        quiet = cause == "periodic" and set(counts) <= {str(Status.IN_SYNC)}
        (self._log.debug if quiet else self._log.info)(
            "rescan",
            cause=cause,
            entries=len(self._state.entries),
            duration_ms=round((self._clock() - started) * 1000, 3),
            **{k.replace("-", "_"): v for k, v in counts.items()},
        )

    def _check_entry(self, path: str, cause: str, since: float | None) -> Outcome | None:
        entry = self._entries.get(path)
        if entry is None:
            return None
        self._deferred.pop(path, None)
        tracked = self._tracked.get(path)
        known = tracked.identity if tracked is not None else None
        announced = _announced(cause)

        def hold(observation: Observation, decision: Decision) -> bool:
            """Whether the file may be in the middle of a write: wait for its close or
            the settle time, as after IN_MODIFY (a settle time's end is not held again)."""
            if cause.endswith("+settle"):
                return False
            seen = identity_of(observation)
            if (
                not announced
                and known is not None
                and (known.dev, known.ino) == (seen.dev, seen.ino)
                and not known.same_content(seen)
            ):
                # Nothing told us the content changed, yet it did: a write we have not
                # seen finish (write(2) strips, updates mtime, and queues IN_MODIFY last).
                # Only the same inode can be mid-write: another inode at the path (a
                # mount over a directory, a rename) is a complete file of its own.
                return True
            # A file truncated or half written by the next deploy reads as "not an ELF"
            # (or a pin mismatch) before that deploy's IN_MODIFY is even queued: ext4
            # sets i_size inside ->setattr and notify_change() queues the event after.
            # Such a refusal is reported only if it still holds after _CONFIRM_REFUSAL
            # without write events. Residual window: a deploy stalled in the kernel for
            # longer than that between changing the file and queuing its event.
            return decision.status is Status.REFUSED and any(
                r.rule in _CONTENT_RULES for r in decision.refusals
            )

        try:
            outcome = reconcile(entry, write=True, last_cap=self._last_cap, hold=hold)
        except Exception as exc:  # a bug on one file must not stop enforcing all the others
            self._log.exception("reconcile_crashed", path=path, cause=cause)
            outcome = Outcome(
                entry, Status.FAILED, "unknown", reason=f"internal error: {exc!r} (please report)"
            )
        if outcome.held:
            wait = self._settings.settle_time
            if outcome.status is Status.REFUSED:
                wait = max(wait, _CONFIRM_REFUSAL)
            # setdefault: a rescan or an attribute event must not postpone it forever.
            self._settle.setdefault(path, (self._clock() + wait, cause))
            self._log.debug("write_in_progress", path=path, cause=cause, found=outcome.found)
            return None
        self._report(outcome, cause, since)
        return outcome

    def _report(self, outcome: Outcome, cause: str, since: float | None) -> None:
        now = self._clock()
        path = outcome.entry.path
        tracked = self._tracked.setdefault(path, _Tracked())
        status = outcome.status
        detail = outcome.reason or outcome.found
        fields: dict[str, Any] = {"cause": cause}
        if since is not None and status is Status.RESTORED:
            fields["latency_ms"] = round((now - since) * 1000, 3)
        if status is Status.RESTORED:
            log_outcome(self._log, outcome, **fields)
            self._last_drift = _Drift(
                path,
                "tampering" if outcome.extra else str(status),
                outcome.found,
                outcome.expected,
                cause,
                time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            )
        elif status is Status.IN_SYNC and tracked.status is not None and not tracked.status.ok:
            self._log.info("capability_in_sync", **outcome.fields(), **fields)
        elif status is Status.IN_SYNC or (status, detail) != (tracked.status, tracked.detail):
            log_outcome(self._log, outcome, **fields)
        else:
            self._log.debug("verdict_unchanged", path=path, status=str(status), cause=cause)
        observed = outcome.observation
        tracked.identity = identity_of(observed) if observed is not None else None
        tracked.retry_at = self._retry_at(tracked, status, now, outcome)
        if status is Status.FAILED:
            # EROFS, ENOSPC, EIO: the fix (a remount, freed space) raises no event.
            self._deferred.setdefault(path, "retry")
        if tracked.status is not status:
            if tracked.status is not None:
                self._verdicts[tracked.status] -= 1
            self._verdicts[status] += 1
        tracked.status, tracked.detail = status, detail
        self._book.record(outcome, cause=cause)

    def _retry_at(self, tracked: _Tracked, status: Status, now: float, outcome: Outcome) -> float:
        """When events may trigger this entry's next check: refused and failed entries
        wait with a doubling delay; a fought-over file is restored at most once per
        :data:`capkeeper.schedule.BRAKE` (see :mod:`capkeeper.schedule`)."""
        # Capabilities changed again right after our write, on a file we saw: a restore
        # undone at once, braked like any other round of a fight (not backed off).
        undone = status is Status.FAILED and outcome.transient and tracked.identity is not None
        if status in (Status.REFUSED, Status.FAILED) and not undone:
            tracked.failures += 1
            return now + retry_delay(tracked.failures)
        tracked.failures = 0
        if not (status is Status.RESTORED or undone) or tracked.identity is None:
            return 0.0
        verdict = tracked.brake.restore(tracked.identity, now)
        if verdict.alert:
            self._log.warning(
                "restore_flapping",
                path=outcome.entry.path,
                restores=verdict.rounds + 1,
                found=outcome.found,
                expected=outcome.expected,
                hint="something keeps undoing the restore of an unchanged file: another "
                "declared path resolving to the same file with other capabilities, or a "
                "process stripping them in a loop; capkeeper now restores it at most once "
                "a second and says so at most once a minute",
            )
        return verdict.not_before

    # -- reporting ---------------------------------------------------------------------

    def _status_text(self) -> str:
        text = (
            f"watching {len(self._entries)} binaries in {len(self._plan.directories())} "
            f"directories ({self._watcher_count()} inotify watches)"
        )
        trouble = [
            f"{self._verdicts[s]} {s}"
            for s in (Status.REFUSED, Status.FAILED, Status.MISSING)
            if self._verdicts[s]
        ]
        if trouble:
            text += "; " + ", ".join(trouble)
        drift = self._last_drift
        if drift is not None:
            text += f"; last drift {drift.at[11:19]} {drift.path} {drift.status} ({drift.cause})"
        else:
            text += "; no drift seen"
        if self._rejected is not None:
            at, problems = self._rejected
            text += (
                f"; state reload rejected at {at} ({len(problems)} problem"
                f"{'s' if len(problems) != 1 else ''}: {problems[0]}), previous state in force"
            )
        return text

    def _publish(self) -> None:
        """Tell systemd and the status file what changed, if anything did."""
        text = self._status_text()
        if text != self._published_status:
            self._published_status = text
            self._notify.status(text)
        watches = self._watcher_count()
        if self._book.watches != watches:
            self._book.watches = watches
            self._book.dirty = True
        if self._book.dirty and self._dirty_since is None:
            self._dirty_since = self._clock()
        if self._clock() >= self._status_deadline():
            self._write_status()

    def _status_deadline(self) -> float:
        """When the status file is due: never while clean; after a quiet moment when dirty."""
        if not self._book.dirty or self._dirty_since is None:
            return math.inf
        every = self._status_written + _STATUS_EVERY
        if self._isolated:
            # Activity after a quiet moment (one deploy): write at the end of this very
            # wake-up, after its restores, rather than wake up again for it later.
            return every
        quiet = max(self._last_activity + _STATUS_QUIET, every)
        return min(quiet, self._dirty_since + _STATUS_STALE)

    def _write_status(self) -> None:
        """Write the status (and metrics) files now."""
        self._status_written = self._clock()
        self._dirty_since = None
        targets = [(self._settings.status_file, write_status)]
        if self._settings.metrics_file is not None:
            targets.append((self._settings.metrics_file, write_metrics))
        for target, writer in targets:
            try:
                writer(target, self._book)
            except OSError as exc:
                error = f"{target}: {exc.strerror or exc}"
                if error != self._status_error:
                    self._log.warning("status_file_failed", file=str(target), error=error)
                self._status_error = error
        self._book.dirty = False


def _announced(cause: str) -> bool:
    """Whether ``cause`` (``IN_MODIFY+settle`` counts as ``IN_MODIFY``) announces new
    content or another inode at the path, rather than an attribute change or a rescan."""
    return cause.split("+", 1)[0] in _ANNOUNCED


def watch(
    settings: Settings,
    *,
    rescan_interval: float | None = None,
    settle_time: float | None = None,
    status_file: str | None = None,
    metrics_file: str | None = None,
) -> int:
    """``capkeeper watch``: check privileges, apply command-line overrides, run the daemon."""
    require_setfcap()
    overrides: dict[str, Any] = {
        key: value
        for key, value in (
            ("rescan_interval", rescan_interval),
            ("settle_time", settle_time),
            ("status_file", status_file),
            ("metrics_file", metrics_file),
        )
        if value is not None
    }
    if overrides:
        settings = Settings(**{**settings.model_dump(), **overrides})
    return Daemon(settings).run()
