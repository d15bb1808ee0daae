"""Kernel facts read from ``/proc``.

This section: the inotify limits (``/proc/sys/fs/inotify``, see inotify(7)),
which the daemon names in its messages when a limit is reached.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

INOTIFY_SYSCTL = "/proc/sys/fs/inotify"


@dataclass(frozen=True, slots=True)
class InotifyLimits:
    """The per-user inotify limits; ``None`` where the value could not be read."""

    max_user_watches: int | None
    max_user_instances: int | None
    max_queued_events: int | None


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text(encoding="ascii").strip())
    except (OSError, ValueError):
        return None


def inotify_limits(root: str = INOTIFY_SYSCTL) -> InotifyLimits:
    """Read ``max_user_watches``, ``max_user_instances`` and ``max_queued_events``."""
    base = Path(root)
    return InotifyLimits(
        max_user_watches=_read_int(base / "max_user_watches"),
        max_user_instances=_read_int(base / "max_user_instances"),
        max_queued_events=_read_int(base / "max_queued_events"),
    )
