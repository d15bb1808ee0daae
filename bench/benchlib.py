"""What the benchmarks share, built only on what a user or an operator sees.

The benchmarks drive capkeeper through its command line (``python -m capkeeper``
or the ``capkeeper`` script next to this interpreter), its notify socket, its
JSON log, ``/proc`` and real files with real xattrs. They never import
``capkeeper``: its modules move while the figures must stay comparable.

Every benchmark prints its figures as a last line ``BENCH-JSON {...}`` and, with
``--json FILE``, writes the same object to FILE (``bench/run_all.py`` reads it).
"""

from __future__ import annotations

import ctypes
import json
import os
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
XATTR = "security.capability"
CAPS = "cap_net_bind_service=+ep"
# Root-owned 0755: what the trust policy requires of binaries and their directories.
TRUSTED = 0o755

# <sys/inotify.h>
IN_MODIFY, IN_ATTRIB, IN_CLOSE_WRITE = 0x2, 0x4, 0x8
IN_MOVED_FROM, IN_MOVED_TO, IN_CREATE, IN_DELETE = 0x40, 0x80, 0x100, 0x200
IN_DELETE_SELF, IN_MOVE_SELF, IN_Q_OVERFLOW = 0x400, 0x800, 0x4000
IN_ONLYDIR, IN_DONT_FOLLOW, IN_EXCL_UNLINK = 0x01000000, 0x02000000, 0x04000000
# The mask the daemon puts on every directory of a route (DESIGN.md, "Watching"):
# a witness with the same mask sees every event that can wake it.
DAEMON_MASK = (
    IN_CLOSE_WRITE
    | IN_MOVED_TO
    | IN_MOVED_FROM
    | IN_CREATE
    | IN_DELETE
    | IN_ATTRIB
    | IN_MODIFY
    | IN_MOVE_SELF
    | IN_DELETE_SELF
    | IN_ONLYDIR
    | IN_DONT_FOLLOW
    | IN_EXCL_UNLINK
)
_HEADER = struct.Struct("iIII")  # struct inotify_event: wd, mask, cookie, len


def capkeeper_argv() -> list[str]:
    """How ``/usr/bin/capkeeper`` runs capkeeper (``packaging/install-tree.sh``), with
    this interpreter: ``python -I -m capkeeper``."""
    return [sys.executable, "-I", "-m", "capkeeper"]


class Inotify:
    """A raw inotify instance (libc through ctypes), non-blocking."""

    def __init__(self) -> None:
        self._libc = ctypes.CDLL(None, use_errno=True)
        self.fd = int(self._libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC))
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")

    def add(self, path: str | Path, mask: int = DAEMON_MASK) -> int:
        wd = int(self._libc.inotify_add_watch(self.fd, os.fsencode(path), mask))
        if wd < 0:
            raise OSError(ctypes.get_errno(), f"inotify_add_watch {path}")
        return wd

    def fileno(self) -> int:
        return self.fd

    def read(self) -> list[tuple[int, int, bytes]]:
        """Every event queued now, as (wd, mask, name); [] when none."""
        found: list[tuple[int, int, bytes]] = []
        while True:
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                return found
            offset = 0
            while offset < len(data):
                wd, mask, _cookie, length = _HEADER.unpack_from(data, offset)
                offset += _HEADER.size
                found.append((wd, mask, data[offset : offset + length].rstrip(b"\0")))
                offset += length

    def close(self) -> None:
        os.close(self.fd)


def cpu_seconds(pid: int) -> float:
    """User and system CPU time that ``pid`` has used so far (``/proc/PID/stat``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def settled_cpu(pid: int, deadline: float) -> float:
    """The CPU time of ``pid`` once it stopped growing for 0.5 s (it caught up)."""
    last, since = cpu_seconds(pid), time.perf_counter()
    while time.perf_counter() < deadline:
        time.sleep(0.1)
        now = cpu_seconds(pid)
        if now != last:
            last, since = now, time.perf_counter()
        elif time.perf_counter() - since >= 0.5:
            break
    return last


def context_switches(pid: int) -> int:
    """Voluntary context switches of every thread of ``pid`` (each one a wake-up)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        for line in (task / "status").read_text().splitlines():
            if line.startswith("voluntary_ctxt_switches:"):
                total += int(line.split()[1])
    return total


def memory_kib(pid: int) -> dict[str, int]:
    """``VmRSS`` and ``VmHWM`` (peak RSS) of ``pid`` in KiB."""
    found = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            found[key] = int(value.split()[0])
    return found


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(fraction * (len(ordered) - 1))))
    return ordered[index]


def route(paths: Iterable[Path]) -> set[Path]:
    """Every directory the daemon watches for ``paths``: each parent up to ``/``."""
    found: set[Path] = set()
    for path in paths:
        found.update(path.parents)
    return found


@dataclass(frozen=True)
class Idleness:
    """What a daemon did while left alone, and what could explain it."""

    wakeups: int  # voluntary context switches: each time it slept and was woken
    events: int  # inotify events raised meanwhile in the directories it watches
    cpu: float  # seconds of CPU it used


def measure_idle(pid: int, directories: Iterable[Path], seconds: float) -> Idleness:
    """Count what ``pid`` does over ``seconds``, with a witness watch on ``directories``.

    The witness has the daemon's mask and is read by a thread as events come:
    the kernel merges an event into an identical one still unread at the tail of
    a queue, so a witness read once at the end would count fewer events than a
    daemon that reads each one promptly. (A busy loop shows as CPU, not as
    wake-ups.) The method of ``tests/idle.py``, without importing capkeeper.
    """
    witness = Inotify()
    for directory in directories:
        witness.add(directory)
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
        return Idleness(context_switches(pid) - wakeups, sum(seen) - events, cpu_seconds(pid) - cpu)
    finally:
        done.set()
        reader.join()
        witness.close()


def build_tree(root: Path, directories: int, per_directory: int) -> list[Path]:
    """Distinct root-owned 0755 copies of ``true`` in ``root/srvNNN/bin/``."""
    source = Path(shutil.which("true") or "/bin/true").read_bytes()
    binaries = []
    for d in range(directories):
        directory = root / f"srv{d:03d}" / "bin"
        directory.mkdir(parents=True, mode=TRUSTED)
        os.chmod(directory.parent, TRUSTED)
        os.chmod(directory, TRUSTED)
        for b in range(per_directory):
            path = directory / f"tool{b:04d}"
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, TRUSTED)
            try:
                os.write(fd, source)
                os.fchmod(fd, TRUSTED)
            finally:
                os.close(fd)
            binaries.append(path)
    return binaries


def write_state(path: Path, binaries: Iterable[Path], caps: str = CAPS) -> None:
    path.write_text("".join(f'[[binary]]\npath = "{b}"\ncaps = "{caps}"\n\n' for b in binaries))


def reference_value(path: Path, caps: str = CAPS) -> bytes:
    """The ``security.capability`` value that ``setcap`` writes for ``caps``."""
    subprocess.run(["setcap", caps, str(path)], check=True)
    return os.getxattr(path, XATTR)


def log_events(log: Path) -> list[dict[str, Any]]:
    found = []
    for line in log.read_text(errors="replace").splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict):
            found.append(event)
    return found


class Daemon:
    """``capkeeper watch`` in a child process, with its own notify socket and JSON log."""

    def __init__(
        self,
        state: Path,
        run: Path,
        *,
        log_level: str = "info",
        rescan_interval: float = 3600,
        watchdog_usec: int | None = None,
        src: Path = REPO,
        cache: Path | None = None,
    ) -> None:
        run.mkdir(exist_ok=True)
        self.log = run / "daemon.log"
        socket_path = run / "notify.sock"
        socket_path.unlink(missing_ok=True)
        self._notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._notify.bind(str(socket_path))
        env = {k: v for k, v in os.environ.items() if not k.startswith(("NOTIFY_", "WATCHDOG_"))}
        env["NOTIFY_SOCKET"] = str(socket_path)
        if watchdog_usec:
            env["WATCHDOG_USEC"] = str(watchdog_usec)
        argv = [sys.executable, "-m", "capkeeper", "watch", "--state", str(state)]
        argv += ["--log-format", "json", "--log-level", log_level]
        argv += ["--status-file", str(run / "status.json")]
        argv += ["--rescan-interval", f"{rescan_interval:g}"]
        if cache is not None:
            # An option, as the unit's default is: a CAPKEEPER_* variable or a settings
            # file would also start the settings check by pydantic-settings in a child.
            argv += ["--cache-directory", str(cache)]
        self.spawned = time.perf_counter()
        with open(self.log, "wb") as handle:
            self.process = subprocess.Popen(argv, cwd=src, env=env, stderr=handle)
        self.pid = self.process.pid

    def wait_ready(self, timeout: float = 300) -> float:
        """Seconds from spawning to ``READY=1``; fails if the daemon exits first."""
        deadline = time.perf_counter() + timeout
        self._notify.settimeout(0.2)
        while time.perf_counter() < deadline:
            try:
                message = self._notify.recv(4096)
            except TimeoutError:
                if self.process.poll() is not None:
                    tail = self.log.read_text(errors="replace")[-2000:]
                    code = self.process.returncode
                    raise RuntimeError(f"daemon exited {code}:\n{tail}") from None
                continue
            if b"READY=1" in message.split(b"\n"):
                return time.perf_counter() - self.spawned
        raise RuntimeError(f"no READY=1 within {timeout:g} s")

    def events(self) -> list[dict[str, Any]]:
        return log_events(self.log)

    def stop(self) -> int:
        """SIGTERM, then its exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(60)
        finally:
            self.close()

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self._notify.close()

    def __enter__(self) -> Daemon:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def emit(results: dict[str, Any], json_path: str | None) -> None:
    """Print the figures as the last line and write them to ``json_path`` if given."""
    text = json.dumps(results, sort_keys=True)
    if json_path:
        Path(json_path).write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    print(f"BENCH-JSON {text}", flush=True)
