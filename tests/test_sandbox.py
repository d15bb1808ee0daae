"""The throwaway-systemd harness boots a real systemd and leaves the host alone."""

from __future__ import annotations

import contextlib
import ctypes
import os
import select
import shutil
import subprocess
import sys
import tempfile
import textwrap
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.sandbox import (
    ESSENTIAL_UNITS,
    HOST_PREFIX,
    HOST_RUN,
    SandboxBootError,
    SandboxCommandError,
    SystemdSandbox,
    remove_stale_host_state,
    unavailable_reason,
)

pytest_plugins = ["tests.sandbox_fixture"]

pytestmark = pytest.mark.sandbox

REPO = Path(__file__).resolve().parents[1]
PR_SET_CHILD_SUBREAPER = 36  # <linux/prctl.h>


@pytest.fixture
def new_sandbox() -> Iterator[Callable[..., SystemdSandbox]]:
    """Make extra, unbooted sandboxes for tests of the lifecycle; all killed afterwards."""
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    made: list[SystemdSandbox] = []

    def make(**options: Any) -> SystemdSandbox:
        made.append(SystemdSandbox(**options))
        return made[-1]

    try:
        yield make
    finally:
        for sandbox in made:
            sandbox.kill()


def _host_traces(name: str) -> list[Path]:
    """Directories named ``name`` on the host: the run directory and cgroups."""
    found = [HOST_RUN / name] if (HOST_RUN / name).exists() else []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point, fstype = line.split()[4], line.partition(" - ")[2].split()[0]
        if fstype in {"cgroup", "cgroup2"}:
            found += Path(point).rglob(name)
    return found


def test_boots_to_running(systemd_sandbox: SystemdSandbox) -> None:
    """The sandbox reaches running, or degraded without an essential unit failed."""
    state = systemd_sandbox.run("systemctl", "is-system-running", check=False).stdout.strip()
    assert state in {"running", "degraded"}, systemd_sandbox.log
    assert not ESSENTIAL_UNITS.intersection(systemd_sandbox.failed_units)
    assert systemd_sandbox.boot_seconds is not None


def test_pid1_is_systemd_in_a_container(systemd_sandbox: SystemdSandbox) -> None:
    """Commands run in the sandbox's PID namespace, where systemd is PID 1."""
    assert systemd_sandbox.run("cat", "/proc/1/comm").stdout == "systemd\n"
    assert systemd_sandbox.run("systemd-detect-virt", "--container").stdout == "container-other\n"
    assert systemd_sandbox.run("hostname").returncode == 0


def test_boot_log_has_the_console(systemd_sandbox: SystemdSandbox) -> None:
    """The boot log holds systemd's console output and the harness's notes."""
    log = systemd_sandbox.log
    assert "Reached target multi-user.target" in log
    assert "[sandbox] booted to" in log


def test_transient_unit_sets_file_capabilities_as_nobody(
    systemd_sandbox: SystemdSandbox,
) -> None:
    """nobody with only an ambient CAP_SETFCAP sets file capabilities; without it, EPERM."""
    target = f"/srv/capkeeper-test/{uuid.uuid4().hex}/probe"
    systemd_sandbox.install_file(shutil.which("true") or "/bin/true", target, 0o755)
    setcap = ("setcap", "cap_net_raw+ep", target)

    refused = systemd_sandbox.run(
        "systemd-run", "--wait", "--quiet", "-p", "User=nobody", *setcap, check=False
    )
    assert refused.returncode != 0
    assert systemd_sandbox.run("getcap", target).stdout == ""

    systemd_sandbox.run(
        "systemd-run",
        "--wait",
        "--quiet",
        "-p",
        "User=nobody",
        "-p",
        "AmbientCapabilities=CAP_SETFCAP",
        "-p",
        "CapabilityBoundingSet=CAP_SETFCAP",
        "-p",
        "NoNewPrivileges=yes",
        *setcap,
    )
    assert systemd_sandbox.run("getcap", target).stdout == f"{target} cap_net_raw=ep\n"
    # The same xattr seen from the host through /proc/PID/root.
    assert os.getxattr(systemd_sandbox.path(target), "security.capability")


def test_install_file_and_path(systemd_sandbox: SystemdSandbox, tmp_path: Path) -> None:
    """install_file sets the mode; path() resolves links inside, not against the host."""
    src = tmp_path / "payload"
    src.write_bytes(b"\x00binary\npayload")
    dst = f"/opt/capkeeper-test/{uuid.uuid4().hex}/payload"
    systemd_sandbox.install_file(src, dst, 0o640)

    host_view = systemd_sandbox.path(dst)
    assert host_view.read_bytes() == b"\x00binary\npayload"
    assert host_view.stat().st_mode & 0o7777 == 0o640
    assert not Path(dst).exists()  # the host's own /opt is untouched

    name = f"capkeeper-test-{uuid.uuid4().hex}"
    systemd_sandbox.run("sh", "-c", f"echo inside > /run/{name}")
    # /var/run -> /run: absolute, so it must be resolved inside the sandbox.
    assert systemd_sandbox.path(f"/var/run/{name}").read_text() == "inside\n"
    assert not (HOST_RUN / name).exists()


def test_run_failure_shows_the_output(systemd_sandbox: SystemdSandbox) -> None:
    """A failing command raises with its exit status, stdout and stderr in the message."""
    script = "echo to-stdout; echo to-stderr >&2; exit 3"
    with pytest.raises(SandboxCommandError) as info:
        systemd_sandbox.run("sh", "-c", script)
    message = str(info.value)
    assert "exit status 3" in message
    assert "to-stdout" in message
    assert "to-stderr" in message
    assert systemd_sandbox.run("sh", "-c", script, check=False).returncode == 3


def test_run_passes_input_and_a_clean_environment(systemd_sandbox: SystemdSandbox) -> None:
    """Input reaches the command; the environment is the container's, plus env=."""
    assert systemd_sandbox.run("cat", input="hello\n").stdout == "hello\n"
    env = systemd_sandbox.run("env", env={"CK_EXTRA": "1"}).stdout.splitlines()
    assert "CK_EXTRA=1" in env
    assert not [line for line in env if line.startswith("PYTEST_")]


def test_journal_reads_a_unit_output(systemd_sandbox: SystemdSandbox) -> None:
    """journal() returns the entries journald stored for a transient unit's stdout."""
    unit = f"capkeeper-echo-{uuid.uuid4().hex[:12]}.service"
    systemd_sandbox.run("systemd-run", "--wait", "--quiet", f"--unit={unit}", "echo", "hello")
    messages = [e["MESSAGE"] for e in systemd_sandbox.journal(f"_SYSTEMD_UNIT={unit}")]
    assert messages == ["hello"]


def test_host_tmp_and_run_survive_the_sandbox(systemd_sandbox: SystemdSandbox) -> None:
    """The boot step that empties /tmp runs inside without touching the host's /tmp or /run."""
    with (
        tempfile.NamedTemporaryFile(dir="/tmp", prefix="capkeeper-marker-") as tmp_marker,
        tempfile.NamedTemporaryFile(dir=HOST_RUN, prefix="capkeeper-marker-") as run_marker,
    ):
        inside_tmp = systemd_sandbox.run("ls", "-A", "/tmp").stdout.split()
        assert Path(tmp_marker.name).name not in inside_tmp

        name = f"capkeeper-inside-{uuid.uuid4().hex}"
        systemd_sandbox.run("sh", "-c", f"touch /tmp/{name} /run/{name} /var/tmp/{name}")
        systemd_sandbox.run("systemd-tmpfiles", "--create", "--remove", "--boot")

        assert Path(tmp_marker.name).exists()
        assert Path(run_marker.name).exists()
        for directory in ("/tmp", "/run", "/var/tmp"):
            assert not Path(directory, name).exists()


def _cgroup_top() -> tuple[list[str], list[str]]:
    """The host's /sys/fs/cgroup: its entries, and the options of the mounts on it."""
    top = Path("/sys/fs/cgroup")
    options = [
        line.partition(" - ")[2].split()[2]
        for line in Path("/proc/self/mountinfo").read_text().splitlines()
        if line.split()[4] == str(top)
    ]
    return sorted(p.name for p in top.iterdir()), options


def test_host_cgroup_tree_is_untouched(new_sandbox: Callable[..., SystemdSandbox]) -> None:
    """systemd's hierarchies and read-only remount land on the sandbox's own tmpfs."""
    before = _cgroup_top()
    sandbox = new_sandbox()
    sandbox.boot()
    assert _cgroup_top() == before
    sandbox.kill()
    assert _cgroup_top() == before


def test_kill_removes_everything_it_created(new_sandbox: Callable[..., SystemdSandbox]) -> None:
    """kill() ends PID 1 and removes the run directory and cgroups; it is idempotent."""
    own_sandbox = new_sandbox()
    own_sandbox.boot()
    pid, host_dir = own_sandbox.pid, own_sandbox.host_dir
    assert pid is not None
    assert host_dir is not None
    assert _host_traces(host_dir.name)

    own_sandbox.kill()
    own_sandbox.kill()

    assert not own_sandbox.alive
    assert not Path(f"/proc/{pid}").exists()
    assert _host_traces(host_dir.name) == []
    with pytest.raises(RuntimeError, match="not running"):
        own_sandbox.run("true")


def test_binds_are_visible_read_only(
    new_sandbox: Callable[..., SystemdSandbox], tmp_path: Path
) -> None:
    """A bound host directory shows the host's files inside and refuses writes."""
    (tmp_path / "from-host").write_text("host\n")
    own_sandbox = new_sandbox(binds=[tmp_path])
    own_sandbox.boot()
    assert own_sandbox.run("cat", str(tmp_path / "from-host")).stdout == "host\n"
    refused = own_sandbox.run("touch", str(tmp_path / "from-inside"), check=False)
    assert "Read-only file system" in refused.stderr
    assert not (tmp_path / "from-inside").exists()


def test_boot_timeout_raises_with_the_log_and_cleans_up(
    new_sandbox: Callable[..., SystemdSandbox],
) -> None:
    """A boot that cannot finish in time raises with the boot log and leaves nothing."""
    own_sandbox = new_sandbox()
    ours = f"{HOST_PREFIX}{os.getpid()}-*"
    before = set(HOST_RUN.glob(ours))
    with pytest.raises(SandboxBootError, match="did not") as info:
        own_sandbox.boot(timeout=0.05)
    assert "--- boot log ---" in str(info.value)
    assert not own_sandbox.alive
    assert own_sandbox.host_dir is None
    assert set(HOST_RUN.glob(ours)) <= before


def _set_child_subreaper(enabled: bool) -> None:
    """Adopt orphaned descendants (prctl PR_SET_CHILD_SUBREAPER), so they can be reaped."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, int(enabled), 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")


def _ppid(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("PPid:")).split()[1])


def test_sandbox_dies_with_its_owner() -> None:
    """A SIGKILLed owner takes its sandbox along (PR_SET_PDEATHSIG); the next boot sweeps up."""
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    owner_code = textwrap.dedent(
        f"""
        import sys, time
        sys.path.insert(0, {str(REPO)!r})
        from tests.sandbox import SystemdSandbox
        sandbox = SystemdSandbox()
        sandbox.boot()
        print(sandbox.pid, sandbox.host_dir, flush=True)
        time.sleep(600)
        """
    )
    # The killed owner's children would otherwise be orphans that nobody reaps.
    _set_child_subreaper(True)
    orphans: list[int] = []
    try:
        with subprocess.Popen(
            [sys.executable, "-c", owner_code], stdout=subprocess.PIPE, text=True
        ) as owner:
            try:
                assert owner.stdout is not None
                pid_text, host_dir_text = owner.stdout.readline().split()
                pid1 = int(pid_text)
                orphans += [_ppid(pid1), pid1]  # unshare, then the sandbox's PID 1
                pidfd = os.pidfd_open(pid1)
            finally:
                owner.kill()
        try:
            exited, _, _ = select.select([pidfd], [], [], 10)
        finally:
            os.close(pidfd)
        assert exited, "the sandbox's PID 1 outlived its owner"
    finally:
        _set_child_subreaper(False)
        for orphan in orphans:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(orphan, 0)

    name = Path(host_dir_text).name
    assert _host_traces(name)  # left behind by the killed owner ...
    remove_stale_host_state()
    assert _host_traces(name) == []  # ... and swept up before the next boot
