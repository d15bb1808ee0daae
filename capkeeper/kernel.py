"""Facts about the running kernel and this process, read from ``/proc``.

The one reader of those files: the pure core takes the values as arguments
(``last_cap``), so it runs the same on built inputs in tests. Also the inotify
limits (``/proc/sys/fs/inotify``, see inotify(7)), which the daemon names in its
messages when a limit is reached.
"""

from __future__ import annotations

import functools
import os
from typing import NamedTuple

from capkeeper.capabilities import CAP_LAST_CAP
from capkeeper.errors import PrivilegeError

_MAX_BITS = 64  # __CAP_MAXBITS: two 32-bit words in v2/v3 values


@functools.cache
def cap_last_cap(path: str = "/proc/sys/kernel/cap_last_cap") -> int:
    """Return the running kernel's highest capability number.

    Falls back to :data:`~capkeeper.capabilities.CAP_LAST_CAP` when the file
    cannot be read or holds something other than a number in 0..63 (kernels
    before 3.2 have no such file). The answer is cached per path.
    """
    try:
        with open(path, encoding="ascii") as file:
            value = int(file.read().strip())
    except (OSError, ValueError):
        return CAP_LAST_CAP
    return value if 0 <= value < _MAX_BITS else CAP_LAST_CAP


def effective_capabilities(status_path: str = "/proc/self/status") -> int:
    """This process's effective capability set (``CapEff:``) as a bit mask."""
    with open(status_path, encoding="ascii") as handle:
        for line in handle:
            if line.startswith("CapEff:"):
                return int(line.split(":", 1)[1].strip(), 16)
    raise PrivilegeError(f"no CapEff line in {status_path}")


INOTIFY_SYSCTL = "/proc/sys/fs/inotify"


class InotifyLimits(NamedTuple):
    """The per-user inotify limits; ``None`` where the value could not be read."""

    max_user_watches: int | None
    max_user_instances: int | None
    max_queued_events: int | None


def _read_int(path: str) -> int | None:
    try:
        with open(path, encoding="ascii") as file:
            return int(file.read().strip())
    except (OSError, ValueError):
        return None


def inotify_limits(root: str = INOTIFY_SYSCTL) -> InotifyLimits:
    """Read ``max_user_watches``, ``max_user_instances`` and ``max_queued_events``."""
    return InotifyLimits(
        max_user_watches=_read_int(os.path.join(root, "max_user_watches")),
        max_user_instances=_read_int(os.path.join(root, "max_user_instances")),
        max_queued_events=_read_int(os.path.join(root, "max_queued_events")),
    )
