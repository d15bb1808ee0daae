"""``capkeeper watch`` at 10,000 declared binaries: start-up, memory and idleness.

Builds ``--directories`` x ``--per-directory`` (default 100 x 100) distinct
root-owned 0755 copies of ``true`` under a fresh
``/var/tmp/capkeeper-bench-scale-*``, all declared with
``cap_net_bind_service=+ep``, and measures, with ``capkeeper watch``
reporting to a real ``AF_UNIX`` datagram socket passed as ``NOTIFY_SOCKET``:

1. in sync, no cache: every binary carries its capabilities; seconds from
   spawning the daemon to ``READY=1``, with its cache directory emptied before
   each of ``--starts`` starts (the figure is their median: one start on this
   shared VM varies by a fifth); then its ``VmRSS`` and ``VmHWM``
   (``/proc/PID/status``);
2. all restored: every capability removed first; seconds to ``READY=1``, then
   ``getxattr`` on every binary (all must carry the declared value), ``VmRSS``
   and ``VmHWM``, and the CPU it spends after ``READY=1`` reading the echo of
   its own restores (until its CPU time stops growing);
3. idleness: after a little activity (``--strip`` binaries stripped and
   restored), ``--idle-after`` seconds later, the daemon's wake-ups
   (voluntary context switches of its threads) over ``--idle`` seconds, next
   to the events a witness watch with the daemon's mask saw meanwhile in the
   directories it watches (``/var/tmp`` is shared: those wake it
   legitimately). Rescan interval 3600 s, no watchdog. The default
   ``--idle-after`` (1.5 s) lets the activity end: the daemon writes its
   status file at most once a second, so a change within a second of the
   last write is written up to a second later, in a wake-up of its own
   (with ``fsync`` on ext4, 15 to 27 context switches at 10,000 entries);
4. restart, warm cache: ``--starts`` more starts in sync, each finding the
   cache the others wrote; the figure is their median.

Baselines of the same run: ``getcap -r`` over the tree and this Python
stat-ing and reading the xattr of every binary (the floor of any reconcile),
and the ``VmRSS`` of a bare ``python -I``.

    .venv/bin/python bench/bench_scale.py [--directories 100 --per-directory 100] [--starts 3]
        [--json OUT]
"""

from __future__ import annotations

import argparse
import errno
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, NamedTuple

from benchlib import (
    TRUSTED,
    XATTR,
    Daemon,
    build_tree,
    cpu_seconds,
    emit,
    measure_idle,
    memory_kib,
    reference_value,
    route,
    settled_cpu,
    write_state,
)

BARE_RSS = "print(open('/proc/self/status').read().split('VmRSS:')[1].split()[0])"


def _carrying(binaries: list[Path], value: bytes) -> int:
    count = 0
    for binary in binaries:
        try:
            count += os.getxattr(binary, XATTR) == value
        except OSError as exc:
            if exc.errno != errno.ENODATA:
                raise
    return count


def _startup(daemon: Daemon) -> dict[str, Any]:
    for event in daemon.events():
        if event.get("event") == "rescan" and event.get("cause") == "startup":
            return event
    return {}


class _Starts(NamedTuple):
    """Starts of the daemon with every binary in sync (see :func:`_starts_in_sync`)."""

    each: list[float]  # seconds from spawning to READY=1, start by start
    startup: dict[str, Any]  # the start-up rescan event of the median start
    memory: dict[str, int]  # the largest VmRSS and VmHWM of them, KiB
    code: int  # the first exit status other than 0, else 0

    @property
    def median(self) -> float:
        return statistics.median(self.each)


def _starts_in_sync(
    state: Path, base: Path, cache: Path, daemons: list[Daemon], *, starts: int, fresh: bool
) -> _Starts:
    """Start and stop the daemon ``starts`` times, every binary in sync: with its cache
    directory emptied before each start (``fresh``), or finding the cache the others wrote."""
    label = "in sync, no cache" if fresh else "restart, all in sync, warm cache"
    each: list[float] = []
    events: list[dict[str, Any]] = []
    codes: list[int] = []
    memory = {"VmRSS": 0, "VmHWM": 0}
    for start in range(starts):
        if fresh:
            shutil.rmtree(cache, ignore_errors=True)
            cache.mkdir(mode=0o700)
        daemon = Daemon(state, base / f"run-{'sync' if fresh else 'warm'}-{start}", cache=cache)
        daemons.append(daemon)
        ready = daemon.wait_ready()
        startup = _startup(daemon)
        seen = memory_kib(daemon.pid)
        codes.append(daemon.stop())
        each.append(ready)
        events.append(startup)
        memory = {key: max(memory[key], seen[key]) for key in memory}
        print(
            f"{label} ({start + 1}/{starts}): READY=1 after {ready:.3f} s (start-up reconcile "
            f"{startup.get('duration_ms', float('nan')) / 1000:.3f} s); VmRSS "
            f"{seen['VmRSS'] / 1024:.1f} MiB, VmHWM {seen['VmHWM'] / 1024:.1f} MiB"
        )
    median = events[each.index(statistics.median_low(each))]
    return _Starts(each, median, memory, next((code for code in codes if code != 0), 0))


def _wait_all(binaries: list[Path], value: bytes, deadline: float) -> bool:
    while time.perf_counter() < deadline:
        if _carrying(binaries, value) == len(binaries):
            return True
        time.sleep(0.01)
    return False


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--directories", type=int, default=100)
    parser.add_argument("--per-directory", type=int, default=100)
    parser.add_argument(
        "--starts", type=int, default=3, help="starts with no cache, and warm restarts (median)"
    )
    parser.add_argument("--strip", type=int, default=20, help="binaries stripped before idling")
    parser.add_argument(
        "--idle-after",
        type=float,
        default=1.5,
        help="seconds after activity (the status file may be written up to 1 s after it)",
    )
    parser.add_argument("--idle", type=float, default=5.0, help="seconds of idleness to count")
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    args = parser.parse_args()
    if args.starts < 1:
        parser.error("--starts must be 1 or more")
    if os.geteuid() != 0:
        print("bench_scale.py needs root (the daemon writes security.capability)")
        return 2
    random.seed(1)
    base = Path(tempfile.mkdtemp(prefix="capkeeper-bench-scale-", dir="/var/tmp"))
    daemons: list[Daemon] = []
    try:
        os.chmod(base, TRUSTED)
        tree = base / "tree"
        tree.mkdir(mode=TRUSTED)
        started = time.perf_counter()
        binaries = build_tree(tree, args.directories, args.per_directory)
        value = reference_value(binaries[0])
        for binary in binaries:
            os.setxattr(binary, XATTR, value)
        state = base / "state.toml"
        write_state(state, binaries)
        print(
            f"tree: {len(binaries)} binaries in {args.directories} directories "
            f"({time.perf_counter() - started:.1f} s to build)"
        )

        started = time.perf_counter()
        listed = subprocess.run(["getcap", "-r", str(tree)], capture_output=True, check=True)
        getcap_s = time.perf_counter() - started
        if len(listed.stdout.splitlines()) != len(binaries):
            raise SystemExit("getcap -r does not list every binary")
        started = time.perf_counter()
        for binary in binaries:
            os.stat(binary)
            os.getxattr(binary, XATTR)
        python_s = time.perf_counter() - started
        bare = subprocess.run(
            [sys.executable, "-I", "-c", BARE_RSS], stdout=subprocess.PIPE, check=True
        )
        bare_rss = int(bare.stdout)
        print(
            f"baselines: getcap -r {getcap_s:.3f} s; python stat+getxattr of every binary "
            f"{python_s:.3f} s; bare python -I VmRSS {bare_rss / 1024:.1f} MiB"
        )

        # The daemon's cache (capkeeper.cache) in a directory of the run's own, given as an
        # option like the unit's default: emptied before each start with no cache; the
        # all-restored start and the restarts at the end find what the others wrote.
        cache = base / "cache"
        cold = _starts_in_sync(state, base, cache, daemons, starts=args.starts, fresh=True)

        for binary in binaries:
            os.removexattr(binary, XATTR)
        daemon = Daemon(state, base / "run-strip", cache=cache)
        daemons.append(daemon)
        ready_strip = daemon.wait_ready()
        carrying = _carrying(binaries, value)
        strip_startup = _startup(daemon)
        memory_strip = memory_kib(daemon.pid)
        # Its own 10,000 setxattr come back as IN_ATTRIB events after READY=1.
        cpu_ready, woke = cpu_seconds(daemon.pid), time.perf_counter()
        echo_cpu = settled_cpu(daemon.pid, woke + 300) - cpu_ready
        echo_s = time.perf_counter() - woke - 0.5
        print(
            f"all stripped: READY=1 after {ready_strip:.3f} s (start-up reconcile "
            f"{strip_startup.get('duration_ms', float('nan')) / 1000:.3f} s, "
            f"{strip_startup.get('restored', 0)} restored); {carrying} of {len(binaries)} carry "
            f"their capabilities at READY; VmRSS {memory_strip['VmRSS'] / 1024:.1f} MiB, "
            f"VmHWM {memory_strip['VmHWM'] / 1024:.1f} MiB"
        )
        print(
            f"after READY=1: {echo_cpu:.2f} CPU-s over {echo_s:.2f} s reading the echo of its "
            "own restores (until its CPU time stopped growing for 0.5 s)"
        )

        stripped = random.sample(binaries, min(args.strip, len(binaries)))
        for binary in stripped:
            os.removexattr(binary, XATTR)
        activity_restored = _wait_all(stripped, value, time.perf_counter() + 60)
        time.sleep(args.idle_after)
        idle = measure_idle(daemon.pid, route(binaries), args.idle)
        print(
            f"idle: {idle.wakeups} wake-ups and {idle.cpu:.2f} s CPU in {args.idle:g} s, "
            f"{args.idle_after:g} s after {len(stripped)} restores "
            f"({'all' if activity_restored else 'NOT all'} restored); {idle.events} events "
            f"in its directories meanwhile (rescan interval 3600 s, no watchdog)"
        )
        code_strip = daemon.stop()

        warm = _starts_in_sync(state, base, cache, daemons, starts=args.starts, fresh=False)
        results = {
            "binaries": len(binaries),
            "directories": args.directories,
            "getcap_s": round(getcap_s, 4),
            "python_stat_s": round(python_s, 4),
            "python_rss_kib": bare_rss,
            "starts": args.starts,
            "ready_in_sync_s": round(cold.median, 4),
            "ready_in_sync_each_s": [round(ready, 4) for ready in cold.each],
            "startup_in_sync_ms": cold.startup.get("duration_ms"),
            "rss_in_sync_kib": cold.memory["VmRSS"],
            "hwm_in_sync_kib": cold.memory["VmHWM"],
            "ready_restored_s": round(ready_strip, 4),
            "startup_restored_ms": strip_startup.get("duration_ms"),
            "restored_logged": strip_startup.get("restored", 0),
            "carrying_at_ready": carrying,
            "rss_kib": max(cold.memory["VmRSS"], memory_strip["VmRSS"]),
            "rss_restored_kib": memory_strip["VmRSS"],
            "hwm_restored_kib": memory_strip["VmHWM"],
            "echo_cpu_s": round(echo_cpu, 3),
            "echo_s": round(echo_s, 3),
            "activity_restored": activity_restored,
            "idle_after_s": args.idle_after,
            "idle_seconds": args.idle,
            "idle_wakeups": idle.wakeups,
            "idle_events": idle.events,
            "idle_cpu_s": idle.cpu,
            "ready_warm_s": round(warm.median, 4),
            "ready_warm_each_s": [round(ready, 4) for ready in warm.each],
            "rss_warm_kib": warm.memory["VmRSS"],
            "exit_codes": [cold.code, code_strip],
            "exit_code_warm": warm.code,
        }
        emit(results, args.json)
        codes = (cold.code, code_strip, warm.code)
        ok = carrying == len(binaries) and activity_restored and codes == (0, 0, 0)
        return 0 if ok else 1
    finally:
        for daemon in daemons:
            daemon.close()
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
