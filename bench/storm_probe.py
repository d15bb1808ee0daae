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
   switches) in ``--idle`` seconds starting 0.1 s after the last of the
   deploys, after one more deploy once that was over, and after the storm;
4. **big batches**: the daemon is stopped (SIGSTOP) while 15,000 irrelevant
   events queue up, then resumed, ten times; events per CPU-second it used to
   read them (the per-event cost without the per-wake-up cost).

``--src`` may be given several times (e.g. a copy of the previous tree) to
compare trees in one run; the minimal restorer runs before them in each round.

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


def _minimal(binaries: list[Path], listing: Path, args: argparse.Namespace) -> list[float]:
    """Rename-over restore latencies with the minimal pyinotify restorer running."""
    restorer = subprocess.Popen(
        [sys.executable, "-c", MINIMAL_RESTORER, VALUE.hex(), str(listing)],
        stdout=subprocess.PIPE,
    )
    try:
        assert restorer.stdout is not None
        restorer.stdout.readline()
        waiter = _AttribWaiter(sorted({b.parent for b in binaries}))
        try:
            return _deploys(binaries, args.samples, args.gap, waiter)
        finally:
            waiter.close()
    finally:
        restorer.kill()
        restorer.wait()


def _batch(pid: int, directory: Path, rounds: int = 5000, repeat: int = 10) -> float:
    """Events per daemon CPU-second in big batches: ``repeat`` times, the daemon is
    stopped while ``3 * rounds`` irrelevant events queue up (fewer than the queue
    holds), then resumed; its CPU is counted until it has used none for 0.3 s."""
    used = 0.0
    for _ in range(repeat):
        os.kill(pid, signal.SIGSTOP)
        try:
            for number in range(rounds):
                name = directory / f"batch{number}"
                os.close(os.open(name, os.O_CREAT | os.O_WRONLY, 0o600))
                os.unlink(name)
            cpu0 = cpu_seconds(pid)
        finally:
            os.kill(pid, signal.SIGCONT)
        last, still = cpu0, time.monotonic()
        while time.monotonic() - still < 0.3:
            time.sleep(0.05)
            now = cpu_seconds(pid)
            if now != last:
                last, still = now, time.monotonic()
        used += last - cpu0
    return 3 * rounds * repeat / max(used, 0.01)


def _daemon(
    src: Path, base: Path, binaries: list[Path], args: argparse.Namespace
) -> dict[str, Any]:
    """Start ``capkeeper watch`` from ``src`` and measure deploys, idleness and a storm."""
    state = base / "state.toml"
    run = Path(tempfile.mkdtemp(prefix="run-", dir=base))
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(run / "notify.sock"))
    log = run / "daemon.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NOTIFY_", "WATCHDOG_"))}
    env["NOTIFY_SOCKET"] = str(run / "notify.sock")
    env["PYTHONPATH"] = str(src)
    argv = [sys.executable, "-m", "capkeeper", "watch", "--state", str(state)]
    argv += ["--log-format", "json", "--log-level", "info", "--rescan-interval", "300"]
    argv += ["--status-file", str(run / "status.json")]
    directories = sorted({b.parent for b in binaries})
    with open(log, "wb") as handle:
        daemon = subprocess.Popen(argv, cwd=src, env=env, stderr=handle)
    try:
        notify.settimeout(120)
        while b"READY=1" not in notify.recv(4096):
            pass
        time.sleep(1.0)
        waiter = _AttribWaiter(directories)
        try:
            ours = _deploys(binaries, args.samples, args.gap, waiter)
        finally:
            waiter.close()
        time.sleep(0.1)
        switches = context_switches(daemon.pid)
        time.sleep(args.idle)
        after_deploys = context_switches(daemon.pid) - switches
        # one deploy after a quiet moment, then idleness again
        waiter = _AttribWaiter(directories)
        try:
            single = _deploys(binaries, 1, args.gap, waiter)
        finally:
            waiter.close()
        time.sleep(0.1)
        switches = context_switches(daemon.pid)
        time.sleep(args.idle)
        after_single = context_switches(daemon.pid) - switches

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
        overflows = sum(1 for e in _events(log)[mark:] if e.get("event") == "queue_overflow")
        switches = context_switches(daemon.pid)
        time.sleep(args.idle)
        after_storm = context_switches(daemon.pid) - switches
        batch = _batch(daemon.pid, directories[0])
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(30)
        return {
            "src": str(src),
            "daemon_ms": ours,
            "idle_after_deploys": after_deploys,
            "single_ms": single,
            "idle_after_single": after_single,
            "storm_events": raised,
            "storm_cpu_s": used,
            "events_per_cpu_s": raised / max(used, 0.01),
            "storm_overflows": overflows,
            "idle_after_storm": after_storm,
            "batch_events_per_cpu_s": batch,
        }
    finally:
        notify.close()
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=300)
    parser.add_argument("--gap", type=float, default=0.01)
    parser.add_argument("--storm", type=float, default=10.0, help="seconds of storm")
    parser.add_argument("--idle", type=float, default=5.0)
    parser.add_argument(
        "--src",
        type=Path,
        action="append",
        help="capkeeper source tree to run (repeat to compare trees in one run; default: this one)",
    )
    parser.add_argument("--rounds", type=int, default=1, help="repeat the daemon runs")
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
    results: list[dict[str, Any]] = []
    try:
        root = base / "tree"
        root.mkdir(mode=0o755)
        binaries = _build_tree(root, 50, 20)
        listing = base / "binaries.txt"
        listing.write_text("".join(f"{b}\n" for b in binaries))
        _state(base / "state.toml", binaries)
        for _ in range(args.rounds):
            minimal = _minimal(binaries, listing, args)
            print(f"minimal pyinotify restorer: {_summary(minimal, args.samples)}")
            results.append({"src": "minimal", "minimal_ms": minimal})
            for src in args.src or [REPO]:
                got = _daemon(src, base, binaries, args)
                results.append(got)
                ms = got["daemon_ms"]
                print(f"capkeeper watch from {src}:")
                print(f"  restore: {_summary(ms, args.samples)}")
                ratio = statistics.median(ms) / statistics.median(minimal)
                print(f"  median ratio to the minimal restorer just before: {ratio:.2f}")
                print(
                    f"  idle {args.idle:g} s right after the {args.samples} deploys: "
                    f"{got['idle_after_deploys']} wake-ups; after one more deploy: "
                    f"{got['idle_after_single']} wake-ups"
                )
                print(
                    f"  storm: {got['storm_events']} irrelevant events in {args.storm:g} s; "
                    f"daemon CPU {got['storm_cpu_s']:.2f} s -> "
                    f"{got['events_per_cpu_s']:,.0f} events per daemon CPU-second; "
                    f"queue overflows: {got['storm_overflows']}"
                )
                print(f"  idle right after the storm: {got['idle_after_storm']} wake-ups")
                print(
                    "  batches of 15,000 irrelevant events (daemon stopped meanwhile): "
                    f"{got['batch_events_per_cpu_s']:,.0f} events per daemon CPU-second"
                )
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
        return 0
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
