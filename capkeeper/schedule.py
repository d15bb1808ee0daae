"""When the daemon looks at a declared binary again: retry back-off and the flap brake.

Pure: the clock reading (``now``, monotonic seconds) and what was observed
are passed in; nothing here sleeps, reads a file or logs.

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
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from capkeeper.model import Observation

RETRY_FIRST = 0.5  # seconds before a refused or failed entry is looked at again
RETRY_MAX = 30.0
# A restore of an unchanged file this soon after our previous restore of it (plus the
# brake we imposed ourselves) means something undid our write: one round of a fight.
FIGHT_WINDOW = 1.0
FIGHT_ROUNDS = 3  # rounds in a row before the brake engages (4 restores)
BRAKE = 1.0  # seconds between restores of a path while it is fought over
ALERT_EVERY = 60.0  # restore_flapping at most this often per path


@dataclass(frozen=True, slots=True)
class Identity:
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


@dataclass(frozen=True, slots=True)
class Verdict:
    """What the brake says about one restore."""

    not_before: float  # the path's next restore may not happen earlier (0: no brake)
    alert: bool  # log restore_flapping now
    rounds: int  # restores in a row undone with nothing else changed


@dataclass(slots=True)
class Brake:
    """One path's record of restores, to tell deploys from fights."""

    restored: Identity | None = None  # the file as it was when we last restored it
    restored_at: float = -math.inf
    rounds: int = 0
    alerted_at: float = -math.inf

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
