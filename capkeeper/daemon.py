"""The watch daemon's lifecycle: start, the loop, signals, reload and stop.

Start: load the state, watch every directory on every declared path, reconcile
everything, then ``READY=1``. The loop sleeps in one ``poll()`` on the inotify
descriptor, the mount table and a signal wake-up pipe, with a timeout that is
the nearest of: the next periodic rescan, the next watchdog ping, a write that
is settling, a refused or failed entry's next retry, a due status file write.
Nothing else wakes it: events on names no route goes through are read and dropped
without the loop's bookkeeping (a flood of them in batches a millisecond apart), and a
change after a quiet moment writes the status file in the same wake-up (only a burst
leaves one write for later). What happens on a wake-up is the
:class:`~capkeeper.keeper.Keeper`'s; when things are due,
:mod:`capkeeper.schedule`'s; what is shown (the status file, the metrics, the
``STATUS=`` text), the :class:`~capkeeper.status.StatusBook`'s.

Signals only set flags (the wake-up pipe interrupts the poll): SIGHUP reloads
the state atomically (an invalid state is rejected and the old one stays),
SIGTERM and SIGINT stop cleanly; the previous handlers are restored on exit.
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
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any

from capkeeper.cache import Cache
from capkeeper.capabilities import capability_number
from capkeeper.enforce import reconcile
from capkeeper.errors import CapkeeperError, PrivilegeError, StateError
from capkeeper.keeper import Keeper
from capkeeper.kernel import cap_last_cap, effective_capabilities
from capkeeper.log import get_logger
from capkeeper.mounts import MountWatch
from capkeeper.notify import Notifier
from capkeeper.schedule import (
    FLOOD_BURST,
    FLOOD_PAUSE,
    StatusFileTimer,
    flood_pause,
    poll_timeout_ms,
)
from capkeeper.settings import Settings, confirm_settings
from capkeeper.state import State, load_state
from capkeeper.status import StatusBook, status_line, write_metrics, write_status
from capkeeper.watcher import Watcher, WatchEvent

DAEMON_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT, signal.SIGHUP})


def require_setfcap(status_path: str = "/proc/self/status") -> None:
    """Raise :class:`PrivilegeError` unless CAP_SETFCAP is in the effective set."""
    try:
        effective = effective_capabilities(status_path)
    except OSError as exc:
        raise PrivilegeError(f"cannot read {status_path}: {exc.strerror}") from exc
    if not effective >> capability_number("cap_setfcap") & 1:
        who = "root" if os.geteuid() == 0 else f"uid {os.geteuid()}"
        raise PrivilegeError(
            "capkeeper watch needs the CAP_SETFCAP capability to restore "
            f"security.capability, and this process ({who}) does not have it "
            f"(effective capabilities: {effective:#x})",
            hint="run it as root (sudo), or grant only that capability, as the shipped "
            "unit does: AmbientCapabilities=CAP_SETFCAP",
        )


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
        self._notifier = notifier if notifier is not None else Notifier(self._log)
        self._clock = clock
        self._install_signals = (
            threading.current_thread() is threading.main_thread()
            if install_signals is None
            else install_signals
        )
        self._stop = False
        self._reload = False
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._last_cap = cap_last_cap()
        self._book = StatusBook(rescan_interval=settings.rescan_interval)
        self._cache = Cache(
            settings.cache_directory, writable=True, defer=True, debug=self._log.debug
        )
        self._keeper: Keeper | None = None
        self._mounts: MountWatch | None = None
        self._paused = False  # inotify unread for a moment (Keeper.quiet_until)
        interval = self._notifier.watchdog_interval
        self._next_ping = clock() if interval else math.inf
        self._sd_status = ""  # the STATUS= text last sent
        self._status_timer = StatusFileTimer()
        self._status_file_error: str | None = None
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
                # StateError: the caller reports it
                state = load_state(self._settings.state, cache=self._cache)
                self._run(state)
        finally:
            if self._mounts is not None:
                self._mounts.close()
            os.close(self._wake_r)
            os.close(self._wake_w)
            if self._owns_notifier:
                self._notifier.close()
        return 0

    def _run(self, state: State) -> None:
        with Watcher() as watcher:
            self._mounts = self._watch_mounts()  # before the first plan: no mount goes unseen
            keeper = self._keeper = Keeper(
                watcher,
                self._book,
                logger=self._log,
                settle_time=self._settings.settle_time,
                last_cap=self._last_cap,
                clock=self._clock,
                tick=self._tick,
                stopping=lambda: self._stop,
                mounts=self._mounts,
                check=reconcile,
            )
            self._start(keeper, state)
            self._loop(keeper)
            self._log.info("daemon_stopping", entries=len(keeper.entries))
            self._notifier.stopping("stopping")
            if self._book.dirty:
                self._write_status_file()
            self._cache.save_elf_facts()
            self._cache.flush()

    def _start(self, keeper: Keeper, state: State) -> None:
        # Start-up allocates the state, the plan and a record per entry, all kept until
        # exit: the cyclic collector's automatic passes over that growing heap find
        # nothing to free (~0.1 s of full passes with 10,000 entries). It is off until
        # READY=1; the one pass after it frees whatever start-up left behind.
        collecting = gc.isenabled()
        gc.disable()
        try:
            self._start_up(keeper, state)
        finally:
            if collecting:
                gc.enable()
        # Start-up objects (modules, the state, the plan) live until exit: keep them out of
        # the cyclic collector, whose full pass over them stalls the loop (~25 ms measured
        # with 1,000 entries; ~0 once frozen). After READY=1: the kernel queues the events
        # that arrive meanwhile, and the loop reads them next.
        gc.collect()
        gc.freeze()
        self._cache.save_elf_facts()
        self._cache.flush()  # after READY=1: start-up does not wait for the writes

    def _start_up(self, keeper: Keeper, state: State) -> None:
        """Install ``state``, reconcile everything, then send READY=1."""
        keeper.install(state)
        self._cache.load_elf_facts()  # ELF files unchanged since they were cached are not parsed
        keeper.full_reconcile(
            "startup",
            begun=lambda: self._log.info(
                "state_loaded", entries=len(state.entries), files=", ".join(map(str, state.files))
            ),
        )
        self._log.info(
            "daemon_started",
            entries=len(keeper.entries),
            directories=len(keeper.plan.directories()),
            watches=keeper.watcher.watch_count,
            rescan_interval=self._settings.rescan_interval,
        )
        # The sources' check by pydantic-settings ran in a child meanwhile: its verdict
        # comes before READY=1 (a SettingsError ends the daemon with exit status 78).
        confirm_settings()
        self._sd_status = self._status_line()
        self._notifier.ready(self._sd_status)
        keeper.absorb_helper_facts()  # before any event is handled
        self._publish()
        self.ready.set()

    def _loop(self, keeper: Keeper) -> None:
        poller = select.poll()
        inotify_fd = keeper.watcher.fileno()
        poller.register(inotify_fd, select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        mounts_fd = -1
        if self._mounts is not None:
            mounts_fd = self._mounts.fileno()
            poller.register(mounts_fd, select.POLLPRI)  # see MountWatch: never POLLIN
        next_rescan = self._clock() + self._settings.rescan_interval
        while not self._stop:
            self._tick()
            self._pace(keeper, poller, inotify_fd)
            deadlines = [next_rescan, self._next_ping, self._status_timer.deadline()]
            deadlines += keeper.deadlines()
            timeout = poll_timeout_ms(deadlines, self._clock())
            ready, events, woke = self._wait(poller, keeper, timeout)
            if inotify_fd in ready:
                self._status_timer.woke(woke)
            if self._wake_r in ready:
                self._drain_wake()
            if self._stop:
                break
            if self._reload:
                self._reload = False
                self._do_reload(keeper)
                next_rescan = self._clock() + self._settings.rescan_interval
            if mounts_fd in ready:
                keeper.mounts_changed(woke)
            if inotify_fd in ready:
                keeper.handle(keeper.watcher.read(keeper.plan) if events is None else events, woke)
            keeper.run_due()
            if self._clock() >= next_rescan:
                keeper.full_reconcile("periodic")
                next_rescan = self._clock() + self._settings.rescan_interval
            self._publish()

    def _wait(
        self, poller: select.poll, keeper: Keeper, timeout_ms: int
    ) -> tuple[set[int], list[WatchEvent] | None, float]:
        """Poll until the loop has work: a deadline, a signal, the mount table, or inotify
        events some route cares about; return what is ready, the events if already read,
        and when it woke.

        A batch with nothing but events on names no route goes through (anyone who can
        write to a watched directory can raise them as fast as the kernel queues them) is
        read and dropped here, without the loop's bookkeeping, until the deadline. Once
        such batches add up to :data:`~capkeeper.schedule.FLOOD_BURST` bytes in one wait
        (a flood, or much churn beside the declared names), each next one is left to
        gather for :data:`~capkeeper.schedule.FLOOD_PAUSE` and read at once, a pause
        that grows while a slow flood gathers little in it (up to
        :data:`~capkeeper.schedule.FLOOD_PAUSE_MAX`, see
        :func:`~capkeeper.schedule.flood_pause`): an event that matters waits that much
        longer then, and a flood is read in a fraction of the wake-ups. Signals and the
        mount table still wake it meanwhile.
        """
        inotify_fd = keeper.watcher.fileno()
        deadline = self._clock() + timeout_ms / 1000
        dropped = 0  # bytes of the batches of nothing but other names this wait read
        pause_for = FLOOD_PAUSE
        while True:
            ready = {fd for fd, _ in poller.poll(timeout_ms)}
            woke = self._clock()
            if ready != {inotify_fd}:
                return ready, None, woke
            pause = min(pause_for, deadline - woke)
            paused = dropped >= FLOOD_BURST and pause > 0
            if paused:
                poller.modify(inotify_fd, 0)
                try:
                    other = {fd for fd, _ in poller.poll(math.ceil(pause * 1000))}
                finally:
                    poller.modify(inotify_fd, select.POLLIN)
                if other:
                    return other, None, self._clock()
            events = keeper.watcher.read(keeper.plan)
            now = self._clock()
            if events or now >= deadline:
                return ready, events, woke
            dropped += keeper.watcher.bytes_read
            if paused:
                pause_for = flood_pause(pause_for, keeper.watcher.bytes_read)
            timeout_ms = max(0, math.ceil((deadline - now) * 1000))

    def _tick(self) -> None:
        """Ping the watchdog when due (also called inside long reconciles)."""
        interval = self._notifier.watchdog_interval
        if interval and self._clock() >= self._next_ping:
            self._notifier.watchdog()
            self._next_ping = self._clock() + interval

    def _pace(self, keeper: Keeper, poller: select.poll, inotify_fd: int) -> None:
        """Stop reading inotify for a moment after a batch that only deferred entries.

        A process that sets and strips the xattr in a loop (a fight), or touches a
        refused file in a loop, raises IN_ATTRIB as fast as the daemon can read them;
        each is merely deferred (brake or back-off), but reading them one by one would
        cost a core. While unread, the kernel merges repeated identical events
        (inotify(7)), so little queues up; other entries' events wait at most
        :data:`capkeeper.schedule.FIGHT_PACE` longer, and only while such a flood lasts.
        """
        quiet = self._clock() < keeper.quiet_until
        if quiet != self._paused:
            poller.modify(inotify_fd, 0 if quiet else select.POLLIN)
            self._paused = quiet
        if not quiet:
            keeper.quiet_until = 0.0

    def _drain_wake(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while os.read(self._wake_r, 512):
                pass

    def _do_reload(self, keeper: Keeper) -> None:
        self._notifier.reloading()
        try:
            state = load_state(self._settings.state, cache=self._cache)
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
            self._book.rejected = (time.strftime("%H:%M:%S"), problems)
            self._log.error("state_rejected", error="; ".join(problems), problems=problems)
            self._book.rejected_reloads += 1
            self._book.last_error = "state rejected: " + "; ".join(problems)
            self._book.dirty = True
            self._notifier.ready(self._status_line())
            return
        self._book.rejected = None
        self._book.reloads += 1
        keeper.install(state)
        self._log.info(
            "state_loaded", entries=len(state.entries), files=", ".join(map(str, state.files))
        )
        keeper.full_reconcile("reload")
        self._notifier.ready(self._status_line())
        self._cache.flush()

    def _watch_mounts(self) -> MountWatch | None:
        try:
            return MountWatch()
        except (OSError, ValueError) as exc:
            self._log.warning("mount_watch_failed", error=str(exc))
            return None

    # -- what is shown: STATUS=, the status file and the metrics ------------------------

    def _status_line(self) -> str:
        """The ``STATUS=`` text, with the inotify watch count as it is now."""
        keeper = self._keeper
        if keeper is None:
            return status_line(self._book, directories=0)
        watches = keeper.watcher.watch_count
        if self._book.watches != watches:
            self._book.watches = watches
            self._book.dirty = True
        return status_line(self._book, directories=len(keeper.plan.directories()))

    def _publish(self) -> None:
        """Tell systemd and the status file what changed, if anything did."""
        text = self._status_line()
        if text != self._sd_status:
            self._sd_status = text
            self._notifier.status(text)
        if self._book.dirty:
            self._status_timer.changed(self._clock())
        if self._clock() >= self._status_timer.deadline():
            self._write_status_file()

    def _write_status_file(self) -> None:
        """Write the status (and metrics) files now."""
        self._status_timer.wrote(self._clock())
        targets = [(self._settings.status_file, write_status)]
        if self._settings.metrics_file is not None:
            targets.append((self._settings.metrics_file, write_metrics))
        for target, writer in targets:
            try:
                writer(target, self._book)
            except OSError as exc:
                error = f"{target}: {exc.strerror or exc}"
                if error != self._status_file_error:
                    self._log.warning("status_file_failed", file=str(target), error=error)
                self._status_file_error = error
        self._book.dirty = False


def watch(settings: Settings) -> int:
    """``capkeeper watch``: check the privilege, then run the daemon with ``settings``
    (fully merged by the caller: file, environment and command line)."""
    require_setfcap()
    return Daemon(settings).run()
