"""What the watch daemon does between wake-ups: events in, reconciles and watches out.

A :class:`Keeper` holds the watch plan and the :class:`~capkeeper.status.StatusBook`
of the loaded state. Each batch of events is coalesced: every affected entry is
reconciled once, through the same :func:`capkeeper.enforce.reconcile` as
``apply``. A write in progress (``IN_MODIFY``, or a file just created) is acted
on at ``IN_CLOSE_WRITE``, a rename, or after ``settle_time`` without events. A
change to a directory or symlink on a path re-plans that path's watches.
``IN_Q_OVERFLOW``, a newly failed watch, a reload and the periodic rescan
reconcile everything; a mount table change reconciles the routes it reaches.

Per entry it remembers the last verdict and logs only changes, so a refused or
missing binary is reported once, not at every rescan; refused and failed entries
are retried with a growing delay, never in a tight loop. Our own ``setxattr``
raises ``IN_ATTRIB``: the re-check finds the file in sync and logs at debug
only. When to look again is :mod:`capkeeper.schedule`'s to say.

The first restore that a batch of events (or a round of due checks: settled
writes, retries) leads to gives up the CPU once (``sched_yield``) once it is
written and read back, at most every :data:`~capkeeper.schedule.YIELD_GAP`: a
process that waits for the capabilities is woken by that ``setxattr`` (its
``IN_ATTRIB``), often on the daemon's own CPU, and then runs before the
daemon's logging, bookkeeping and re-check of its own echo rather than after
them. Full reconciles (start-up, reload, overflow, rescans) never yield:
thousands of restores would each wait for other processes.
"""

from __future__ import annotations

import errno
import os
import stat
import traceback
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

from capkeeper.enforce import reconcile
from capkeeper.files import Pins, Walks, absorb_elf_facts, export_elf_facts
from capkeeper.helper import Helper, helper_worth
from capkeeper.log import keeps
from capkeeper.model import Entry, Observation
from capkeeper.mounts import MountWatch
from capkeeper.paths import posixjoin
from capkeeper.reconcile import Decision, Outcome, Status, log_outcome
from capkeeper.schedule import (
    FIGHT_PACE,
    YIELD_GAP,
    Identity,
    Settling,
    Throttle,
    announced,
    identity_of,
    may_be_mid_write,
    settle_wait,
)
from capkeeper.state import State
from capkeeper.status import EntryState, StatusBook
from capkeeper.watcher import (
    Link,
    Route,
    Watcher,
    WatchEvent,
    WatchFailure,
    WatchPlan,
    plan_directories,
    plan_routes,
)

_REPLAN_ROUNDS = 8  # plan, watch, look again: at most this often per batch (a deep tree)
# Anyone can overflow the queue of a directory others can write to, as often as they
# like: warn about it at most this often (seconds); the rescans it causes are cheap.
_EXPOSED_OVERFLOW_WARN_EVERY = 60.0
# A helper's verdicts that say it changed the file (or found it changed), reported even
# where the daemon checked the same entry (see Keeper._check_shared).
_CHANGES = frozenset({Status.RESTORED, Status.REFUSED})
_OK = frozenset(status for status in Status if status.ok)
_STATUSES = {str(status): status for status in Status}  # Status(text), without its lookup
_IDENTITY_SIZE = len(Identity.__match_args__)  # the fields of an Identity a helper sends
_HELPER_POLL = 64  # the daemon's own checks between two looks for a start-up helper's outcomes

Reconcile = Callable[..., Outcome]


class Keeper:
    """Keeps the entries of one loaded state: watches, events, reconciles, the book."""

    def __init__(
        self,
        watcher: Watcher,
        book: StatusBook,
        *,
        logger: Any,
        settle_time: float,
        last_cap: int,
        clock: Callable[[], float],
        tick: Callable[[], None],
        stopping: Callable[[], bool],
        mounts: MountWatch | None = None,
        check: Reconcile = reconcile,
    ) -> None:
        self.watcher = watcher
        self.book = book
        self.mounts = mounts
        self.plan = WatchPlan()
        self.entries: dict[str, Entry] = {}
        self.quiet_until = 0.0  # inotify is left unread until then (a fight's noise)
        self._log = logger
        self._settle_time = settle_time
        self._last_cap = last_cap
        self._clock = clock
        self._tick = tick
        self._stopping = stopping
        self._check = check
        self._state = State(entries=(), files=())
        self._settling = Settling()
        self._deferred: dict[str, str] = {}  # refused/failed entries touched again: cause
        self._failed_watches: dict[str, int] = {}
        self._route_problems: dict[str, str] = {}  # paths not watchable to their end
        self._exposed = Throttle(_EXPOSED_OVERFLOW_WARN_EVERY)
        self._batch = Counter[str]()  # what the current batch of events led to
        self._yield_due = False  # the batch's first restore gives up the CPU (see above)
        self._next_yield = 0.0  # not before then (YIELD_GAP)
        self._watcher_dirty = False  # a watch was dropped: sync even if no route changed
        # The directories walked by earlier batches of events (see _batch_pins).
        self._walked = Walks()
        self._helper_facts: object = None  # the start-up helper's ELF facts, not yet taken

    def install(self, state: State) -> None:
        """Keep exactly the entries of ``state`` from now on (the caller reconciles)."""
        keep = {entry.path for entry in state.entries}
        for path in self.plan.paths - keep:
            self.plan.remove(path)
            self._route_problems.pop(path, None)
            self._settling.discard(path)
            self._deferred.pop(path, None)
        self.forget_walks()
        self._state = state
        self.entries = state.by_path()
        self.book.load({e.path: e.caps_text for e in state.entries}, [str(f) for f in state.files])

    def deadlines(self) -> list[float]:
        """When something is due: a settling write, a deferred entry's retry, the pace."""
        due = list(self._settling.deadlines())
        due.extend(self._state_of(p).pacing.retry_at for p in self._deferred if p in self.entries)
        if self.quiet_until:
            due.append(self.quiet_until)
        return due

    def _state_of(self, path: str) -> EntryState:
        return self.book.entries[path]

    # -- watches -----------------------------------------------------------------------

    def _replan(self, paths: Iterable[str]) -> bool:
        """Re-resolve ``paths`` and watch what they now go through.

        Plan, watch, then look again: a name looked up in a directory before
        its watch was added may have changed unseen in between (dpkg renames
        opt.dpkg-new to opt, then creates ckdemo inside at once), so every
        route through a directory whose watch was added after its look is
        planned once more. A look made under a watch needs no second one:
        any later change raises an event. Paths with no route yet (start-up,
        a reload) have the directories up to their parents watched first, so
        thousands of entries in a few directories are looked at once, not twice.

        Returns True when a watch failed that had not failed before (the
        caller then reconciles everything: changes there are invisible).
        """
        todo = self._watch_parents(paths)
        return self._plan(todo)

    def _watch_parents(self, paths: Iterable[str]) -> set[str]:
        """The first step of :meth:`_replan`: watch the directories up to the parents of
        the declared ``paths`` that have no route yet; returns the declared ones."""
        plan = self.plan
        todo = {p for p in paths if p in self.entries}
        if todo:
            self.forget_walks()  # a route may have moved: the next batch walks anew
        fresh = [p for p in todo if plan.route(p) is None]
        if fresh:
            # Failures here are retried and reported by the sync in _plan.
            self.watcher.sync(plan.directories() | plan_directories(fresh))
        return todo

    def _plan(self, todo: set[str]) -> bool:
        """The rest of :meth:`_replan`, once :meth:`_watch_parents` ran on ``todo``."""
        watcher, plan = self.watcher, self.plan
        new_failure = False
        for _ in range(_REPLAN_ROUNDS):
            watched = watcher.directories  # a look from now on is seen by these watches
            moved = False
            for route in plan_routes(todo):
                moved |= plan.set_route(route)
                self._note_route(route)
            if not moved and not self._watcher_dirty:
                break
            self._watcher_dirty = False
            failures = watcher.sync(plan.directories())
            new_failure |= self._note_failures(failures)
            vanished = [f for f in failures if f.vanished]
            if vanished:
                todo = set().union(*(plan.through(f.directory) for f in vanished))
                self._watcher_dirty = True
                continue
            added = watcher.directories - watched
            todo &= set().union(*(plan.through(directory) for directory in added))
            if not todo:
                break
        return new_failure

    def _note_route(self, route: Route) -> None:
        """Report once a path whose route cannot be watched to its end (PATH_MAX)."""
        if not route.problem:
            self._route_problems.pop(route.path, None)
            return
        if self._route_problems.get(route.path) != route.problem:
            directory = route.links[-1].directory if route.links else "/"
            self.book.last_error = f"cannot watch {route.path}: {route.problem}"
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
                self.book.last_error = f"cannot watch {directory}: {failure.reason}"
                self._log.error(
                    "watch_failed",
                    directory=directory,
                    reason=failure.reason,
                    errno=failure.errno,
                    entries=len(self.plan.through(directory)),
                )
        for directory in set(self._failed_watches) - set(current):
            if directory in self.watcher.directories:
                self._log.info("watch_recovered", directory=directory)
        self._failed_watches = {d: f.errno for d, f in current.items()}
        return new

    # -- events ------------------------------------------------------------------------

    def handle(self, events: list[WatchEvent], woke: float) -> None:
        """Coalesce one batch of events and reconcile every affected entry once."""
        watcher = self.watcher
        overflow = exposed_overflow = False
        renamed = False  # a declared name itself was created, removed or renamed
        # A directory's own event (no name: its owner or mode, a move, an overflow) may
        # have changed a route without a re-plan; one on a directory or symlink of a
        # route re-plans it.
        nameless = False
        replan: set[str] = set()
        looked: dict[str, bool] = {}  # final names of this batch: whether each leads on
        ready: dict[str, str] = {}
        for event in events:
            nameless |= not event.name
            if event.is_overflow:
                if event.exposed:
                    exposed_overflow = True
                else:
                    overflow = True
                continue
            if event.is_directory_gone:
                self._watcher_dirty |= watcher.invalidate(event.directory)
                for path in self.plan.through(event.directory):
                    replan.add(path)
                    self._note(path, None, event, woke, ready)
                continue
            for path, link in self.plan.lookup(event.directory, event.name).items():
                if not link.final:
                    replan.add(path)
                    if event.is_namespace:
                        self._watcher_dirty |= watcher.invalidate(event.path)
                    elif event.is_attrib:
                        # A new owner or mode may move the directory to the other queue.
                        self._watcher_dirty |= bool(watcher.revalidate([event.path]))
                elif event.is_namespace:
                    renamed = True
                    if self._leads_on(path, event.path, looked):
                        replan.add(path)
                self._note(path, link, event, woke, ready)
        if nameless or replan:
            self.forget_walks()  # before any check of this batch
        if overflow:
            self._log.warning("queue_overflow", events=len(events))
            self.book.overflows += 1
            self.full_reconcile("overflow", since=woke)
            return
        if replan and self._replan(replan):
            self.full_reconcile("watch_failed", since=woke)
            return
        self._batch.clear()
        if exposed_overflow:
            for path in self._exposed_overflow(woke):
                ready.pop(path, None)
        self._yield_due = True
        try:
            with self._batch_pins() as pins:
                for path, cause in ready.items():
                    self._check_or_defer(path, cause, woke, pins)
                    self._tick()
        finally:
            self._yield_due = False
        if self._batch["deferred"] and not self._batch["checked"] and not (replan or renamed):
            self.quiet_until = woke + FIGHT_PACE

    def _batch_pins(self) -> Pins:
        """The pins for the checks of a batch of events.

        The entries of one batch share their directories' walks
        (:class:`capkeeper.files.Pins`). Later batches start from the directories
        earlier ones walked too: each is opened again by its resolved path and used
        only if it is the very directory walked (device and inode), with the route
        found then. That route is still the route: every directory and symlink of
        every route is watched, any change to one raises an event on the route (its
        parent's, with its name, or its own, with none), and :meth:`handle` forgets
        every walk on any such event before it checks anything, as :meth:`_replan`,
        a mount change, a reload and every rescan do. A change made after the batch
        was read has its event queued, unread: while any event is queued
        (:meth:`capkeeper.watcher.Watcher.quiet`), the batch walks from ``/``. While
        some route cannot be watched to its end (a failed watch, a route problem) an
        event may be missing: each batch then walks anew. No descriptor is held
        between batches.
        """
        if self._failed_watches or self._route_problems:
            self.forget_walks()
            return Pins()
        return Pins(walked=self._walked, unchanged=self.watcher.quiet)

    def forget_walks(self) -> None:
        """The next batch of events walks every route from ``/``."""
        self._walked.clear()

    def _leads_on(self, path: str, name: str, looked: dict[str, bool]) -> bool:
        """Whether a name change of ``name``, the final name of ``path``'s route, may
        change that route (then it is re-planned).

        A route ends at its final name whatever is there, a file, a directory or
        nothing, unless it is a symlink, which the route follows on
        (:func:`capkeeper.watcher.plan_route`); so a rename over a declared binary
        re-plans nothing. One ``lstat`` when the event is handled (per name and
        batch): a symlink put there after it raises an event of its own.
        """
        route = self.plan.route(path)
        if route is None or route.problem or not route.complete:
            return True
        if name not in looked:
            try:
                looked[name] = stat.S_ISLNK(os.lstat(name).st_mode)
            except OSError as exc:
                looked[name] = exc.errno not in (errno.ENOENT, errno.ENOTDIR)
            except ValueError:  # an embedded NUL: not a name any route can go through
                looked[name] = True
        return looked[name]

    def _note(
        self, path: str, link: Link | None, event: WatchEvent, woke: float, ready: dict[str, str]
    ) -> None:
        """Decide whether ``event`` makes ``path`` ready now or after its write settles."""
        now_ready = self._settling.note(
            path,
            woke,
            self._settle_time,
            event.cause,
            final=link is not None and link.final,
            writing=event.is_write or event.is_created,
            finished=event.is_write_closed or event.is_namespace,
        )
        if not now_ready:
            ready.pop(path, None)
        elif path not in ready or announced(event.cause):
            ready[path] = event.cause  # the most telling cause of the batch

    def _exposed_overflow(self, since: float) -> set[str]:
        """The queue of the directories others can write to overflowed: rescan what it covers.

        Only events on names inside those directories were lost. A declared
        binary there is reconciled. A directory there is watched on its own
        (on whichever queue suits it), so only its identity can have changed
        unseen: it is re-validated. A symlink or missing name there is
        re-planned. Returns the entries reconciled.
        """
        watcher = self.watcher
        self.book.overflows += 1
        overflows = self._exposed.tell(self._clock())
        if overflows:
            self._log.warning(
                "queue_overflow",
                queue="exposed",
                overflows=overflows,
                directories=", ".join(sorted(watcher.exposed_directories)),
            )
        check: set[str] = set()
        replan: set[str] = set()
        looks: set[str] = set(watcher.exposed_directories)
        watched = watcher.directories
        for directory in watcher.exposed_directories:
            for path, link in self.plan.links_in(directory):
                if link.final:
                    check.add(path)
                elif (child := posixjoin(directory, link.name)) in watched:
                    looks.add(child)
                else:
                    replan.add(path)
        for directory in watcher.revalidate(looks):
            self._watcher_dirty = True
            check |= self.plan.through(directory)
        before = {path: self.plan.route(path) for path in replan}
        if self._replan(replan | check):
            self.full_reconcile("watch_failed", since=since)
            return set(self.entries)
        check |= {path for path, route in before.items() if self.plan.route(path) != route}
        self._rescan(check, "overflow", since=since, scope="exposed")
        return check

    def mounts_changed(self, since: float) -> None:
        """The mount table changed: re-watch and reconcile the routes the change reaches.

        inotify sees no mounts: a mount over a watched directory, or over one
        of its parents, hides the watched inode (its watch then reports on
        nothing anybody reaches), and an unmount reveals another directory.
        Every route through a changed mount point is re-watched and its entry
        reconciled; every watched directory is re-validated too (a mount id can
        be reused for a new mount on the same point).
        """
        watcher = self.watcher
        self.forget_walks()  # a mount on a route hides what a pinned directory was
        if self.mounts is None:
            return
        try:
            points = self.mounts.changed()
        except (OSError, ValueError) as exc:
            self._log.warning("mount_watch_failed", error=str(exc))
            self.full_reconcile("mount", since=since)
            return
        affected: set[str] = set()
        for point in points:
            self._watcher_dirty |= watcher.invalidate(point)
            affected |= self.plan.at_or_below(point)
        for directory in watcher.revalidate():
            self._watcher_dirty = True
            affected |= self.plan.through(directory)
        self._log.debug("mounts_changed", mount_points=sorted(points), entries=len(affected))
        if not affected and not self._watcher_dirty:
            return
        if self._replan(affected):
            self.full_reconcile("watch_failed", since=since)
            return
        self._rescan(affected, "mount", since=since, mount_points=", ".join(sorted(points)))

    def run_due(self) -> None:
        """Check the writes whose settle time ended and the entries whose back-off did."""
        now = self._clock()
        self._yield_due = True
        try:
            for path, cause, deadline in self._settling.pop_due(now):
                self._check_or_defer(path, cause, deadline)
            for path, cause in list(self._deferred.items()):
                if path not in self.entries or self._state_of(path).pacing.retry_at <= now:
                    del self._deferred[path]
                    if path not in self._settling.due:  # being written: its close or settle
                        self._check_entry(path, cause, None)
        finally:
            self._yield_due = False

    def _check_or_defer(
        self, path: str, cause: str, since: float | None, pins: Pins | None = None
    ) -> None:
        """Check ``path`` now, or when its back-off or brake ends (see
        :meth:`capkeeper.schedule.Pacing.defers`)."""
        if path in self.entries:
            record = self._state_of(path)
            if record.pacing.defers(
                record.verdict, cause, self._clock(), lambda: _stat_identity(path)
            ):
                self._deferred.setdefault(path, cause)
                self._batch["deferred"] += 1
                return
        self._batch["checked"] += 1
        self._check_entry(path, cause, since, pins)

    # -- reconciling -------------------------------------------------------------------

    def full_reconcile(
        self, cause: str, *, since: float | None = None, begun: Callable[[], None] | None = None
    ) -> None:
        """Re-validate every watch, re-plan every path and reconcile every entry.

        ``begun`` is called before the plan, or once a start-up helper is forked: what
        it costs (the first event of a start imports structlog) then runs beside the
        helper's checks.
        """
        started = self._clock()
        self.forget_walks()
        self._watcher_dirty = True  # also retries watches that failed before
        # A watch on a directory hidden by a mount (or replaced unseen) keeps its path
        # string: compare the inode it watches with what the path reaches now.
        self.watcher.revalidate()
        counts: dict[str, int] = {}
        shared: dict[str, Any] = {}
        entries = self._state.entries
        if cause == "startup" and helper_worth(len(entries)):
            shared = self._check_shared(entries, cause, since, counts, begun)
        else:
            todo = self._watch_parents(self.entries)
            self._check_alone(todo, entries, cause, since, counts, begun=begun)
        self.book.rescans += 1
        self.book.dirty = True
        quiet = cause == "periodic" and set(counts) <= {str(Status.IN_SYNC)}
        (self._log.debug if quiet else self._log.info)(
            "rescan",
            cause=cause,
            entries=len(self._state.entries),
            duration_ms=round((self._clock() - started) * 1000, 3),
            **shared,
            **{k.replace("-", "_"): v for k, v in counts.items()},
        )

    def _check_all(
        self,
        entries: Sequence[Entry],
        cause: str,
        since: float | None,
        pins: Pins,
        counts: dict[str, int],
    ) -> None:
        """Check ``entries`` in order, counting the outcomes by status in ``counts``."""
        debug = keeps(self._log, "debug")  # asked once for the whole batch
        for entry in entries:
            if self._stopping():
                break
            self._count(self._check_entry(entry.path, cause, since, pins, debug=debug), counts)
            self._tick()

    def _check_alone(
        self,
        todo: set[str],
        entries: Sequence[Entry],
        cause: str,
        since: float | None,
        counts: dict[str, int],
        *,
        begun: Callable[[], None] | None,
    ) -> None:
        """The rest of :meth:`full_reconcile` without a helper, once the parents of
        ``todo`` are watched: ``begun``, the plan, then every check here."""
        if begun is not None:
            begun()
        self._plan(todo)
        self._deferred.clear()  # every entry is checked now; failed ones re-queue
        with self._batch_pins() as pins:
            self._check_all(entries, cause, since, pins, counts)

    @staticmethod
    def _count(outcome: Outcome | None, counts: dict[str, int]) -> None:
        if outcome is not None:
            status = str(outcome.status)
            counts[status] = counts.get(status, 0) + 1

    def _check_shared(
        self,
        entries: Sequence[Entry],
        cause: str,
        since: float | None,
        counts: dict[str, int],
        begun: Callable[[], None] | None,
    ) -> dict[str, Any]:
        """Plan and check ``entries`` at start-up as :meth:`full_reconcile` does, shared
        with a forked helper checking from the last entry backwards
        (:mod:`capkeeper.helper`); the fields that say so in the rescan event.

        The helper starts once the directories up to the entries' parents are
        watched, and checks while the daemon plans the routes (a tenth of a second
        at 10,000 entries). A look is seen by the watches in place when it is made:
        an entry the helper sent whose route goes through a directory watched only
        after the fork (a symlink to elsewhere, a directory replaced meanwhile) is
        checked again here, once every watch is in place.
        """
        walks = Pins()  # the helper's: it walks for itself (this one stays empty here)

        def look(index: int) -> tuple[bool, tuple[Any, ...]]:
            looked = self._look(entries[index], cause, walks)
            return looked.outcome.status is not Status.IN_SYNC, _record(looked)

        debug = keeps(self._log, "debug")
        here: list[Status | None] = []  # the verdicts on entries[:len(here)], checked here
        theirs = 0
        late: set[int] = set()  # entries through a directory watched after the fork
        late_theirs: dict[int, Status | None] = {}  # those the helper sent: what they count

        def report(helper: Helper, records: Iterable[tuple[int, Any]]) -> None:
            nonlocal theirs
            for index, record in records:
                try:
                    looked = _looked(entries[index], record)
                except (TypeError, ValueError) as exc:
                    helper.unread(index, f"it sent an outcome that does not read: {exc}")
                    continue
                if index < len(here):
                    # Both took it where they met. The verdict made here stands, unless
                    # the helper changed the file since (a restore, a removal on a
                    # refusal) or found it changed: that is reported too, and counted
                    # instead of the verdict made here.
                    found, made = here[index], looked.outcome.status
                    if looked.outcome.held or made is found or made not in _CHANGES:
                        continue
                    if found is not None:
                        counts[str(found)] -= 1
                theirs += 1
                outcome = self._conclude(looked, cause, since, debug=debug)
                self._count(outcome, counts)
                if index in late and index >= len(here):
                    late_theirs[index] = None if outcome is None else outcome.status

        todo = self._watch_parents(self.entries)
        mark = self.watcher.mark()
        helper = Helper.fork(len(entries), look, export_elf_facts)
        if helper is None:
            self._check_alone(todo, entries, cause, since, counts, begun=begun)
            return {}
        try:
            if begun is not None:
                begun()
            self._plan(todo)
            late.update(self._entries_through(entries, self.watcher.added_since(mark)))
            self._deferred.clear()  # every entry is checked now; failed ones re-queue
            with self._batch_pins() as pins:
                for index, entry in enumerate(entries):
                    if self._stopping() or not helper.claim(index):
                        break
                    outcome = self._check_entry(entry.path, cause, since, pins, debug=debug)
                    here.append(None if outcome is None else outcome.status)
                    self._count(outcome, counts)
                    self._tick()
                    if index % _HELPER_POLL == 0:
                        report(helper, helper.arrived())
                # What it sent is read to the end even on a stop: it restored those files.
                report(helper, helper.rest(self._stopping, self._tick))
        finally:
            helper.close()
        fields: dict[str, Any] = {"helper_entries": theirs}
        if self._stopping():
            _drop_zero(counts)
            return fields
        # Neither took these: where they met (each saw the other's mark first), all the
        # helper did not send when it failed, and what it sent that does not read.
        again = [index for index in helper.lost if index >= len(here)]
        todo_here = {*range(len(here), helper.lowest), *again} - late_theirs.keys()
        if helper.failure is None:
            self._helper_facts = helper.facts  # taken after READY=1: absorb_helper_facts()
        if helper.failure is not None or helper.trouble:
            self._log.warning(
                "start_up_helper_failed",
                reason=helper.failure or helper.trouble,
                entries=(helper.left if helper.failure else 0) + len(again),
                pid=helper.pid,
            )
        with self._batch_pins() as pins:
            self._check_all([entries[i] for i in sorted(todo_here)], cause, since, pins, counts)
            for index, found in sorted(late_theirs.items()):
                if self._stopping():
                    break
                outcome = self._check_entry(entries[index].path, cause, since, pins, debug=debug)
                if outcome is not None and outcome.status in _CHANGES:
                    # Changed since the helper's look, unseen then: that counts instead.
                    if found is not None:
                        counts[str(found)] -= 1
                    self._count(outcome, counts)
                self._tick()
        _drop_zero(counts)
        if late_theirs:
            fields["helper_rechecked"] = len(late_theirs)
        return fields

    def _entries_through(self, entries: Sequence[Entry], directories: Iterable[str]) -> set[int]:
        """The indexes in ``entries`` of those whose route goes through ``directories``."""
        paths: set[str] = set()
        for directory in directories:
            paths |= self.plan.through(directory)
        if not paths:
            return set()
        return {index for index, entry in enumerate(entries) if entry.path in paths}

    def absorb_helper_facts(self) -> None:
        """Take the ELF facts the start-up helper learnt. Nothing before READY=1 needs
        them (10 ms at 10,000 entries): they spare parsing those files again at their next
        check, and are saved with the others."""
        facts, self._helper_facts = self._helper_facts, None
        absorb_elf_facts(facts)

    def _rescan(self, paths: Iterable[str], cause: str, *, since: float, **fields: Any) -> None:
        """Reconcile ``paths`` (part of the state) and log one ``rescan`` event for them."""
        started = self._clock()
        self.forget_walks()
        counts: dict[str, int] = {}
        todo = sorted(p for p in paths if p in self.entries)
        with self._batch_pins() as pins:
            self._check_all([self.entries[p] for p in todo], cause, since, pins, counts)
        self.book.dirty = True
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

    def _check_entry(
        self,
        path: str,
        cause: str,
        since: float | None,
        pins: Pins | None = None,
        *,
        debug: bool | None = None,
    ) -> Outcome | None:
        """Check ``path`` now and report the outcome (None: not declared, or held as
        mid-write). ``debug``: whether debug events are kept, if the batch asked already."""
        entry = self.entries.get(path)
        if entry is None:
            return None
        looked = self._look(entry, cause, pins)
        if self._yield_due and looked.outcome.status is Status.RESTORED:
            self._yield_once()
        return self._conclude(looked, cause, since, debug=debug)

    def _look(self, entry: Entry, cause: str, pins: Pins | None) -> Looked:
        """Check ``entry`` now (restoring it if due) without logging or recording
        anything: a start-up helper runs this in another process."""
        known = self._state_of(entry.path).pacing.identity
        seen: list[tuple[Observation, Identity]] = []  # the last one held or not

        def hold(observation: Observation, decision: Decision) -> bool:
            identity = identity_of(observation)
            seen[:] = [(observation, identity)]
            return may_be_mid_write(cause, known, identity, decision)

        try:
            outcome = self._check(entry, write=True, last_cap=self._last_cap, hold=hold, pins=pins)
        except Exception as exc:  # a bug on one file must not stop enforcing all the others
            outcome = Outcome(
                entry, Status.FAILED, "unknown", reason=f"internal error: {exc!r} (please report)"
            )
            return Looked(outcome, None, exc)
        observed = outcome.observation
        if observed is None:
            identity = None
        elif seen and seen[0][0] is observed:
            identity = seen[0][1]
        else:
            identity = identity_of(observed)
        return Looked(outcome, identity)

    def _yield_once(self) -> None:
        """After the batch's first restore (written, read back, its file closed): give up
        the CPU, at most every YIELD_GAP (whoever its IN_ATTRIB woke runs first; see the
        module's doc)."""
        self._yield_due = False
        now = self._clock()
        if now >= self._next_yield:
            self._next_yield = now + YIELD_GAP
            os.sched_yield()

    def _conclude(
        self, looked: Looked, cause: str, since: float | None, *, debug: bool | None
    ) -> Outcome | None:
        """Report what :meth:`_look` found (None: held as mid-write, nothing reported)."""
        outcome, identity, crash = looked
        path = outcome.entry.path
        if crash is not None:
            if isinstance(crash, BaseException):
                self._log.error("reconcile_crashed", path=path, cause=cause, exc_info=crash)
            else:  # a helper's: its traceback as text
                self._log.error("reconcile_crashed", path=path, cause=cause, exception=crash)
        self._deferred.pop(path, None)
        if outcome.held:
            wait = settle_wait(outcome.status, self._settle_time)
            self._settling.hold(path, self._clock() + wait, cause)
            self._log.debug("write_in_progress", path=path, cause=cause, found=outcome.found)
            return None
        self._report(outcome, cause, since, identity, debug=debug)
        return outcome

    def _report(
        self,
        outcome: Outcome,
        cause: str,
        since: float | None,
        identity: Identity | None,
        *,
        debug: bool | None = None,
    ) -> None:
        """Log, pace and record ``outcome``; ``identity`` is that of its observation;
        ``debug`` as for :meth:`_check_entry`."""
        now = self._clock()
        path = outcome.entry.path
        record = self._state_of(path)
        last = record.verdict
        verdict = outcome.status
        if verdict is Status.IN_SYNC and (last is None or last in _OK):
            # Nearly every check: nothing is built for the event unless it is kept.
            if keeps(self._log, "debug") if debug is None else debug:
                log_outcome(self._log, outcome, cause=cause)
        elif verdict is Status.RESTORED:
            latency = {} if since is None else {"latency_ms": round((now - since) * 1000, 3)}
            log_outcome(self._log, outcome, cause=cause, **latency)
        elif verdict is Status.IN_SYNC:  # after a verdict that was not ok
            self._log.info("capability_in_sync", **outcome.fields(), cause=cause)
        elif (verdict, outcome.reason or outcome.found) != (last, record.reason or record.found):
            log_outcome(self._log, outcome, cause=cause)
        else:
            self._log.debug("verdict_unchanged", path=path, status=str(verdict), cause=cause)
        braked = record.pacing.checked(verdict, identity, now, transient=outcome.transient)
        if braked is not None and braked.alert:
            self._log.warning(
                "restore_flapping",
                path=path,
                restores=braked.rounds + 1,
                found=outcome.found,
                expected=outcome.expected,
                hint="something keeps undoing the restore of an unchanged file: another "
                "declared path resolving to the same file with other capabilities, or a "
                "process stripping them in a loop; capkeeper now restores it at most once "
                "a second and says so at most once a minute",
            )
        if verdict is Status.FAILED:
            # EROFS, ENOSPC, EIO: the fix (a remount, freed space) raises no event.
            self._deferred.setdefault(path, "retry")
        self.book.record(outcome, cause=cause)


def _drop_zero(counts: dict[str, int]) -> None:
    """Forget the statuses no entry has in ``counts`` (after some were counted again)."""
    for status in [status for status, count in counts.items() if count <= 0]:
        del counts[status]


def _stat_identity(path: str) -> Identity | None:
    """The identity of what ``path`` names now, from one stat() (None if it cannot)."""
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return Identity(
        st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_uid, st.st_gid, st.st_mode
    )


class Looked(NamedTuple):
    """What :meth:`Keeper._look` found, before it is reported."""

    outcome: Outcome
    identity: Identity | None  # of the file the outcome was decided on
    crash: BaseException | str | None = None  # an internal error (a helper's as text)


def _record(looked: Looked) -> tuple[Any, ...]:
    """``looked`` as plain data, for a start-up helper to send (:func:`_looked` reads it)."""
    outcome, identity, crash = looked
    if isinstance(crash, BaseException):
        crash = "".join(traceback.format_exception(crash))
    return (
        outcome.status.value,
        outcome.found,
        outcome.resolved,
        outcome.reason,
        outcome.extra,
        outcome.held,
        outcome.transient,
        None if identity is None else tuple(identity),  # a plain tuple: marshal sends it
        crash,
    )


def _looked(entry: Entry, record: object) -> Looked:
    """The :class:`Looked` a start-up helper sent for ``entry`` as :func:`_record`'s data;
    TypeError or ValueError when it is not that."""
    if type(record) is not tuple:
        raise TypeError(f"a {type(record).__name__}, not a tuple")
    status, found, resolved, reason, extra, held, transient, identity, crash = record
    if type(found) is not str or type(resolved) is not str or type(reason) is not str:
        raise TypeError("a text is not a string")
    if type(extra) is not bool or type(held) is not bool or type(transient) is not bool:
        raise TypeError("a flag is not a boolean")
    if crash is not None and type(crash) is not str:
        raise TypeError("a crash is not a text")
    if identity is not None:
        if type(identity) is not tuple or len(identity) != _IDENTITY_SIZE:
            raise TypeError("an identity is not a tuple of its fields")
        for number in identity:
            if type(number) is not int:
                raise TypeError("an identity is not a tuple of integers")
        identity = Identity(*identity)
    verdict = _STATUSES.get(status) if type(status) is str else None
    if verdict is None:
        raise ValueError(f"no status {status!r}")
    outcome = Outcome(entry, verdict, found, resolved, reason, extra, None, held, transient)
    return Looked(outcome, identity, crash)
