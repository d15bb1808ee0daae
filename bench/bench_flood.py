"""What an unprivileged event flood costs ``capkeeper watch``.

Builds 1,000 declared binaries (copies of ``true``) in 50 root-only
directories and one more in a root-owned sticky 1777 directory, all carrying
their capabilities, under a fresh ``/var/tmp/capkeeper-bench-flood-*``. Starts
``python -m capkeeper watch`` (from ``--src``, default this checkout) and
measures its CPU time (utime + stime from ``/proc/PID/stat``):

1. baseline: ``--seconds`` of nothing happening;
2. flood: ``--flooders`` processes of uid 4242 (``setpriv --reuid=4242
   --regid=4242 --clear-groups``, holding only a descriptor of the sticky
   directory) create, close and unlink files there as fast as they can for
   ``--seconds``. Meanwhile a rename-over deploy hits a random trusted binary
   every 0.5 s, and the exposed binary is stripped once; each restore is timed
   (the xattr is polled every millisecond). With ``--overflows N`` the daemon
   is stopped N times until more events than its queue holds were raised in
   the flooded directory (counted by the benchmark's own watch), so that the
   queue overflows even when the flooders get little CPU on a busy machine;
   the flood then lasts longer than ``--seconds``.

The daemon logs at debug level so that quiet overflow rescans are counted.
Reports the daemon's CPU share in both phases, the flooders' own share in the
same run (the flood's size on this machine at this moment), the ratio of the
two, the overflow rescans and the entries they reconciled.

Run as root:  .venv/bin/python bench/bench_flood.py [--seconds 10] [--src DIR]
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

from benchlib import Inotify

REPO = Path(__file__).resolve().parents[1]
XATTR = "security.capability"
# cap_net_bind_service=+ep as security.capability v2 (bench_restore.py reads it back
# from a restored file; here the tree is set up before the daemon starts).
CAPS = "cap_net_bind_service=+ep"
VALUE = bytes.fromhex("0100000200040000000000000000000000000000")
ATTACKER = 4242
FLOOD = """
import os, sys
where = int(sys.argv[1])
i = 0
while True:
    name = f"flood{os.getpid()}-{i % 64}"
    os.close(os.open(name, os.O_CREAT | os.O_WRONLY, 0o600, dir_fd=where))
    os.unlink(name, dir_fd=where)
    i += 1
"""


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _events(log: Path) -> list[dict[str, Any]]:
    found = []
    for line in log.read_text().splitlines():
        try:
            found.append(json.loads(line))
        except ValueError:
            continue
    return found


def _wait_caps(path: Path, deadline: float) -> float | None:
    start = time.perf_counter()
    while time.perf_counter() < deadline:
        try:
            if os.getxattr(path, XATTR) == VALUE:
                return time.perf_counter() - start
        except OSError:
            pass
        time.sleep(0.001)
    return None


def _build(root: Path) -> tuple[Path, list[Path]]:
    source = Path(shutil.which("true") or "/bin/true").read_bytes()
    public = root / "public"
    public.mkdir()
    public.chmod(0o1777)
    exposed = public / "tool"
    trusted = []
    for d in range(50):
        directory = root / f"srv{d:02d}" / "bin"
        directory.mkdir(parents=True, mode=0o755)
        directory.parent.chmod(0o755)
        trusted += [directory / f"tool{b:02d}" for b in range(20)]
    for binary in (exposed, *trusted):
        binary.write_bytes(source)
        binary.chmod(0o755)
        os.setxattr(binary, XATTR, VALUE)
    return exposed, trusted


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--flooders", type=int, default=2)
    parser.add_argument(
        "--overflows",
        type=int,
        default=0,
        help="force this many overflows: SIGSTOP the daemon until more events than its "
        "queue holds were raised (counted by a watch of our own), every 2 s",
    )
    parser.add_argument("--src", type=Path, default=REPO, help="capkeeper source tree to run")
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench_flood.py needs root")
        return 2
    random.seed(1)
    base = Path(tempfile.mkdtemp(prefix="capkeeper-bench-flood-", dir="/var/tmp"))
    base.chmod(0o755)
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    daemon: subprocess.Popen[bytes] | None = None
    flooders: list[subprocess.Popen[bytes]] = []
    where = -1
    try:
        root = base / "tree"
        root.mkdir(mode=0o755)
        exposed, trusted = _build(root)
        state = base / "state.toml"
        state.write_text(
            "".join(f'[[binary]]\npath = "{b}"\ncaps = "{CAPS}"\n\n' for b in (exposed, *trusted))
        )
        run = base / "run"
        run.mkdir()
        notify.bind(str(run / "notify.sock"))
        log = run / "daemon.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("NOTIFY_", "WATCHDOG_"))}
        env["NOTIFY_SOCKET"] = str(run / "notify.sock")
        argv = [sys.executable, "-m", "capkeeper", "watch", "--state", str(state)]
        argv += ["--log-format", "json", "--log-level", "debug"]
        argv += ["--status-file", str(run / "status.json"), "--rescan-interval", "3600"]
        with open(log, "wb") as handle:
            daemon = subprocess.Popen(argv, cwd=args.src, env=env, stderr=handle)
        notify.settimeout(120)
        while b"READY=1" not in notify.recv(4096):
            pass
        print(f"source: {args.src}; {len(trusted) + 1} declared binaries, 1 in {exposed.parent}")
        time.sleep(1.0)

        cpu0, wall0 = _cpu_seconds(daemon.pid), time.perf_counter()
        time.sleep(args.seconds)
        idle_share = (_cpu_seconds(daemon.pid) - cpu0) / (time.perf_counter() - wall0)

        mark = len(_events(log))
        where = os.open(exposed.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        for _ in range(args.flooders):
            flood = ["setpriv", f"--reuid={ATTACKER}", f"--regid={ATTACKER}", "--clear-groups"]
            flood += ["/usr/bin/python3", "-c", FLOOD, str(where)]
            flooders.append(subprocess.Popen(flood, pass_fds=(where,)))
        cpu0, wall0 = _cpu_seconds(daemon.pid), time.perf_counter()
        end = wall0 + args.seconds
        source = Path(shutil.which("true") or "/bin/true").read_bytes()
        latencies: list[float] = []
        missed = 0
        exposed_restore: float | None = None
        number = forced = 0
        limit = int(Path("/proc/sys/fs/inotify/max_queued_events").read_text())
        witness = Inotify()
        witness.add(exposed.parent)
        while time.perf_counter() < end - 0.5:
            number += 1
            if forced < args.overflows and number % 4 == 0:
                forced += 1
                witness.read()
                paused = time.perf_counter()
                daemon.send_signal(signal.SIGSTOP)
                raised, stop = 0, time.perf_counter() + 30
                while raised <= limit and time.perf_counter() < stop:
                    time.sleep(0.1)
                    raised += len(witness.read())
                daemon.send_signal(signal.SIGCONT)
                # The pause does not count: as many deploys (and the strip) follow it as
                # before it, however long the flooders took to overflow the queue.
                end += time.perf_counter() - paused + 1.0
            if number == 5:
                os.removexattr(exposed, XATTR)
                exposed_restore = _wait_caps(exposed, time.perf_counter() + args.seconds)
                continue
            target = random.choice(trusted)  # noqa: S311 - a sample, not a secret
            fresh = target.with_name(f".{target.name}.new")
            fresh.write_bytes(source + number.to_bytes(4, "little"))
            fresh.chmod(0o755)
            os.rename(fresh, target)
            took = _wait_caps(target, time.perf_counter() + 5.0)
            if took is None:
                missed += 1
            else:
                latencies.append(took)
            time.sleep(0.5)
        time.sleep(max(0.0, end - time.perf_counter()))
        witness.close()
        wall = time.perf_counter() - wall0
        flood_share = (_cpu_seconds(daemon.pid) - cpu0) / wall
        flooder_share = sum(_cpu_seconds(p.pid) for p in flooders) / wall
        for process in flooders:
            process.kill()
            process.wait()
        time.sleep(1.0)
        events = _events(log)[mark:]
        overflows = [e for e in events if e.get("event") == "rescan" and e["cause"] == "overflow"]
        checked = sum(int(e["entries"]) for e in overflows)
        ms = sorted(value * 1000 for value in latencies)
        print(f"idle daemon CPU: {idle_share:.2%} of a core over {args.seconds:g} s")
        print(
            f"flood ({args.flooders} flooders of uid {ATTACKER}, {args.seconds:g} s): "
            f"daemon CPU {flood_share:.1%} of a core; flooders {flooder_share:.1%}; "
            f"ratio daemon/flooders {flood_share / flooder_share:.3f}"
        )
        print(
            f"overflow rescans: {len(overflows)}, entries reconciled by them: {checked} "
            f"({checked / max(1, len(overflows)):.0f} per rescan)"
        )
        if ms:
            print(
                f"trusted rename-over deploys during the flood: {len(ms)} restored "
                f"({missed} missed), median {statistics.median(ms):.2f} ms, max {ms[-1]:.2f} ms"
            )
        shown = "not restored" if exposed_restore is None else f"{exposed_restore * 1000:.1f} ms"
        print(f"exposed binary stripped during the flood: restored after {shown}")
        if args.json:
            Path(args.json).write_text(
                json.dumps(
                    {
                        "src": str(args.src),
                        "idle_cpu_share": idle_share,
                        "flood_cpu_share": flood_share,
                        "flooder_cpu_share": flooder_share,
                        "overflow_rescans": len(overflows),
                        "overflow_entries": checked,
                        "deploy_ms": ms,
                        "missed": missed,
                        "exposed_restore_s": exposed_restore,
                    },
                    indent=1,
                )
                + "\n"
            )
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(30)
        return 0 if missed == 0 and exposed_restore is not None else 1
    finally:
        for process in flooders:
            if process.poll() is None:
                process.kill()
                process.wait()
        if where >= 0:
            os.close(where)
        notify.close()
        if daemon is not None and daemon.poll() is None:
            daemon.kill()
            daemon.wait()
        if not os.environ.get("KEEP"):
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
