"""When the daemon looks at a declared binary again, and when it writes its status file.

The daemon's timing policy: the settle time of a write in progress, the
confirmation of a refusal a half-written file would also get, the retry
back-off of refused and failed entries, the flap brake, the pace of reading
inotify during a fight, the status file's write schedule and the poll
timeout. Pure: the clock reading (``now``, monotonic seconds) and what was
observed are passed in; nothing here sleeps, reads a file or logs.

The flap brake tells a deploy from a fight by the file itself. A deploy
brings a new inode or new content (size, mtime) or new ownership: it is
always restored at once, however often deploys come. A fight is our own
restore undone while nothing else about the file changed (same inode, same
content, same owner and mode): after a few rounds in a row, restores of that
path are spaced :data:`BRAKE` apart, and the caller alerts at most once per
:data:`ALERT_EVERY`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, NamedTuple

from capkeeper.reconcile import Status

if TYPE_CHECKING:
    from capkeeper.model import Observation
    from capkeeper.reconcile import Decision

RETRY_FIRST = 0.5  # seconds before a refused or failed entry is looked at again
RETRY_MAX = 30.0
# A restore of an unchanged file this soon after our previous restore of it (plus the
# brake we imposed ourselves) means something undid our write: one round of a fight.
FIGHT_WINDOW = 1.0
FIGHT_ROUNDS = 3  # rounds in a row before the brake engages (4 restores)
BRAKE = 1.0  # seconds between restores of a path while it is fought over
ALERT_EVERY = 60.0  # restore_flapping at most this often per path
FIGHT_PACE = 0.1  # seconds inotify is left unread after a batch that only deferred
# A flood of events on names no route goes through (Daemon._wait): once one wait read
# FLOOD_BURST bytes of batches of only such events (about a hundred events; one deploy
# of a declared binary raises a few), each next batch is left to gather FLOOD_PAUSE
# seconds and read at once. A slow flood gathers little in that time: while a batch
# read after a pause holds less than FLOOD_GATHER bytes (about thirty events), the
# next pause is twice as long, up to FLOOD_PAUSE_MAX; one holding four times that
# halves it again.
FLOOD_BURST = 4096
FLOOD_PAUSE = 0.001
FLOOD_PAUSE_MAX = 0.008
FLOOD_GATHER = 1024


def flood_pause(pause: float, gathered: int) -> float:
    """The next pause of a flood, after one of ``pause`` seconds gathered ``gathered``
    bytes: doubled while too little gathers, halved when much more than enough does."""
    if gathered < FLOOD_GATHER:
        return min(2 * pause, FLOOD_PAUSE_MAX)
    if gathered >= 4 * FLOOD_GATHER:
        return max(pause / 2, FLOOD_PAUSE)
    return pause


# After a restore the daemon gives up its CPU once (Keeper._written), at most this often
# (seconds): a process woken by the restore runs first, and a declared file its owner
# rewrites in a loop cannot make the daemon yield to CPU-bound processes at every restore.
YIELD_GAP = 0.01


# Refusals that a file caught in the middle of a write would also get, and how long
# such a refusal must persist, without write events, before it is reported.
CONTENT_RULES = frozenset({"elf", "sha256", "interpreter"})
CONFIRM_REFUSAL = 1.0
MAX_POLL_MS = 86_400_000  # poll() takes a C int of milliseconds
# The status snapshot costs ~20 ms of CPU per 1,000 entries: write it once events have
# been quiet for a moment, at most once a second, and at the latest after a few seconds.
STATUS_QUIET = 0.2
STATUS_EVERY = 1.0
STATUS_STALE = 5.0
# Causes that announce new content or another inode at the path (not just attributes).
ANNOUNCED = frozenset(
    {"IN_MOVED_TO", "IN_MOVED_FROM", "IN_DELETE", "IN_CREATE", "IN_CLOSE_WRITE", "IN_MODIFY"}
)
SETTLED = "+settle"  # suffix of the cause of a check made when a write's settle time ended


def announced(cause: str) -> bool:
    """Whether ``cause`` (``IN_MODIFY+settle`` counts as ``IN_MODIFY``) announces new
    content or another inode at the path, rather than an attribute change or a rescan."""
    return cause.split("+", 1)[0] in ANNOUNCED


class Identity(NamedTuple):
    """What makes a file "the same file": inode, content, owner and mode.

    ctime is left out on purpose: our own ``setxattr`` moves it. Content is
    judged by size and mtime (nanoseconds), not by a hash: hashing on every
    restore would cost a read of the whole binary each time, and a tool that
    rewrites a file with the same size and sets the very same mtime back is at
    worst braked (delayed by at most :data:`BRAKE`), never missed.
    """

    dev: int
    ino: int
    size: int
    mtime_ns: int
    uid: int
    gid: int
    mode: int

    def same_content(self, other: Identity | None) -> bool:
        """Same inode, same size and mtime (owner and mode may differ)."""
        return other is not None and (self.dev, self.ino, self.size, self.mtime_ns) == (
            other.dev,
            other.ino,
            other.size,
            other.mtime_ns,
        )


def identity_of(observation: Observation) -> Identity:
    return Identity(
        observation.dev,
        observation.ino,
        observation.size,
        observation.mtime_ns,
        observation.uid,
        observation.gid,
        observation.mode,
    )


def retry_delay(failures: int) -> float:
    """Seconds before the next try after ``failures`` refused/failed verdicts in a row."""
    return float(min(RETRY_FIRST * 2.0 ** max(failures - 1, 0), RETRY_MAX))


class Verdict(NamedTuple):
    """What the brake says about one restore."""

    not_before: float  # the path's next restore may not happen earlier (0: no brake)
    alert: bool  # log restore_flapping now
    rounds: int  # restores in a row undone with nothing else changed


class Brake:
    """One path's record of restores, to tell deploys from fights."""

    __slots__ = ("alerted_at", "restored", "restored_at", "rounds")

    def __init__(self) -> None:
        self.restored: Identity | None = None  # the file as it was when we last restored it
        self.restored_at = -math.inf
        self.rounds = 0
        self.alerted_at = -math.inf

    def restore(self, identity: Identity, now: float) -> Verdict:
        """Record that the file seen as ``identity`` was restored at ``now``."""
        undone = identity == self.restored and now - self.restored_at <= FIGHT_WINDOW + BRAKE
        self.rounds = self.rounds + 1 if undone else 0
        self.restored, self.restored_at = identity, now
        if self.rounds < FIGHT_ROUNDS:
            return Verdict(0.0, alert=False, rounds=self.rounds)
        alert = now - self.alerted_at >= ALERT_EVERY
        if alert:
            self.alerted_at = now
        return Verdict(now + BRAKE, alert=alert, rounds=self.rounds)

    def fighting(self, now: float) -> bool:
        """Whether the last restores were a fight that may still be going on."""
        return self.rounds >= FIGHT_ROUNDS and now - self.restored_at <= FIGHT_WINDOW + BRAKE


def may_be_mid_write(
    cause: str, known: Identity | None, seen: Identity, decision: Decision
) -> bool:
    """Whether the file seen as ``seen`` may be in the middle of a write: the caller waits
    for its close or :func:`settle_wait`, as after ``IN_MODIFY``.

    ``known`` is the file at the previous check; a check made when a settle time
    ended (cause ending in ``+settle``) is not held again.
    """
    if cause.endswith(SETTLED):
        return False
    if (
        not announced(cause)
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
    # Such a refusal is reported only if it still holds after CONFIRM_REFUSAL
    # without write events. Residual window: a deploy stalled in the kernel for
    # longer than that between changing the file and queuing its event.
    return decision.status is Status.REFUSED and any(
        r.rule in CONTENT_RULES for r in decision.refusals
    )


def settle_wait(held: Status, settle_time: float) -> float:
    """Seconds to wait before checking again a file held as mid-write with verdict ``held``."""
    return max(settle_time, CONFIRM_REFUSAL) if held is Status.REFUSED else settle_time


class Pacing:
    """One entry's timing: the file at the last check, the back-off and the brake."""

    __slots__ = ("brake", "identity", "misses", "retry_at")

    def __init__(self) -> None:
        self.identity: Identity | None = None  # the file at the last check
        self.misses = 0  # refused/failed verdicts in a row
        self.retry_at = 0.0  # monotonic; events before this are deferred
        # Made at the first restore: most entries are never restored, and 10,000 brakes
        # made at every start cost it 10 ms and 0.7 MB for nothing.
        self.brake: Brake | None = None

    def checked(
        self, verdict: Status, identity: Identity | None, now: float, *, transient: bool = False
    ) -> Verdict | None:
        """Record a check's ``verdict`` on the file seen as ``identity`` (None: none seen).

        Refused and failed entries wait with a doubling delay; a fought-over file
        is restored at most once per :data:`BRAKE`. Returns the brake's verdict
        after a restore (or a restore undone at once), else None.
        """
        self.identity = identity
        # Capabilities changed again right after our write, on a file we saw: a restore
        # undone at once, braked like any other round of a fight (not backed off).
        undone = verdict is Status.FAILED and transient and identity is not None
        if verdict in (Status.REFUSED, Status.FAILED) and not undone:
            self.misses += 1
            self.retry_at = now + retry_delay(self.misses)
            return None
        self.misses = 0
        if not (verdict is Status.RESTORED or undone) or identity is None:
            self.retry_at = 0.0
            return None
        if self.brake is None:
            self.brake = Brake()
        braked = self.brake.restore(identity, now)
        self.retry_at = braked.not_before
        return braked

    def defers(
        self, last: Status | None, cause: str, now: float, look: Callable[[], Identity | None]
    ) -> bool:
        """Whether an event with ``cause`` waits for the end of the back-off or brake.

        A refused or failed entry waits unless the event announces a new file or
        new content; a braked entry (a fight; ``last`` is RESTORED) waits unless
        the file, as ``look()`` sees it now, is no longer the one restored: a new
        deploy is never held back by either.
        """
        if self.retry_at <= now:
            return False
        if last is Status.RESTORED:
            return look() == (None if self.brake is None else self.brake.restored)
        return not announced(cause)


class Settling:
    """Writes in progress: path -> (when to check it anyway, the cause that started it)."""

    __slots__ = ("due",)

    def __init__(self) -> None:
        self.due: dict[str, tuple[float, str]] = {}

    def note(
        self,
        path: str,
        now: float,
        settle_time: float,
        cause: str,
        *,
        final: bool,
        writing: bool,
        finished: bool,
    ) -> bool:
        """An event on ``path``: whether it is ready for a check now.

        ``final``: the event is on the file itself (not a directory on its
        route); ``writing``: data is being written or a file was just created;
        ``finished``: the write was closed or a name changed.
        """
        if final and writing:
            self.due[path] = (now + settle_time, cause)  # wait for the close
            return False
        if final and path in self.due and not finished:
            return False  # e.g. the writer's fchmod: the close will follow
        self.due.pop(path, None)
        return True

    def hold(self, path: str, until: float, cause: str) -> None:
        """Check ``path`` at ``until`` unless already due (a rescan or an attribute
        event must not postpone it forever)."""
        self.due.setdefault(path, (until, cause))

    def discard(self, path: str) -> None:
        self.due.pop(path, None)

    def pop_due(self, now: float) -> list[tuple[str, str, float]]:
        """The writes whose settle time ended: (path, cause + ``+settle``, deadline)."""
        ended = [(p, c, d) for p, (d, c) in self.due.items() if d <= now]
        for path, _, _ in ended:
            del self.due[path]
        return [(path, cause + SETTLED, deadline) for path, cause, deadline in ended]

    def deadlines(self) -> Iterable[float]:
        return (deadline for deadline, _ in self.due.values())


class StatusFileTimer:
    """When the status file is written: after a quiet moment once something changed,
    at most once per :data:`STATUS_EVERY`, at the latest :data:`STATUS_STALE` after."""

    __slots__ = ("activity", "dirty_since", "isolated", "written")

    def __init__(self) -> None:
        self.dirty_since: float | None = None
        self.written = -math.inf
        self.activity = -math.inf  # the last inotify wake-up
        self.isolated = False  # that wake-up came after a quiet moment (one deploy)

    def woke(self, now: float) -> None:
        """An inotify wake-up at ``now``."""
        self.isolated = now - self.activity >= STATUS_QUIET
        self.activity = now

    def changed(self, now: float) -> None:
        """Something the file shows changed (idempotent until written)."""
        if self.dirty_since is None:
            self.dirty_since = now

    def deadline(self) -> float:
        """When the file is due: never while nothing changed."""
        if self.dirty_since is None:
            return math.inf
        every = self.written + STATUS_EVERY
        if self.isolated:
            # Activity after a quiet moment (one deploy): write at the end of this very
            # wake-up, after its restores, rather than wake up again for it later.
            return every
        quiet = max(self.activity + STATUS_QUIET, every)
        return min(quiet, self.dirty_since + STATUS_STALE)

    def wrote(self, now: float) -> None:
        self.written, self.dirty_since = now, None


class Throttle:
    """Say something at most once per ``every`` seconds, counting what was not said."""

    __slots__ = ("every", "said_at", "unsaid")

    def __init__(self, every: float) -> None:
        self.every = every
        self.said_at = -math.inf
        self.unsaid = 0

    def tell(self, now: float) -> int:
        """Count one occurrence; the count to report now, or 0 to stay silent."""
        self.unsaid += 1
        if now - self.said_at < self.every:
            return 0
        count, self.said_at, self.unsaid = self.unsaid, now, 0
        return count


def poll_timeout_ms(deadlines: Iterable[float], now: float) -> int:
    """Milliseconds ``poll()`` may sleep until the nearest of ``deadlines`` (monotonic)."""
    delay = min(deadlines, default=math.inf) - now
    if delay == math.inf:
        return MAX_POLL_MS
    return min(max(0, math.ceil(delay * 1000)), MAX_POLL_MS)
