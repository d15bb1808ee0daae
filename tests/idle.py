"""How much a process does while nothing should happen, and what could explain it.

Shared by the daemon's idle tests and ``bench/bench_restore.py``.
"""

from __future__ import annotations

import os
import select
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from capkeeper.watcher import Watcher


def context_switches(pid: int) -> int:
    """Voluntary context switches of every thread of ``pid`` (each one a wake-up)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        for line in (task / "status").read_text().splitlines():
            if line.startswith("voluntary_ctxt_switches:"):
                total += int(line.split()[1])
    return total


def cpu_seconds(pid: int) -> float:
    """User and system CPU time that ``pid`` has used so far (``/proc/PID/stat``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Idleness:
    """What a daemon did while a test left it alone, and what could explain it."""

    wakeups: int  # voluntary context switches: each time it slept and was woken
    events: int  # inotify events raised meanwhile in the directories it watches
    cpu: float  # seconds of CPU it used


def measure_idle(pid: int, directories: Iterable[str | Path], seconds: float) -> Idleness:
    """Count what process ``pid`` does over ``seconds``, with a witness of ``directories``.

    The witness is an inotify watch of our own with the daemon's mask, read by a
    thread as soon as events come: the kernel merges an event into an identical
    one still unread at the tail of a queue, so a witness read once at the end
    counts fewer events than a daemon that reads each one promptly. (A busy loop
    on a descriptor that is always ready sleeps never: it shows as CPU, not as
    wake-ups.)
    """
    with Watcher() as witness:
        assert not witness.sync(map(str, directories))
        done = threading.Event()
        seen: list[int] = []

        def read() -> None:
            while not done.is_set():
                if select.select([witness], [], [], 0.05)[0]:
                    seen.append(len(witness.read()))

        reader = threading.Thread(target=read)
        reader.start()
        try:
            time.sleep(0.1)
            wakeups, events, cpu = context_switches(pid), sum(seen), cpu_seconds(pid)
            time.sleep(seconds)
            return Idleness(
                context_switches(pid) - wakeups, sum(seen) - events, cpu_seconds(pid) - cpu
            )
        finally:
            done.set()
            reader.join()
