"""A throwaway systemd 252 booted in private namespaces over a copy-on-write root.

``SystemdSandbox.boot()`` runs ``/lib/systemd/systemd`` as PID 1 of new PID,
mount, UTS, IPC and network namespaces whose root is an overlay of the host's
``/`` with its upper layer on a tmpfs, so every write the booted system makes
lands in that tmpfs and vanishes with it (see ``shared/systemd-sandbox.md``).
Boot takes well under a second once the image's slow services are masked.

What the host holds for a sandbox, all removed again by ``kill()``:

- an empty directory ``/run/capkeeper-sandbox-<owner pid>-<random>`` with
  ``boot.log`` in it; every mount is made in the private mount namespace only;
- one child cgroup of that name below this process's cgroup in each hierarchy:
  the booted manager takes it as its root and builds its slices there, never
  in the host's cgroup roots or in those of another sandbox.

Where the booted system would otherwise act on the host, it gets its own copy:

- ``/dev`` is a tmpfs with a few device nodes and a private devpts; with the
  host's ``/dev``, ``getty@tty1`` would run on the host's terminal;
- ``/sys/fs/cgroup`` is a private tmpfs holding binds of the host's hierarchies:
  systemd remounts that tmpfs read-only, which on the shared superblock made
  the host's ``/sys/fs/cgroup`` read-only;
- ``/sys`` and ``/proc/sys`` are read-only (no sysctl or binfmt writes to the
  shared kernel), ``CAP_SYS_MODULE`` and ``CAP_SYS_TIME`` are dropped from the
  bounding set (no module loading, no clock setting); a binary whose file
  capabilities include those two fails to execute inside;
- ``/run``, ``/tmp`` and ``/dev/shm`` are fresh tmpfs; the network namespace
  has only ``lo``.

``/dev/console`` is a pseudo-terminal read by a thread into the boot log. The
sandbox dies by SIGKILL to its PID 1 through a pidfd, sent by ``kill()``, by an
``atexit`` hook, or by the kernel (``PR_SET_PDEATHSIG``) when the Python
process dies without running either.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import json
import os
import shlex
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import IO

__all__ = [
    "DEFAULT_MASKED_UNITS",
    "ESSENTIAL_UNITS",
    "SandboxBootError",
    "SandboxCommandError",
    "SystemdSandbox",
    "remove_stale_host_state",
    "unavailable_reason",
]

SYSTEMD = "/lib/systemd/systemd"
CONTAINER_NAME = "capkeeper-test"
HOST_PREFIX = "capkeeper-sandbox-"
HOST_RUN = Path("/run")

#: Image services that cost boot time or would run on a schedule during a test
#: session; masked in the sandbox's ``/run/systemd/system`` before it boots.
DEFAULT_MASKED_UNITS: tuple[str, ...] = (
    "postgresql.service",
    "postgresql@.service",
    "e2scrub_reap.service",
    "console-getty.service",
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
    "dpkg-db-backup.timer",
    "e2scrub_all.timer",
    "man-db.timer",
    "systemd-tmpfiles-clean.timer",
)

#: A ``degraded`` boot is accepted unless one of these units failed.
ESSENTIAL_UNITS: frozenset[str] = frozenset(
    {
        "systemd-journald.service",
        "systemd-journald.socket",
        "systemd-journald-dev-log.socket",
        "dbus.service",
        "dbus.socket",
        "systemd-logind.service",
    }
)

#: The environment of commands run inside: the host's would leak its PATH.
CONTAINER_ENV: Mapping[str, str] = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
    "HOME": "/root",
    "TERM": "dumb",
    "SYSTEMD_COLORS": "0",
    "SYSTEMD_PAGER": "",
}

# The sandbox's /dev: name, major, minor (devices.txt in the kernel docs).
_DEVICE_NODES = (
    ("null", 1, 3),
    ("zero", 1, 5),
    ("full", 1, 7),
    ("random", 1, 8),
    ("urandom", 1, 9),
    ("tty", 5, 0),
)

_TOOLS = ("unshare", "nsenter", "setpriv", "mount", "pivot_root")


class SandboxBootError(RuntimeError):
    """The sandbox did not reach ``running`` (or an acceptable ``degraded``)."""

    def __init__(self, message: str, log: str):
        super().__init__(f"{message}\n--- boot log ---\n{log.rstrip()}\n--- end of boot log ---")
        self.log = log


class SandboxCommandError(subprocess.CalledProcessError):
    """A command run inside the sandbox failed; the message shows its output."""

    def __str__(self) -> str:
        return (
            f"{super().__str__()}\n--- stdout ---\n{self.stdout or ''}"
            f"\n--- stderr ---\n{self.stderr or ''}"
        )


def unavailable_reason() -> str | None:
    """Why no sandbox can be booted on this machine, or ``None`` if one can."""
    if os.geteuid() != 0:
        return "needs root to boot a throwaway systemd in namespaces"
    missing = [tool for tool in _TOOLS if shutil.which(tool) is None]
    if missing:
        return f"needs the util-linux tools {', '.join(missing)} (make test installs them)"
    if not os.access(SYSTEMD, os.X_OK):
        return f"needs {SYSTEMD} (Debian package 'systemd'; make test installs it)"
    if "overlay" not in Path("/proc/filesystems").read_text():
        return "needs overlayfs in the kernel for the copy-on-write root"
    return None


class SystemdSandbox:
    """One throwaway systemd: ``boot()`` it, use it, ``kill()`` it (idempotent)."""

    def __init__(
        self,
        *,
        masked_units: Iterable[str] = DEFAULT_MASKED_UNITS,
        binds: Iterable[str | os.PathLike[str]] = (),
    ):
        """Configure, do not boot yet.

        ``binds`` are host directories bind-mounted read-only at the same path
        inside. Directories on the host's root file system are visible anyway
        through the overlay (and writes to them stay in the sandbox); bind those
        that live on other mounts, e.g. a checkout on a separate volume.
        """
        self.masked_units = tuple(masked_units)
        self.binds = tuple(Path(b).resolve() for b in binds)
        self.pid: int | None = None
        self.boot_seconds: float | None = None
        self.state: str | None = None
        self.failed_units: list[str] = []
        self._notes: list[str] = []
        self._script_output = ""
        self._console = bytearray()
        self._console_lock = threading.Lock()
        self._console_thread: threading.Thread | None = None
        self._console_master: int | None = None
        self._console_slave: int | None = None
        self._host_dir: Path | None = None
        self._cgroups: list[Path] = []
        self._proc: subprocess.Popen[bytes] | None = None
        self._pidfd: int | None = None

    # -- lifecycle ---------------------------------------------------------

    def boot(self, timeout: float = 60) -> None:
        """Boot and wait for ``systemctl is-system-running --wait``.

        Raises ``SandboxBootError`` with the boot log when the system is not
        ``running`` within ``timeout`` seconds, or is ``degraded`` with an
        essential unit failed; other failed units are listed in
        ``failed_units`` and in the log. The sandbox is killed before raising.
        """
        if self._proc is not None:
            raise RuntimeError("this sandbox was booted before; make a new one")
        start = time.monotonic()
        deadline = start + timeout
        atexit.register(self.kill)
        try:
            remove_stale_host_state()
            self._host_dir = Path(
                tempfile.mkdtemp(prefix=f"{HOST_PREFIX}{os.getpid()}-", dir=HOST_RUN)
            )
            (self._host_dir / "mnt").mkdir()
            self._cgroups = _make_cgroups(self._host_dir.name)
            self._start()
            self._wait_for_pid1(deadline)
            self._wait_until_running(deadline)
        except BaseException:
            self.kill()
            raise
        self.boot_seconds = time.monotonic() - start
        self._note(f"booted to {self.state} in {self.boot_seconds:.2f}s, PID 1 is {self.pid}")

    def kill(self) -> None:
        """SIGKILL PID 1 of the sandbox and remove what it left on the host."""
        atexit.unregister(self.kill)
        if self._pidfd is not None:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
            os.close(self._pidfd)
            self._pidfd = None
        elif self._proc is not None and self._proc.poll() is None:
            # No PID 1 found yet: killing unshare kills its child (--kill-child).
            self._proc.kill()
        if self._proc is not None and self._proc.returncode is None:
            try:  # unshare exits once its child, the sandbox's PID 1, is gone
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._stop_console()
        self._read_script_output()
        try:
            _remove_cgroups(self._cgroups)
            self._cgroups = []
        finally:
            if self._host_dir is not None:
                _remove_host_dir(self._host_dir)
                self._host_dir = None

    @property
    def alive(self) -> bool:
        """Whether the sandbox's PID 1 still runs."""
        return self._pidfd is not None and self._proc is not None and self._proc.poll() is None

    @property
    def host_dir(self) -> Path | None:
        """The sandbox's directory in the host's ``/run`` (``None`` once killed)."""
        return self._host_dir

    @property
    def log(self) -> str:
        """The boot log: console output, boot script output, the harness's notes."""
        self._read_script_output()
        with self._console_lock:
            console = self._console.decode(errors="replace").replace("\r", "")
        return console + self._script_output + "".join(f"[sandbox] {n}\n" for n in self._notes)

    # -- using it ----------------------------------------------------------

    def run(
        self,
        *argv: str,
        check: bool = True,
        input: str | None = None,
        timeout: float = 60,
        env: Mapping[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` inside the sandbox, in all its namespaces, as root.

        The environment is ``CONTAINER_ENV`` updated with ``env``. With
        ``check``, a non-zero exit raises ``SandboxCommandError`` showing the
        output.
        """
        result = subprocess.run(
            self._nsenter(*argv),
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**CONTAINER_ENV, **(env or {})},
            check=False,
        )
        if check and result.returncode != 0:
            raise SandboxCommandError(result.returncode, argv, result.stdout, result.stderr)
        return result

    def path(self, p: str | os.PathLike[str]) -> Path:
        """The host-visible path of ``p`` inside the sandbox (``/proc/PID/root/…``).

        Symbolic links are resolved inside the sandbox first: below
        ``/proc/PID/root`` the kernel would resolve an absolute link against the
        host's root instead.
        """
        inside = self.run("realpath", "-m", "--", os.fspath(p)).stdout.rstrip("\n")
        return Path(f"/proc/{self._require_pid()}/root{inside}")

    def install_file(
        self, host_src: str | os.PathLike[str], container_dst: str, mode: int = 0o644
    ) -> None:
        """Copy a host file to ``container_dst`` inside, owned by root, parents created."""
        with open(host_src, "rb") as src:
            self._run_with_stdin(
                ("install", "-D", "-m", f"{mode:o}", "/dev/stdin", container_dst), src
            )

    def journal(self, *matches: str, sync: bool = True) -> list[dict[str, object]]:
        """The sandbox's journal entries, parsed from ``journalctl -o json --all``.

        ``matches`` are journalctl match arguments such as ``FIELD=value``. With
        ``sync``, journald first writes out everything sent to it before this
        call. Binary values come back as lists of byte values, as journalctl
        prints them.
        """
        if sync:
            self.run("journalctl", "--sync")
        out = self.run("journalctl", "--no-pager", "-o", "json", "--all", *matches).stdout
        entries: list[dict[str, object]] = []
        for line in out.splitlines():
            if line.strip():
                entry = json.loads(line)
                if not isinstance(entry, dict):
                    raise TypeError(f"journalctl printed a non-object: {line!r}")
                entries.append(entry)
        return entries

    # -- internals ---------------------------------------------------------

    def _require_pid(self) -> int:
        if self.pid is None or not self.alive:
            raise RuntimeError("the sandbox is not running")
        return self.pid

    def _nsenter(self, *argv: str) -> list[str]:
        pid = str(self._require_pid())
        return ["nsenter", "-t", pid, "-m", "-p", "-u", "-i", "-n", "--", *argv]

    def _run_with_stdin(self, argv: Sequence[str], stdin: IO[bytes]) -> None:
        result = subprocess.run(
            self._nsenter(*argv),
            stdin=stdin,
            capture_output=True,
            env=dict(CONTAINER_ENV),
            timeout=60,
            check=False,
        )
        if result.returncode != 0:
            raise SandboxCommandError(
                result.returncode,
                argv,
                result.stdout.decode(errors="replace"),
                result.stderr.decode(errors="replace"),
            )

    def _start(self) -> None:
        assert self._host_dir is not None
        # This process holds the terminal's slave end open until kill(): a read
        # of the master fails with EIO whenever no slave end is open.
        self._console_master, self._console_slave = os.openpty()
        console = os.ttyname(self._console_slave)
        self._console_thread = threading.Thread(
            target=self._read_console, name="sandbox-console", daemon=True
        )
        self._console_thread.start()
        procs = " ".join(shlex.quote(str(cg / "cgroup.procs")) for cg in self._cgroups)
        # Join the fresh cgroups, so that the booted manager takes them as its
        # root; arm PR_SET_PDEATHSIG, so that unshare dies with this process,
        # and with it (--kill-child) the sandbox's PID 1.
        wrapper = (
            f'for f in {procs}; do echo $$ > "$f"; done; '
            "exec setpriv --pdeathsig KILL -- unshare --pid --fork --kill-child "
            "--mount --propagation private --uts --ipc --net "
            '-- /bin/sh -c "$0"'
        )
        with open(self._host_dir / "boot.log", "wb") as log:
            self._proc = subprocess.Popen(
                ["/bin/sh", "-c", wrapper, self._boot_script(console)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                # Ctrl-C in the terminal then reaches pytest only, whose
                # fixture teardown kills the sandbox in order.
                start_new_session=True,
                env={"PATH": CONTAINER_ENV["PATH"], "LANG": "C.UTF-8"},
            )

    def _boot_script(self, console: str) -> str:
        assert self._host_dir is not None
        q = shlex.quote
        lines = [
            "set -eu",
            f"mnt={q(str(self._host_dir / 'mnt'))}",
            'mount -t tmpfs -o mode=0755 capkeeper-sandbox "$mnt"',
            'mkdir "$mnt/upper" "$mnt/work" "$mnt/root"',
            'mount -t overlay overlay -o "lowerdir=/,upperdir=$mnt/upper,workdir=$mnt/work"'
            ' "$mnt/root"',
            'cd "$mnt/root"',
            "mount --rbind /sys sys",
            "mount -o remount,bind,ro sys",
            *_private_cgroup_tmpfs(),
            "mount -t proc -o nosuid,nodev,noexec proc proc",
            "mount --bind proc/sys proc/sys",
            "mount -o remount,bind,ro proc/sys",
            "mount -t tmpfs -o mode=0755,nosuid,nodev tmpfs run",
            "mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs tmp",
            "mount -t tmpfs -o mode=0755,nosuid tmpfs dev",
            *(f"mknod -m 666 dev/{name} c {major} {minor}" for name, major, minor in _DEVICE_NODES),
            "mkdir -m 755 dev/pts",
            "mount -t devpts -o newinstance,ptmxmode=0666,mode=0620,gid=5 devpts dev/pts",
            "ln -s pts/ptmx dev/ptmx",
            "mkdir -m 1777 dev/shm",
            "mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs dev/shm",
            "ln -s /proc/self/fd dev/fd",
            "ln -s /proc/self/fd/0 dev/stdin",
            "ln -s /proc/self/fd/1 dev/stdout",
            "ln -s /proc/self/fd/2 dev/stderr",
            "touch dev/console",
            f"mount --bind {q(console)} dev/console",
        ]
        for bind in self.binds:
            target = q(f".{bind}")
            lines += [
                f"mkdir -p {target}",
                f"mount --rbind {q(str(bind))} {target}",
                f"mount -o remount,bind,ro {target}",
            ]
        if self.masked_units:
            lines.append("mkdir -p run/systemd/system")
            lines += [f"ln -s /dev/null run/systemd/system/{q(u)}" for u in self.masked_units]
        lines += [
            "mkdir oldroot",
            "pivot_root . oldroot",
            "cd /",
            "umount -l /oldroot",
            "rmdir /oldroot",
            "exec setpriv --bounding-set -sys_module,-sys_time -- "
            f"env -i container={CONTAINER_NAME} SYSTEMD_COLORS=0 {SYSTEMD}",
        ]
        return "\n".join(lines) + "\n"

    def _stop_console(self) -> None:
        if self._console_slave is not None:
            os.close(self._console_slave)
            self._console_slave = None
        if self._console_thread is not None:
            # No process holds the terminal any more, so its reader sees EIO.
            self._console_thread.join(timeout=5)
            self._console_thread = None
        if self._console_master is not None:
            os.close(self._console_master)
            self._console_master = None

    def _read_console(self) -> None:
        assert self._console_master is not None
        master = self._console_master
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: no process holds the terminal any more
                return
            if not data:
                return
            with self._console_lock:
                self._console += data

    def _wait_for_pid1(self, deadline: float) -> None:
        assert self._proc is not None
        while True:
            if self._proc.poll() is not None:
                raise SandboxBootError(
                    f"the boot script exited with status {self._proc.returncode}", self.log
                )
            if self.pid is None:
                self.pid = _find_namespace_init(self._proc.pid)
                if self.pid is not None:
                    self._pidfd = os.pidfd_open(self.pid)
            if self.pid is not None and _comm(self.pid) == "systemd":
                return
            if time.monotonic() > deadline:
                raise SandboxBootError("systemd did not start in time", self.log)
            time.sleep(0.02)

    def _wait_until_running(self, deadline: float) -> None:
        while True:
            if not self.alive:
                raise SandboxBootError("systemd exited while booting", self.log)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._note_diagnostics()
                raise SandboxBootError(
                    f"systemd did not finish booting in time (last state: {self.state})", self.log
                )
            try:
                result = self.run(
                    "systemctl", "is-system-running", "--wait", check=False, timeout=remaining
                )
            except subprocess.TimeoutExpired:
                continue
            self.state = result.stdout.strip() or None
            if self.state in {"running", "degraded"}:
                break
            if self.state in {"maintenance", "stopping", "offline"}:
                self._note_diagnostics()
                raise SandboxBootError(f"systemd reached state {self.state!r}", self.log)
            time.sleep(0.05)  # the manager's private socket is not listening yet
        if self.state == "degraded":
            listing = self.run(
                "systemctl", "list-units", "--state=failed", "--plain", "--no-legend"
            ).stdout
            self.failed_units = [line.split()[0] for line in listing.splitlines() if line.strip()]
            self._note(f"degraded; failed units: {' '.join(self.failed_units)}")
            essential = ESSENTIAL_UNITS.intersection(self.failed_units)
            if essential:
                self._note_diagnostics()
                raise SandboxBootError(
                    f"essential units failed: {', '.join(sorted(essential))}", self.log
                )

    def _note(self, text: str) -> None:
        self._notes.append(text)

    def _note_diagnostics(self) -> None:
        """Add what the manager says about its jobs and failures to the log."""
        for argv in (
            ("systemctl", "list-jobs", "--no-pager"),
            ("systemctl", "--failed", "--no-pager"),
            ("journalctl", "-b", "--no-pager", "-n", "200"),
        ):
            try:
                result = self.run(*argv, check=False, timeout=5)
            except (subprocess.TimeoutExpired, RuntimeError) as exc:
                self._note(f"$ {' '.join(argv)}: {exc}")
            else:
                self._note(f"$ {' '.join(argv)}\n{result.stdout}{result.stderr}")

    def _read_script_output(self) -> None:
        if self._host_dir is not None:
            with contextlib.suppress(FileNotFoundError):
                data = (self._host_dir / "boot.log").read_bytes()
                self._script_output = data.decode(errors="replace")


def _comm(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return None


def _find_namespace_init(parent: int) -> int | None:
    """The child of ``parent`` that is PID 1 of its own PID namespace, if any."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
        except OSError:
            continue
        fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
        nspid = fields.get("NSpid", "").split()
        if fields.get("PPid", "").strip() == str(parent) and len(nspid) > 1 and nspid[-1] == "1":
            return int(entry.name)
    return None


# -- mounts and cgroups ----------------------------------------------------------


def _mountinfo() -> list[tuple[str, Path, str, str]]:
    """(root, mount point, fstype, super options) of each mount, as the kernel lists them."""
    mounts = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        fields = left.split()
        fstype, _source, superopts = right.split()[:3]
        mounts.append((fields[3], Path(fields[4]), fstype, superopts))
    return mounts


def _cgroup_mounts() -> dict[frozenset[str], Path]:
    """Mount point of each cgroup hierarchy, keyed by its super options (empty for v2)."""
    found: dict[frozenset[str], Path] = {}
    for root, point, fstype, superopts in _mountinfo():
        if root == "/" and fstype in {"cgroup", "cgroup2"}:
            key = frozenset(superopts.split(",")) if fstype == "cgroup" else frozenset()
            found.setdefault(key, point)
    return found


def _private_cgroup_tmpfs() -> list[str]:
    """Boot script lines giving the sandbox its own tmpfs on ``/sys/fs/cgroup``.

    On a legacy or hybrid layout systemd mounts missing hierarchies into that
    tmpfs and then remounts it read-only: a superblock change, which through a
    bind of the host's ``/sys`` made the host's ``/sys/fs/cgroup`` read-only.
    The private tmpfs holds binds of the host's hierarchies instead. A cgroup2
    ``/sys/fs/cgroup`` (unified layout) is left as it is.
    """
    top = Path("/sys/fs/cgroup")
    types = [fstype for _root, point, fstype, _opts in _mountinfo() if point == top]
    if not types or types[-1] != "tmpfs":
        return []
    lines = ["mount -t tmpfs -o mode=0755,nosuid,nodev,noexec,size=4m tmpfs sys/fs/cgroup"]
    for point in _cgroup_mounts().values():
        if point.parent == top:
            inside = shlex.quote(f"sys/fs/cgroup/{point.name}")
            lines += [f"mkdir {inside}", f"mount --bind {shlex.quote(str(point))} {inside}"]
    return lines


def _make_cgroups(name: str) -> list[Path]:
    """Create a child cgroup ``name`` of this process's cgroup in each hierarchy."""
    mounts = _cgroup_mounts()
    created: list[Path] = []
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _hierarchy, controllers, path = line.split(":", 2)
            wanted = frozenset(controllers.split(",")) if controllers else frozenset()
            mount = next(
                (
                    point
                    for key, point in mounts.items()
                    if (key and wanted and wanted <= key) or (not key and not wanted)
                ),
                None,
            )
            if mount is None:
                continue  # a hierarchy mounted nowhere here: the sandbox cannot see it
            parent = mount / path.lstrip("/")
            child = parent / name
            child.mkdir()
            created.append(child)
            if "cpuset" in wanted:
                # A v1 cpuset without CPUs and memory nodes accepts no task.
                for knob in ("cpuset.cpus", "cpuset.mems"):
                    (child / knob).write_text((parent / knob).read_text())
    except BaseException:
        _remove_cgroups(created)
        raise
    return created


def _remove_cgroups(cgroups: Iterable[Path], timeout: float = 10) -> None:
    """Remove cgroup trees bottom-up once the processes in them are gone."""
    deadline = time.monotonic() + timeout
    for top in cgroups:
        while top.exists():
            try:
                for dirpath, _dirs, _files in os.walk(top, topdown=False):
                    os.rmdir(dirpath)
            except OSError as exc:
                if exc.errno not in {errno.EBUSY, errno.ENOTEMPTY} or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)  # killed processes are still being reaped


def _remove_host_dir(host_dir: Path) -> None:
    """Remove a sandbox's host directory, never descending into a mount."""
    mnt = host_dir / "mnt"
    if os.path.ismount(mnt):
        raise RuntimeError(f"{mnt} is mounted in the host's namespace; not removing it")
    with contextlib.suppress(FileNotFoundError):
        (host_dir / "boot.log").unlink()
    with contextlib.suppress(FileNotFoundError):
        mnt.rmdir()
    with contextlib.suppress(FileNotFoundError):
        host_dir.rmdir()


def remove_stale_host_state() -> None:
    """Remove the directories and cgroups of sandboxes whose owner is gone.

    Those are left only when the owner died by SIGKILL; the kernel then killed
    its sandbox too (PR_SET_PDEATHSIG), so nothing is mounted on them.
    """
    stale = [
        entry
        for entry in HOST_RUN.glob(f"{HOST_PREFIX}*")
        if (owner := entry.name.removeprefix(HOST_PREFIX).split("-", 1)[0]).isdigit()
        and not Path(f"/proc/{owner}").exists()
    ]
    if not stale:
        return
    with contextlib.suppress(OSError):
        for mount in _cgroup_mounts().values():
            for entry in stale:
                _remove_cgroups([c for c in mount.rglob(entry.name) if c.is_dir()], timeout=1)
        for entry in stale:
            _remove_host_dir(entry)
