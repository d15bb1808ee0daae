"""What a storm of irrelevant events costs ``capkeeper watch``, against a bare inotify reader.

Declares ``--binaries`` copies of ``true`` (carrying their capabilities) in one
root-owned directory under a fresh ``/var/tmp/capkeeper-bench-storm-*`` and
starts ``capkeeper watch`` on them (JSON log at debug level, so that quiet
overflow rescans are logged too; rescan interval 3600 s). A baseline
consumer runs next to it: a separate process with the same interpreter, an
inotify watch on the same directory with the daemon's mask and a plain
``read()`` loop that parses every event and looks its name up in the set of
declared names: the floor of what any Python watcher must do per event.

Then one process creates, closes and unlinks other files in that directory as
fast as it can (or at ``--rate`` events a second: a slow flood, whatever the
host's speed), ``--events`` / 3 times (three events each: ``IN_CREATE``,
``IN_CLOSE_WRITE``, ``IN_DELETE``), and a last file tells the consumer to
stop. Both consumers read the same storm at the same time. Figures:

- the daemon's CPU seconds (utime + stime from ``/proc/PID/stat``) from just
  before the storm until it has read everything (its CPU time stops growing)
  -> events per daemon CPU-second; the consumer's own events per CPU-second;
- ``rescan`` events with cause ``overflow`` and ``queue_overflow`` warnings in
  the daemon's log, next to the overflows the consumer saw in its own queue
  of the same size (the consumer overflowing too means the storm outran any
  reader on this machine at this moment);
- every declared binary still carries its capabilities afterwards.

    .venv/bin/python bench/bench_storm.py [--events 150000] [--rate N] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchlib import (
    DAEMON_MASK,
    TRUSTED,
    XATTR,
    Daemon,
    build_tree,
    cpu_seconds,
    emit,
    reference_value,
    settled_cpu,
    write_state,
)

END = "storm-end"
CONSUMER = r"""
import ctypes, json, os, struct, sys, time
libc = ctypes.CDLL(None, use_errno=True)
fd = libc.inotify_init1(os.O_CLOEXEC)
if libc.inotify_add_watch(fd, os.fsencode(sys.argv[1]), int(sys.argv[2])) < 0:
    raise OSError(ctypes.get_errno(), "inotify_add_watch")
declared = {os.fsencode(name) for name in sys.argv[4:]}
end = os.fsencode(sys.argv[3])
header = struct.Struct("iIII")
events = overflows = relevant = 0
done = False
print("ready", flush=True)
start = time.process_time()
while not done:
    data = os.read(fd, 65536)
    offset = 0
    while offset < len(data):
        wd, mask, cookie, length = header.unpack_from(data, offset)
        name = data[offset + 16 : offset + 16 + length].rstrip(b"\0")
        offset += 16 + length
        events += 1
        if mask & 0x4000:
            overflows += 1
        elif name in declared:
            relevant += 1
        elif name == end:
            done = True
cpu = time.process_time() - start
print(json.dumps({"events": events, "overflows": overflows, "relevant": relevant, "cpu_s": cpu}))
"""
STORM = r"""
import os, sys, time
where = os.open(sys.argv[1], os.O_RDONLY | os.O_DIRECTORY)
rate = float(sys.argv[3]) / 3  # rounds a second (0: as fast as it can)
start = time.monotonic()
for i in range(int(sys.argv[2])):
    if rate:
        ahead = i / rate - (time.monotonic() - start)
        if ahead > 0.0005:
            time.sleep(ahead)
    name = f"storm{i % 64}"
    os.close(os.open(name, os.O_CREAT | os.O_WRONLY, 0o600, dir_fd=where))
    os.unlink(name, dir_fd=where)
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=150_000, help="events the storm raises")
    parser.add_argument(
        "--rate", type=float, default=0, help="events a second (0: as fast as it can)"
    )
    parser.add_argument("--binaries", type=int, default=20)
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench_storm.py needs root (root-owned declared files)")
        return 2
    base = Path(tempfile.mkdtemp(prefix="capkeeper-bench-storm-", dir="/var/tmp"))
    daemon: Daemon | None = None
    consumer: subprocess.Popen[str] | None = None
    try:
        os.chmod(base, TRUSTED)
        binaries = build_tree(base / "tree", 1, args.binaries)
        directory = binaries[0].parent
        value = reference_value(binaries[0])
        for binary in binaries:
            os.setxattr(binary, XATTR, value)
        state = base / "state.toml"
        write_state(state, binaries)
        daemon = Daemon(state, base / "run", log_level="debug")
        ready = daemon.wait_ready()
        argv = [sys.executable, "-I", "-c", CONSUMER, str(directory), str(DAEMON_MASK), END]
        consumer = subprocess.Popen(
            argv + [b.name for b in binaries], stdout=subprocess.PIPE, text=True
        )
        assert consumer.stdout is not None
        if consumer.stdout.readline().strip() != "ready":
            raise SystemExit("the baseline consumer did not start")
        time.sleep(1.0)  # the start-up echoes are read
        mark = len(daemon.events())
        iterations = args.events // 3
        limit = int(Path("/proc/sys/fs/inotify/max_queued_events").read_text())

        cpu0 = cpu_seconds(daemon.pid)
        started = time.perf_counter()
        subprocess.run(
            [sys.executable, "-I", "-c", STORM, str(directory), str(iterations), str(args.rate)],
            check=True,
        )
        storm_s = time.perf_counter() - started
        (directory / END).touch()
        (directory / END).unlink()
        baseline = json.loads(consumer.communicate(timeout=300)[0])
        daemon_cpu = settled_cpu(daemon.pid, time.perf_counter() + 300) - cpu0
        raised = iterations * 3
        events = daemon.events()[mark:]
        rescans = [e for e in events if e.get("event") == "rescan" and e["cause"] == "overflow"]
        warnings = [e for e in events if e.get("event") == "queue_overflow"]
        carrying = sum(os.getxattr(b, XATTR) == value for b in binaries)
        # /proc counts CPU in clock ticks (10 ms): below one, the rate is a lower bound.
        tick = 1 / os.sysconf("SC_CLK_TCK")
        ours = raised / max(daemon_cpu, tick)
        theirs = baseline["events"] / max(baseline["cpu_s"], 1e-6)
        print(
            f"storm: {raised} irrelevant events in {storm_s:.2f} s "
            f"({raised / storm_s:,.0f}/s) in a directory with {len(binaries)} declared binaries; "
            f"queue limit {limit}"
        )
        print(
            f"daemon: {daemon_cpu:.2f} CPU-s -> {ours:,.0f} events per CPU-second; "
            f"{len(rescans)} overflow rescans, {len(warnings)} queue_overflow warnings"
        )
        print(
            f"bare inotify reader: {baseline['events']} events, {baseline['cpu_s']:.2f} CPU-s -> "
            f"{theirs:,.0f} events per CPU-second; {baseline['overflows']} overflows of its queue"
        )
        print(f"ratio daemon/reader: {ours / theirs:.3f}; {carrying} of {len(binaries)} in sync")
        results = {
            "events": raised,
            "rate": args.rate,
            "storm_s": round(storm_s, 3),
            "queue_limit": limit,
            "ready_s": round(ready, 3),
            "daemon_cpu_s": round(daemon_cpu, 3),
            "events_per_cpu_s": round(ours),
            "below_resolution": daemon_cpu < tick,
            "overflow_rescans": len(rescans),
            "queue_overflows": len(warnings),
            "baseline_events": baseline["events"],
            "baseline_cpu_s": round(baseline["cpu_s"], 3),
            "baseline_events_per_cpu_s": round(theirs),
            "baseline_overflows": baseline["overflows"],
            "ratio": round(ours / theirs, 4),
            "in_sync": carrying,
        }
        code = daemon.stop()
        results["exit_code"] = code
        emit(results, args.json)
        return 0 if carrying == len(binaries) and code == 0 else 1
    finally:
        if consumer is not None and consumer.poll() is None:
            consumer.kill()
            consumer.wait()
        if daemon is not None:
            daemon.close()
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
