"""Event-path probe for ``capkeeper watch``: storm throughput, restore latency, idleness.

Builds 1,000 declared binaries (copies of ``true``) in 50 root-only directories
under a fresh ``/var/tmp/capkeeper-probe-*`` and measures, in one run:

1. **restore latency** of rename-over deploys (as ``bench_restore.py`` does:
   from just before ``rename()`` until the capabilities are back, waiting on an
   inotify watch of our own), first with a minimal pyinotify restorer (the
   baseline: ``Notifier`` + ``ProcessEvent``, ``setxattr`` on ``IN_MOVED_TO`` of
   a declared name, nothing else), then with ``python -m capkeeper watch``;
2. **irrelevant-event storm**: ``--storm`` seconds of one process creating,
   closing and unlinking *other* names in a watched directory as fast as it
   can (three events per round: IN_CREATE, IN_CLOSE_WRITE, IN_DELETE); the
   figure is events raised per second of daemon CPU (utime + stime), with the
   daemon's queue overflows counted from its log;
3. **idleness right after activity**: the daemon's wake-ups (voluntary context
   switches) in ``--idle`` seconds starting 0.1 s after the storm's last event
   (and after the last deploy).

Run as root:  .venv/bin/python bench/storm_probe.py [--samples 300] [--storm 10]
"""

from __future__ import annotations

import argparse
import json
import os
import random
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

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
from bench_restore import (  # noqa: E402 - bench/ is on the path now
    _AttribWaiter,
    _build_tree,
    _percentile,
    _state,
)

from tests.idle import context_switches, cpu_seconds  # noqa: E402 - bench_restore adds REPO

XATTR = "security.capability"
VALUE = bytes.fromhex("0100000200040000000000000000000000000000")  # cap_net_bind_service=+ep
MINIMAL_RESTORER = """
import os, sys, pyinotify
XATTR, VALUE = "security.capability", bytes.fromhex(sys.argv[1])
wanted = {tuple(line.rsplit("/", 1)) for line in open(sys.argv[2]).read().split()}
class Restore(pyinotify.ProcessEvent):
    def process_IN_MOVED_TO(self, event):
        if (event.path, event.name) in wanted:
            os.setxattr(event.pathname, XATTR, VALUE)
    process_IN_CLOSE_WRITE = process_IN_MOVED_TO
wm = pyinotify.WatchManager()
for directory in sorted({d for d, _ in wanted}):
    wm.add_watch(directory, pyinotify.IN_MOVED_TO | pyinotify.IN_CLOSE_WRITE)
notifier = pyinotify.Notifier(wm, Restore())
print("ready", flush=True)
notifier.loop()
"""
STORM = """
import os, sys, time
where, seconds = int(sys.argv[1]), float(sys.argv[2])
rounds, end = 0, time.monotonic() + seconds
while True:
    for i in range(64):
        name = f"noise-{i}"
        os.close(os.open(name, os.O_CREAT | os.O_WRONLY, 0o600, dir_fd=where))
        os.unlink(name, dir_fd=where)
    rounds += 64
    if time.monotonic() >= end:
        break
print(rounds)
"""


def _events(log: Path) -> list[dict[str, Any]]:
    found = []
    for line in log.read_text().splitlines():
        try:
            found.append(json.loads(line))
        except ValueError:
            continue
    return found


def _deploys(binaries: list[Path], samples: int, gap: float, waiter: _AttribWaiter) -> list[float]:
    source = Path(shutil.which("true") or "/bin/true").read_bytes()
    latencies: list[float] = []
    for number in range(samples):
        target = random.choice(binaries)  # noqa: S311 - a sample, not a secret
        fresh = target.with_name(f".{target.name}.new{number}")
        fresh.write_bytes(source + number.to_bytes(4, "little"))
        os.chmod(fresh, 0o755)  # noqa: S103 - the trust policy's root-owned 0755
        time.sleep(gap)
        waiter.drain()
        t0 = time.perf_counter()
        os.rename(fresh, target)
        if waiter.wait_for(target, VALUE, t0 + 2.0):
            latencies.append((time.perf_counter() - t0) * 1000)
    return latencies


def _summary(ms: list[float], samples: int) -> str:
    return (
        f"{len(ms)}/{samples} restored, median {statistics.median(ms):.3f} ms, "
        f"p90 {_percentile(ms, 0.9):.3f} ms, p99 {_percentile(ms, 0.99):.3f} ms, "
        f"max {max(ms):.3f} ms"
    )


def compare_dispatch(events: int = 15000) -> tuple[float, float]:
    """CPU seconds per irrelevant event: pyinotify's ``read_events`` + ``process_events``
    with a ``ProcessEvent`` that ignores them, then ``Instance.read`` + ``decode`` with a
    name filter (the figures in capkeeper/inotify.py's docstring)."""
    import pyinotify

    from capkeeper.inotify import Instance, decode, encode_names

    class Ignore(pyinotify.ProcessEvent):  # type: ignore[misc]
        def process_default(self, event: object) -> None:
            pass

    def flood(directory: str) -> None:
        for number in range(events // 3):  # IN_CREATE, IN_CLOSE_WRITE, IN_DELETE
            name = os.path.join(directory, f"noise{number}")
            os.close(os.open(name, os.O_CREAT | os.O_WRONLY, 0o600))
            os.unlink(name)

    mask = pyinotify.IN_CREATE | pyinotify.IN_CLOSE_WRITE | pyinotify.IN_DELETE
    with tempfile.TemporaryDirectory() as directory:
        manager = pyinotify.WatchManager()
        manager.add_watch(directory, mask)
        notifier = pyinotify.Notifier(manager, Ignore())
        flood(directory)
        started = time.process_time()
        notifier.read_events()
        notifier.process_events()
        theirs = (time.process_time() - started) / events
        notifier.stop()
        instance = Instance()
        wd = instance.add(directory, mask)
        flood(directory)
        started = time.process_time()
        decode(instance.read(), {wd: encode_names(["tool"])})
        ours = (time.process_time() - started) / events
        instance.close()
    return theirs, ours


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=300)
    parser.add_argument("--gap", type=float, default=0.01)
    parser.add_argument("--storm", type=float, default=10.0, help="seconds of storm")
    parser.add_argument("--idle", type=float, default=5.0)
    parser.add_argument("--src", type=Path, default=REPO, help="capkeeper source tree to run")
    parser.add_argument("--json", metavar="FILE")
    parser.add_argument(
        "--dispatch", action="store_true", help="only compare pyinotify's dispatch with decode"
    )
    args = parser.parse_args()
    if args.dispatch:
        for _ in range(3):
            pyinotify_s, decode_s = compare_dispatch()
            print(
                f"per irrelevant event: pyinotify read_events+process_events "
                f"{pyinotify_s * 1e6:.2f} µs; Instance.read+decode {decode_s * 1e6:.2f} µs"
            )
        return 0
    if os.geteuid() != 0:
        print("storm_probe.py needs root")
        return 2
    random.seed(1)
    base = Path(tempfile.mkdtemp(prefix="capkeeper-probe-", dir="/var/tmp"))
    os.chmod(base, 0o755)  # noqa: S103 - as bench_restore.py
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    processes: list[subprocess.Popen[bytes]] = []
    results: dict[str, Any] = {"src": str(args.src)}
    try:
        root = base / "tree"
        root.mkdir(mode=0o755)
        binaries = _build_tree(root, 50, 20)
        directories = sorted({b.parent for b in binaries})
        listing = base / "binaries.txt"
        listing.write_text("".join(f"{b}\n" for b in binaries))
        waiter = _AttribWaiter(directories)

        # 1a. the minimal pyinotify restorer
        restorer = subprocess.Popen(
            [sys.executable, "-c", MINIMAL_RESTORER, VALUE.hex(), str(listing)],
            stdout=subprocess.PIPE,
        )
        processes.append(restorer)
        assert restorer.stdout is not None
        restorer.stdout.readline()
        minimal = _deploys(binaries, args.samples, args.gap, waiter)
        restorer.send_signal(signal.SIGTERM)
        restorer.wait(10)
        print(f"minimal pyinotify restorer: {_summary(minimal, args.samples)}")

        # 1b. the daemon
        state = base / "state.toml"
        _state(state, binaries)
        run = base / "run"
        run.mkdir()
        notify.bind(str(run / "notify.sock"))
        log = run / "daemon.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("NOTIFY_", "WATCHDOG_"))}
        env["NOTIFY_SOCKET"] = str(run / "notify.sock")
        env["PYTHONPATH"] = str(args.src)
        argv = [sys.executable, "-m", "capkeeper", "watch", "--state", str(state)]
        argv += ["--log-format", "json", "--log-level", "info", "--rescan-interval", "300"]
        argv += ["--status-file", str(run / "status.json")]
        with open(log, "wb") as handle:
            daemon = subprocess.Popen(argv, cwd=args.src, env=env, stderr=handle)
        processes.append(daemon)
        notify.settimeout(120)
        while b"READY=1" not in notify.recv(4096):
            pass
        time.sleep(1.0)
        ours = _deploys(binaries, args.samples, args.gap, waiter)
        waiter.close()
        print(f"capkeeper watch:            {_summary(ours, args.samples)}")
        ratio = statistics.median(ours) / statistics.median(minimal)
        print(f"  median ratio capkeeper/minimal: {ratio:.2f}")
        time.sleep(0.1)
        switches = context_switches(daemon.pid)
        time.sleep(args.idle)
        after_deploys = context_switches(daemon.pid) - switches
        print(f"idle right after the deploys: {after_deploys} wake-ups in {args.idle:g} s")
        results.update(
            minimal_ms=minimal,
            daemon_ms=ours,
            median_ratio=ratio,
            idle_after_deploys=after_deploys,
        )

        # 2. the storm
        time.sleep(1.0)
        where = os.open(directories[0], os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        mark = len(_events(log))
        cpu0 = cpu_seconds(daemon.pid)
        storm = subprocess.run(
            ["/usr/bin/python3", "-c", STORM, str(where), str(args.storm)],
            pass_fds=(where,),
            capture_output=True,
            check=True,
        )
        os.close(where)
        time.sleep(0.1)
        used = cpu_seconds(daemon.pid) - cpu0
        raised = 3 * int(storm.stdout)
        log_events = _events(log)[mark:]
        overflows = sum(1 for e in log_events if e.get("event") == "queue_overflow")
        print(
            f"storm: {raised} irrelevant events in {args.storm:g} s "
            f"({raised / args.storm:,.0f}/s); daemon CPU {used:.2f} s -> "
            f"{raised / max(used, 0.01):,.0f} events per daemon CPU-second; "
            f"queue overflows: {overflows}"
        )
        switches = context_switches(daemon.pid)
        time.sleep(args.idle)
        after_storm = context_switches(daemon.pid) - switches
        idle_cpu = cpu_seconds(daemon.pid) - cpu0 - used
        print(
            f"idle right after the storm: {after_storm} wake-ups in {args.idle:g} s "
            f"({idle_cpu:.2f} s CPU incl. the settle)"
        )
        results.update(
            storm_events=raised,
            storm_cpu_s=used,
            events_per_cpu_s=raised / max(used, 0.01),
            storm_overflows=overflows,
            idle_after_storm=after_storm,
        )
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(30)
        return 0
    finally:
        notify.close()
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
