"""Restore latency of ``capkeeper watch`` for rename-over deploys, and its idleness.

Builds 1,000 declared binaries (copies of ``true``) in 50 directories, starts
``python -m capkeeper watch`` on them (waiting for ``READY=1`` on a real
notify socket), then repeatedly renames a fresh, capability-less build over a
random declared binary and measures the time from just before ``rename()`` to
the moment the declared capabilities are back on the new inode. The wait uses
the benchmark's own inotify watch (``IN_ATTRIB``, raised by the daemon's
``setxattr``) and confirms each wake-up by reading the xattr, so it does not
spin on a CPU the daemon needs.

The baseline of the same run is a minimal pyinotify restorer (a separate
process that trusts everything and only puts the value back on declared names
after ``IN_MOVED_TO``, ``IN_CLOSE_WRITE`` or ``IN_ATTRIB``): blocks of
``--block`` deploys alternate between the daemon and it, the other one being
stopped (``SIGSTOP``), so both meet the same load. ``--samples`` is per restorer.

Then it counts the daemon's wake-ups while nothing happens (voluntary context
switches of all its threads, from ``/proc/PID/task/*/status``) and the CPU it
uses, next to the events that other processes raised meanwhile in the
directories it watches (``/var/tmp`` is shared): those wake it legitimately.

Run as root:  .venv/bin/python bench/bench_restore.py [--samples 1000] [--idle 10]
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import json
import os
import random
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchlib import measure_idle, route

REPO = Path(__file__).resolve().parents[1]

XATTR = "security.capability"
CAPS = "cap_net_bind_service=+ep"
IN_ATTRIB = 0x4
# Root-owned 0755: what the trust policy requires of binaries and their directories.
TRUSTED = 0o755


# The floor in the same run: a restorer that trusts everything and only puts the
# value back on declared names (what capkeeper does after its checks).
MINIMAL_RESTORER = r"""
import errno, os, sys, pyinotify
value = bytes.fromhex(sys.argv[1])
declared = {}
for line in open(sys.argv[2]):
    directory, name = os.path.split(line.strip())
    declared.setdefault(directory, set()).add(name)

class Restore(pyinotify.ProcessEvent):
    def process_default(self, event):
        if event.name not in declared.get(event.path, ()):
            return
        try:
            if os.getxattr(event.pathname, "security.capability") == value:
                return
        except OSError as exc:
            if exc.errno != errno.ENODATA:
                return
        try:
            os.setxattr(event.pathname, "security.capability", value)
        except OSError:
            pass

manager = pyinotify.WatchManager()
mask = pyinotify.IN_MOVED_TO | pyinotify.IN_CLOSE_WRITE | pyinotify.IN_ATTRIB
for directory in declared:
    manager.add_watch(directory, mask)
notifier = pyinotify.Notifier(manager, Restore())
print("ready", flush=True)
notifier.loop()
"""


def _percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(fraction * (len(ordered) - 1))))
    return ordered[index]


def _inotify_watches(pid: int) -> int:
    """inotify watches held by ``pid`` (``inotify wd:`` lines in its fdinfo)."""
    count = 0
    for info in Path(f"/proc/{pid}/fdinfo").iterdir():
        try:
            text = info.read_text()
        except OSError:
            continue
        count += sum(1 for line in text.splitlines() if line.startswith("inotify wd:"))
    return count


class _AttribWaiter:
    """The benchmark's own inotify instance: wakes when an xattr changes in a directory."""

    def __init__(self, directories: list[Path]) -> None:
        self._libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self._libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        for directory in directories:
            if self._libc.inotify_add_watch(self.fd, str(directory).encode(), IN_ATTRIB) < 0:
                raise OSError(ctypes.get_errno(), f"inotify_add_watch {directory}")
        self._poll = select.poll()
        self._poll.register(self.fd, select.POLLIN)

    def drain(self) -> None:
        while True:
            try:
                if not os.read(self.fd, 65536):
                    return
            except BlockingIOError:
                return

    def wait_for(self, path: Path, expected: bytes, deadline: float) -> bool:
        while True:
            try:
                if os.getxattr(path, XATTR) == expected:
                    return True
            except OSError as exc:
                if exc.errno != errno.ENODATA:
                    raise
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                return False
            self._poll.poll(max(1, int(remaining * 1000)))
            self.drain()

    def close(self) -> None:
        os.close(self.fd)


def _build_tree(root: Path, directories: int, per_directory: int) -> list[Path]:
    source = Path(shutil.which("true") or "/bin/true").read_bytes()
    binaries = []
    for d in range(directories):
        directory = root / f"srv{d:02d}" / "bin"
        directory.mkdir(parents=True, mode=0o755)
        os.chmod(directory.parent, TRUSTED)
        for b in range(per_directory):
            path = directory / f"tool{b:03d}"
            path.write_bytes(source)
            os.chmod(path, TRUSTED)
            binaries.append(path)
    return binaries


def _state(path: Path, binaries: list[Path]) -> None:
    path.write_text("".join(f'[[binary]]\npath = "{b}"\ncaps = "{CAPS}"\n\n' for b in binaries))


def _read_events(log: Path) -> list[dict[str, Any]]:
    events = []
    for line in log.read_text().splitlines():
        try:
            events.append(json.loads(line))
        except ValueError:
            continue
    return events


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--directories", type=int, default=50)
    parser.add_argument("--per-directory", type=int, default=20)
    parser.add_argument("--samples", type=int, default=1000, help="for each restorer")
    parser.add_argument("--block", type=int, default=50, help="samples before switching")
    parser.add_argument("--gap", type=float, default=0.01, help="seconds between deploys")
    parser.add_argument("--idle", type=float, default=10.0, help="seconds of idleness to count")
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--status-file", help="where the daemon writes its status file")
    parser.add_argument(
        "--watchdog-usec", type=int, help="run the daemon with this WATCHDOG_USEC (systemd's)"
    )
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench_restore.py needs root (the daemon writes security.capability)")
        return 2
    random.seed(args.seed)
    base = Path(tempfile.mkdtemp(prefix="capkeeper-bench-", dir="/var/tmp"))
    os.chmod(base, TRUSTED)
    daemon: subprocess.Popen[bytes] | None = None
    waiter: _AttribWaiter | None = None
    restorer: subprocess.Popen[bytes] | None = None
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        root = base / "tree"
        root.mkdir(mode=0o755)
        started = time.perf_counter()
        binaries = _build_tree(root, args.directories, args.per_directory)
        directories = sorted({b.parent for b in binaries})
        print(
            f"tree: {len(binaries)} binaries in {len(directories)} directories "
            f"({time.perf_counter() - started:.1f} s to build)"
        )
        state = base / "state.toml"
        _state(state, binaries)
        # The daemon's own files live outside every watched directory (as /run does).
        run = base / "run"
        run.mkdir()
        notify.bind(str(run / "notify.sock"))
        log = run / "daemon.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("NOTIFY_", "WATCHDOG_"))}
        env["NOTIFY_SOCKET"] = str(run / "notify.sock")
        if args.watchdog_usec:
            env["WATCHDOG_USEC"] = str(args.watchdog_usec)
        argv = [sys.executable, "-m", "capkeeper", "watch", "--state", str(state)]
        argv += ["--log-format", "json", "--log-level", "info"]
        argv += ["--status-file", args.status_file or str(run / "status.json")]
        spawn = time.perf_counter()
        with open(log, "wb") as log_handle:
            daemon = subprocess.Popen(argv, cwd=REPO, env=env, stderr=log_handle)
        notify.settimeout(120)
        while b"READY=1" not in notify.recv(4096):
            pass
        ready = time.perf_counter() - spawn
        startup = next(
            e for e in _read_events(log) if e.get("event") == "rescan" and e["cause"] == "startup"
        )
        watches = _inotify_watches(daemon.pid)
        print(
            f"daemon: READY=1 after {ready:.2f} s (start-up reconcile of {startup['entries']} "
            f"entries: {startup['duration_ms'] / 1000:.2f} s, {startup.get('restored', 0)} "
            f"restored); inotify watches: {watches}"
        )
        expected = os.getxattr(binaries[0], XATTR)
        time.sleep(1.0)  # the start-up restores echo back as 1,000 IN_ATTRIB: let them pass
        waiter = _AttribWaiter(directories)
        source = Path(shutil.which("true") or "/bin/true").read_bytes()
        listing = run / "declared.txt"
        listing.write_text("".join(f"{b}\n" for b in binaries))
        restorer = subprocess.Popen(
            [sys.executable, "-c", MINIMAL_RESTORER, expected.hex(), str(listing)],
            stdout=subprocess.PIPE,
        )
        assert restorer.stdout is not None
        if restorer.stdout.readline().strip() != b"ready":
            raise SystemExit("the minimal restorer did not start")
        samples: dict[str, list[float]] = {"capkeeper": [], "minimal": []}
        missed = 0
        number = 0
        # Alternate blocks: only one restorer runs (the other is stopped), both meet
        # the same machine load over the run.
        blocks = -(-args.samples // args.block)
        for block in range(2 * blocks):
            who = ("capkeeper", "minimal")[block % 2]
            running, stopped = (daemon, restorer) if who == "capkeeper" else (restorer, daemon)
            stopped.send_signal(signal.SIGSTOP)
            running.send_signal(signal.SIGCONT)
            time.sleep(0.3)  # it reads what it missed while stopped
            for _ in range(min(args.block, args.samples - (block // 2) * args.block)):
                number += 1
                target = random.choice(binaries)  # noqa: S311 - a sample, not a secret
                fresh = target.with_name(f".{target.name}.new{number}")
                fresh.write_bytes(source + number.to_bytes(4, "little"))
                os.chmod(fresh, TRUSTED)
                time.sleep(args.gap)  # let the restorer go back to sleep
                waiter.drain()
                t0 = time.perf_counter()
                os.rename(fresh, target)
                if waiter.wait_for(target, expected, t0 + 2.0):
                    samples[who].append(time.perf_counter() - t0)
                elif who == "capkeeper":
                    missed += 1
        daemon.send_signal(signal.SIGCONT)
        restorer.kill()
        restorer.wait()
        latencies = samples["capkeeper"]
        minimal = [value * 1000 for value in samples["minimal"]]
        time.sleep(0.5)
        restored = [
            e
            for e in _read_events(log)
            if e.get("event") == "capability_restored" and str(e.get("cause", "")).startswith("IN_")
        ]
        daemon_ms = [float(e["latency_ms"]) for e in restored if "latency_ms" in e]
        ms = [value * 1000 for value in latencies]
        print(
            f"rename-over restore, {len(ms)} samples ({missed} missed): "
            f"median {statistics.median(ms):.3f} ms, p90 {_percentile(ms, 0.9):.3f} ms, "
            f"p99 {_percentile(ms, 0.99):.3f} ms, max {max(ms):.3f} ms"
        )
        print(
            f"  daemon's own event->restored (latency_ms field): median "
            f"{statistics.median(daemon_ms):.3f} ms, p99 {_percentile(daemon_ms, 0.99):.3f} ms"
        )
        print(
            f"minimal pyinotify restorer, same run, {len(minimal)} samples: median "
            f"{statistics.median(minimal):.3f} ms, p99 {_percentile(minimal, 0.99):.3f} ms; "
            f"ratio of medians capkeeper/minimal "
            f"{statistics.median(ms) / statistics.median(minimal):.2f}"
        )
        time.sleep(1.0)
        watched = route(binaries)
        idle = measure_idle(daemon.pid, watched, args.idle)
        watchdog = (
            f"watchdog ping every {args.watchdog_usec / 2e6:g} s"
            if args.watchdog_usec
            else "no watchdog"
        )
        print(
            f"idle: {idle.wakeups} wake-ups (voluntary context switches) and "
            f"{idle.cpu:.2f} s of CPU in {args.idle:g} s, with {idle.events} events in its "
            f"directories (rescan interval 300 s, {watchdog})"
        )
        results = {
            "binaries": len(binaries),
            "directories": len(directories),
            "inotify_watches": watches,
            "ready_s": round(ready, 3),
            "startup_reconcile_ms": startup["duration_ms"],
            "samples": len(ms),
            "missed": missed,
            "median_ms": round(statistics.median(ms), 3),
            "p90_ms": round(_percentile(ms, 0.9), 3),
            "p99_ms": round(_percentile(ms, 0.99), 3),
            "max_ms": round(max(ms), 3),
            "daemon_median_ms": round(statistics.median(daemon_ms), 3),
            "daemon_p99_ms": round(_percentile(daemon_ms, 0.99), 3),
            "minimal_samples": len(minimal),
            "minimal_median_ms": round(statistics.median(minimal), 3),
            "minimal_p99_ms": round(_percentile(minimal, 0.99), 3),
            "median_ratio": round(statistics.median(ms) / statistics.median(minimal), 3),
            "idle_seconds": args.idle,
            "idle_wakeups": idle.wakeups,
            "idle_events": idle.events,
            "idle_cpu_s": idle.cpu,
            "watchdog_usec": args.watchdog_usec,
        }
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
        daemon.send_signal(signal.SIGTERM)
        code = daemon.wait(30)
        print(f"daemon stopped with exit status {code}")
        return 0 if missed == 0 and code == 0 else 1
    finally:
        if waiter is not None:
            waiter.close()
        if restorer is not None and restorer.poll() is None:
            restorer.kill()
            restorer.wait()
        notify.close()
        if daemon is not None and daemon.poll() is None:
            daemon.kill()
            daemon.wait()
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
