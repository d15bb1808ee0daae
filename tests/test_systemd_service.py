"""Issue 4 acceptance: capkeeper as a real systemd 252 service, in the throwaway sandbox.

The module installs capkeeper into the session's sandbox once, the way a
package would (``packaging/install.sh`` with a virtualenv made by Debian's
``/usr/bin/python3``), declares three binaries in ``/etc/capkeeper/state.toml``
and writes the ``ReadWritePaths=`` drop-in with ``capkeeper systemd-dropin``.
Each test then drives the shipped ``capkeeper.service`` (or the example
``demo-web.service``) with ``systemctl`` and checks what really happened: the
daemon's credentials in ``/proc``, capabilities with ``getcap``, and the
entries journald stored.

Why the installed virtualenv holds copies, not a ``.pth`` pointing at the
checkout: the service runs as the unprivileged ``capkeeper`` user with
``ProtectHome=yes``, so a checkout below ``/root`` or ``/home``, or behind a
0700 directory, would be invisible to it; a copy (made from the test venv's
own installed distributions, ``capkeeper`` and its runtime requirements only)
works wherever the checkout lives, and cannot change under a running daemon.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, TypeVar

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from capkeeper.events import EVENTS
from capkeeper.helper import MIN_ENTRIES
from tests.sandbox import SystemdSandbox

pytest_plugins = ["tests.sandbox_fixture"]

pytestmark = pytest.mark.sandbox

REPO = Path(__file__).resolve().parents[1]
VENV = "/usr/lib/capkeeper"
STATE = "/etc/capkeeper/state.toml"
UNIT = "capkeeper.service"
WEB_UNIT = "demo-web.service"
RUN_DROPIN_DIR = "/run/systemd/system/capkeeper.service.d"
DEPLOY_DIR = "/tmp/capkeeper-deploy"  # the sandbox's own /tmp

APP = "/usr/local/bin/demo-app"  # a copy of true
WEB = "/usr/local/bin/demo-web"  # a copy of netcat-openbsd: the example's "web server"
TOOL = "/opt/capkeeper-demo/bin/demo-tool"  # a copy of true, in a second directory
NEW = "/usr/local/bin/demo-new"  # a copy of true, declared only by the reload test
OUTSIDE = "/usr/local/sbin/demo-outside"  # in a directory the drop-in does not list (yet)

CAPS = {APP: "cap_net_raw=ep", WEB: "cap_net_bind_service=ep", TOOL: "cap_chown,cap_fowner=p"}
NEW_CAPS = "cap_net_admin=ep"
CAP_SETFCAP_MASK = f"{1 << 31:016x}"  # 0000000080000000
CAP_NET_BIND_SERVICE = 10

RESTORED = EVENTS["capability_restored"].message_id
REJECTED = EVENTS["state_rejected"].message_id
FAILED = EVENTS["restore_failed"].message_id
# systemd's own catalog: a unit failed (with UNIT_RESULT=), or deactivated successfully.
UNIT_FAILED = "d9b373ed55a64feb8242e02dbe79a49c"
UNIT_SUCCESS = "7ad2d189f7e94e70a38c781354912448"

T = TypeVar("T")


def _state_text(extra: dict[str, str] | None = None) -> str:
    """A state.toml declaring ``CAPS`` plus ``extra``."""
    tables = [
        f'[[binary]]\npath = "{path}"\ncaps = "{caps}"\n'
        for path, caps in {**CAPS, **(extra or {})}.items()
    ]
    return "# Written by tests/test_systemd_service.py\n\n" + "\n".join(tables)


def wait_for(check: Callable[[], T | None], what: str, timeout: float = 10) -> T:
    """Poll ``check`` until it returns something true, and return that."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


# -- installing capkeeper into the sandbox -----------------------------------------------


def _applicable_requirements(
    dist: metadata.Distribution, extras: frozenset[str]
) -> list[Requirement]:
    """The requirements of ``dist`` that apply here, with ``extras`` requested."""
    wanted = []
    for text in dist.requires or []:
        req = Requirement(text)
        if req.marker is None or any(
            req.marker.evaluate({"extra": extra}) for extra in {"", *extras}
        ):
            wanted.append(req)
    return wanted


def runtime_distributions() -> list[metadata.Distribution]:
    """capkeeper's runtime requirements, transitively, as installed in the test venv."""
    found: dict[str, metadata.Distribution] = {}
    todo = _applicable_requirements(metadata.distribution("capkeeper"), frozenset())
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        if name in found:
            continue
        found[name] = metadata.distribution(name)
        todo += _applicable_requirements(found[name], frozenset(req.extras))
    return sorted(found.values(), key=lambda d: canonicalize_name(d.metadata["Name"]))


def runtime_files() -> dict[str, Path]:
    """Files to install below site-packages: relative path -> host file.

    The requirements' files as their RECORD lists them (with the byte code pip
    compiled), and capkeeper itself from this checkout with a minimal
    ``.dist-info`` (``capkeeper.__version__`` reads its METADATA).
    """
    files: dict[str, Path] = {}
    for dist in runtime_distributions():
        base = Path(str(dist.locate_file(""))).resolve()
        for record in dist.files or []:
            source = Path(str(dist.locate_file(record))).resolve()
            if source.is_file() and source.is_relative_to(base):
                files[str(source.relative_to(base))] = source
    package = REPO / "capkeeper"
    for source in sorted(package.rglob("*")):
        if source.is_file() and "__pycache__" not in source.parts:
            files[str(source.relative_to(REPO))] = source
    return files


def install_capkeeper(sandbox: SystemdSandbox) -> None:
    """Make ``/usr/lib/capkeeper`` a venv holding capkeeper, then run packaging/install.sh."""
    make_capkeeper_venv(sandbox)
    sandbox.run("sh", str(REPO / "packaging" / "install.sh"), "--venv", VENV)


def make_capkeeper_venv(sandbox: SystemdSandbox) -> None:
    """Make ``/usr/lib/capkeeper`` a venv holding this checkout's capkeeper (no network)."""
    sandbox.run("python3", "-m", "venv", "--without-pip", "--clear", VENV)
    purelib = sandbox.run(
        f"{VENV}/bin/python", "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"
    ).stdout.strip()
    target = sandbox.path(purelib)
    for relative, source in runtime_files().items():
        destination = target / relative
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, destination)  # keeps mtimes: the copied byte code stays valid
        os.chmod(destination, 0o755 if os.access(source, os.X_OK) else 0o644)
    dist_info = target / f"capkeeper-{metadata.version('capkeeper')}.dist-info"
    dist_info.mkdir(exist_ok=True)
    (dist_info / "METADATA").write_text(
        metadata.distribution("capkeeper").read_text("METADATA") or ""
    )
    (dist_info / "INSTALLER").write_text("tests/test_systemd_service.py\n")
    # Readable by the unprivileged service user whatever this process's umask is.
    sandbox.run("chmod", "-R", "u=rwX,go=rX", VENV)
    sandbox.run(f"{VENV}/bin/python", "-m", "compileall", "-q", "-j", "0", purelib)


@dataclass
class Installed:
    """capkeeper installed in the sandbox, with helpers the tests share."""

    sandbox: SystemdSandbox
    uid: int  # of the capkeeper user

    def run(self, *argv: str, check: bool = True) -> str:
        return self.sandbox.run(*argv, check=check).stdout

    def show(self, *properties: str, unit: str = UNIT) -> dict[str, str]:
        """``systemctl show`` of ``properties`` as a dict."""
        argv = ["systemctl", "show", unit]
        for prop in properties:
            argv += ["-p", prop]
        lines = self.run(*argv).splitlines()
        return dict(line.split("=", 1) for line in lines if "=" in line)

    def getcap(self, path: str) -> str:
        """What getcap prints after the path ('' without capabilities)."""
        return self.run("getcap", path).strip().removeprefix(path).strip()

    def strip(self, path: str) -> None:
        self.run("setcap", "-r", path, check=False)  # fails when there is nothing to remove
        assert self.getcap(path) == ""

    def deploy(self, path: str, source: str) -> None:
        """Replace ``path`` the way an rsync deploy does: temporary file, then rename."""
        staged = f"{DEPLOY_DIR}/{Path(path).name}"
        self.run("install", "-D", "-m", "0755", source, staged)
        before = self.run("stat", "-c", "%i", path)
        self.run("rsync", "-a", "--ignore-times", staged, path)
        assert self.run("stat", "-c", "%i", path) != before  # a new inode: replaced by rename

    def write_state(self, text: str) -> None:
        self.sandbox.path(STATE).write_text(text)

    def mark(self) -> int:
        """Where the journal ends now (journald's monotonic receive time of the newest entry).

        journalctl 252 printed nothing for ``--after-cursor`` combined with a
        match that the cursor's entry did not satisfy, so later entries are
        picked by their ``__MONOTONIC_TIMESTAMP`` instead (one boot: comparable).
        """
        return int(str(self.sandbox.journal("-n", "1")[-1]["__MONOTONIC_TIMESTAMP"]))

    def entries(self, mark: int, *matches: str) -> list[dict[str, object]]:
        """Journal entries with ``matches`` that journald received after ``mark``."""
        return [
            entry
            for entry in self.sandbox.journal(*matches)
            if int(str(entry["__MONOTONIC_TIMESTAMP"])) > mark
        ]

    def wait_entry(self, mark: int, *matches: str, timeout: float = 10) -> dict[str, object]:
        """The first journal entry after ``mark`` with ``matches``, waiting for it."""
        found = wait_for(lambda: self.entries(mark, *matches), f"journal entry {matches}", timeout)
        return found[0]

    def main_pid(self, unit: str = UNIT) -> int:
        return int(self.show("MainPID", unit=unit)["MainPID"])

    def proc_status(self, pid: int) -> dict[str, str]:
        """``/proc/PID/status`` of a process inside the sandbox."""
        text = self.sandbox.path(f"/proc/{pid}/status").read_text()
        return {k: v.strip() for k, v in (line.split(":", 1) for line in text.splitlines())}

    def start(self, verb: str = "start") -> None:
        """Start (or restart) the daemon; the tests start it more often than the
        default StartLimitBurst= allows in StartLimitIntervalSec=, so forget earlier starts."""
        self.run("systemctl", "reset-failed", UNIT, check=False)
        self.run("systemctl", verb, UNIT)

    def stop(self) -> None:
        self.run("systemctl", "stop", UNIT)

    def daemon_reload(self) -> None:
        self.run("systemctl", "daemon-reload")

    def wait_status(self, predicate: Callable[[str], bool], what: str) -> str:
        """The daemon's STATUS= text once ``predicate`` accepts it."""

        def matching() -> str | None:
            text = self.show("StatusText")["StatusText"]
            return text if predicate(text) else None

        return wait_for(matching, f"STATUS= {what}")


@pytest.fixture(scope="module")
def installed(systemd_sandbox: SystemdSandbox) -> Iterator[Installed]:
    """capkeeper, its unit, three declared binaries and the example web unit, installed once."""
    sandbox = systemd_sandbox
    for tool in ("python3", "rsync", "nc.openbsd", "getcap", "ss"):
        if sandbox.run("sh", "-c", f"command -v {tool}", check=False).returncode != 0:
            pytest.skip(f"needs '{tool}' in the image (make test installs it)")
    version = "import sys; print('%d.%d' % sys.version_info[:2])"
    image_python = sandbox.run("python3", "-c", version).stdout.strip()
    ours = f"{sys.version_info[0]}.{sys.version_info[1]}"
    if image_python != ours:
        pytest.skip(
            f"the image's python3 is {image_python}, the test venv's {ours}: "
            "the venv's compiled dependencies would not load in the image's python3"
        )
    install_capkeeper(sandbox)
    sandbox.run("install", "-d", "-m", "0755", str(Path(TOOL).parent))
    for path, source in ((APP, "/bin/true"), (TOOL, "/bin/true"), (NEW, "/bin/true")):
        sandbox.run("install", "-m", "0755", source, path)
    sandbox.run("install", "-m", "0755", "/bin/nc.openbsd", WEB)
    sandbox.install_file(
        REPO / "systemd" / "examples" / WEB_UNIT, f"/run/systemd/system/{WEB_UNIT}"
    )
    sandbox.path(STATE).write_text(_state_text())
    sandbox.run("capkeeper", "systemd-dropin")
    sandbox.run("systemctl", "daemon-reload")
    uid = int(sandbox.run("id", "-u", "capkeeper").stdout)
    yield Installed(sandbox, uid)
    if sandbox.alive:  # leave the shared sandbox without our services running
        sandbox.run("systemctl", "stop", UNIT, WEB_UNIT, check=False)
        sandbox.run("rm", "-rf", RUN_DROPIN_DIR, f"/run/systemd/system/{WEB_UNIT}", check=False)
        sandbox.run("systemctl", "daemon-reload", check=False)


# -- the acceptance tests ----------------------------------------------------------------


def test_start_returns_after_ready_with_everything_reconciled(installed: Installed) -> None:
    """systemctl start returns once READY=1 is sent, after the first full reconcile."""
    installed.stop()
    for path in CAPS:
        installed.strip(path)
    installed.start()
    # Read right after start returned: no waiting from here on.
    caps = {path: installed.getcap(path) for path in CAPS}
    shown = installed.show("Type", "NotifyAccess", "ActiveState", "SubState", "StatusText")
    assert caps == CAPS
    assert shown["Type"] == "notify"
    assert shown["NotifyAccess"] == "main"
    assert (shown["ActiveState"], shown["SubState"]) == ("active", "running")
    # STATUS= only comes from the daemon, sent with its READY=1.
    assert shown["StatusText"].startswith(f"watching {len(CAPS)} binaries in ")


def test_main_process_credentials(installed: Installed) -> None:
    """The main process runs as capkeeper with exactly CAP_SETFCAP, NoNewPrivs and seccomp."""
    installed.start()
    status = installed.proc_status(installed.main_pid())
    assert status["Uid"].split() == [str(installed.uid)] * 4
    for field in ("CapEff", "CapPrm", "CapBnd", "CapAmb"):
        assert status[field] == CAP_SETFCAP_MASK, field
    assert status["NoNewPrivs"] == "1"
    assert status["Seccomp"] == "2"  # SystemCallFilter= is in force


def test_status_file_in_runtime_directory(installed: Installed) -> None:
    """capkeeper status reads the daemon's status file from /run/capkeeper (RuntimeDirectory=)."""
    installed.start()
    pid = installed.main_pid()

    def report() -> dict[str, Any] | None:
        result = installed.sandbox.run("capkeeper", "status", "--json", check=False)
        data = json.loads(result.stdout) if result.returncode == 0 else None
        return data if isinstance(data, dict) and data.get("pid") == pid else None

    data = wait_for(report, "the status file of the running daemon")
    assert {e["path"]: (e["status"], e["found"]) for e in data["entries"]} == {
        path: ("in-sync", caps) for path, caps in CAPS.items()
    }
    owner = installed.run("stat", "-c", "%U", "/run/capkeeper/status.json").strip()
    assert owner == "capkeeper"


def test_restart_uses_the_cache_in_cache_directory(installed: Installed) -> None:
    """The daemon keeps its caches in /var/cache/capkeeper (CacheDirectory=, the capkeeper
    user's, 0700; files 0600); a restart with nothing changed rewrites neither, which it
    would on a miss (the state cache when read, the ELF facts after READY=1)."""
    cache = "/var/cache/capkeeper"
    names = ("state.json", "elf.json")
    installed.start("restart")

    def stamps() -> str | None:
        out = installed.run(
            "sh", "-c", f"cd {cache} && stat -c '%n %U %a %y' {' '.join(names)}", check=False
        )
        return out if out.count("\n") == len(names) else None

    first = wait_for(stamps, "both caches written")
    assert installed.run("stat", "-c", "%U %a", cache).split() == ["capkeeper", "700"]
    assert [line.split()[:3] for line in first.splitlines()] == [
        [name, "capkeeper", "600"] for name in names
    ]
    installed.start("restart")
    time.sleep(1)  # the ELF facts are saved after READY=1, when they changed
    assert stamps() == first


def test_rsync_deploy_is_repaired_and_journaled(installed: Installed) -> None:
    """An rsync deploy is repaired; the journal entry has the fields, PRIORITY=4 and the catalog."""
    installed.start()
    pid = installed.main_pid()
    mark = installed.mark()
    installed.deploy(APP, "/bin/false")
    wait_for(lambda: installed.getcap(APP) == CAPS[APP], "the restore after the deploy", 5)

    entry = installed.wait_entry(mark, f"MESSAGE_ID={RESTORED}", f"CAPKEEPER_PATH={APP}")
    assert entry["CAPKEEPER_EXPECTED"] == CAPS[APP]
    assert entry["CAPKEEPER_FOUND"] == "none"
    assert entry["CAPKEEPER_CAUSE"] in {"IN_MOVED_TO", "IN_MOVED_TO+settle"}
    assert entry["PRIORITY"] == "4"
    assert entry["SYSLOG_IDENTIFIER"] == "capkeeper"
    assert entry["_TRANSPORT"] == "journal"  # the native protocol, not the stderr stream
    assert entry["_UID"] == str(installed.uid)
    assert entry["_PID"] == str(pid)
    assert entry["_SYSTEMD_UNIT"] == UNIT
    print(f"restore latency in the journal: {entry.get('CAPKEEPER_LATENCY_MS')} ms")

    explained = installed.run(
        "journalctl", "--no-pager", "-x", f"--cursor={entry['__CURSOR']}",
        f"MESSAGE_ID={RESTORED}", f"CAPKEEPER_PATH={APP}",
    )  # fmt: skip
    catalog = [
        line.removeprefix("░░").removeprefix(" ").rstrip()
        for line in explained.splitlines()
        if line.startswith("░░")
    ]
    spec = EVENTS["capability_restored"]
    substitutions = {
        "@CAPKEEPER_PATH@": APP,
        "@CAPKEEPER_FOUND@": "none",
        "@CAPKEEPER_EXPECTED@": CAPS[APP],
        "@CAPKEEPER_CAUSE@": str(entry["CAPKEEPER_CAUSE"]),
    }
    expected = [
        f"Subject: {spec.subject}",
        "Defined-By: capkeeper",
        "",
        *spec.explanation.split("\n"),
    ]
    for placeholder, value in substitutions.items():
        expected = [line.replace(placeholder, value) for line in expected]
    assert catalog == expected


def test_reload_applies_an_edited_state(installed: Installed) -> None:
    """systemctl reload makes the running daemon enforce a newly declared binary."""
    installed.start()
    pid = installed.main_pid()
    installed.strip(NEW)
    try:
        installed.write_state(_state_text({NEW: NEW_CAPS}))
        installed.run("systemctl", "reload", UNIT)
        wait_for(lambda: installed.getcap(NEW) == NEW_CAPS, "the newly declared binary's caps", 5)
        status = installed.wait_status(lambda s: s.startswith("watching 4 "), "counting NEW")
        assert "rejected" not in status
        assert installed.main_pid() == pid
    finally:
        installed.write_state(_state_text())
        installed.run("systemctl", "reload", UNIT)


def test_invalid_state_is_rejected_on_reload(installed: Installed) -> None:
    """An invalid edit is rejected: old state kept, STATUS= and the journal say why."""
    installed.start()
    installed.write_state(_state_text({NEW: NEW_CAPS}))
    installed.run("systemctl", "reload", UNIT)
    installed.wait_status(lambda s: s.startswith("watching 4 "), "counting NEW")
    pid = installed.main_pid()
    mark = installed.mark()
    try:
        installed.write_state(_state_text({NEW: "cap_no_such_thing=ep"}))
        installed.run("systemctl", "reload", UNIT)

        status = installed.wait_status(lambda s: "rejected" in s, "reporting the rejection")
        assert "cap_no_such_thing" in status
        assert "previous state in force" in status
        assert "rejected" in installed.run("systemctl", "status", "--no-pager", UNIT)
        entry = installed.wait_entry(mark, f"MESSAGE_ID={REJECTED}")
        assert "cap_no_such_thing" in str(entry["CAPKEEPER_ERROR"])
        assert entry["PRIORITY"] == "3"
        assert entry["_PID"] == str(pid)

        shown = installed.show("ActiveState", "SubState", "MainPID")
        assert (shown["ActiveState"], shown["SubState"]) == ("active", "running")
        assert shown["MainPID"] == str(pid)
        # The previous state (NEW with NEW_CAPS) is still enforced.
        installed.deploy(NEW, "/bin/false")
        wait_for(lambda: installed.getcap(NEW) == NEW_CAPS, "the old state's restore", 5)
    finally:
        installed.write_state(_state_text())
        installed.run("systemctl", "reload", UNIT)
    installed.wait_status(lambda s: "rejected" not in s, "clearing the rejection")


def test_dropin_keeps_read_write_paths_in_step_with_the_state(installed: Installed) -> None:
    """A newly declared directory is read-only for the daemon (EROFS) until systemd-dropin runs."""
    installed.start()
    installed.run("install", "-m", "0755", "/bin/true", OUTSIDE)
    mark = installed.mark()
    try:
        installed.write_state(_state_text({OUTSIDE: NEW_CAPS}))
        installed.run("systemctl", "reload", UNIT)
        failed = installed.wait_entry(mark, f"MESSAGE_ID={FAILED}", f"CAPKEEPER_PATH={OUTSIDE}")
        assert "Read-only file system" in str(failed["CAPKEEPER_REASON"])
        assert installed.getcap(OUTSIDE) == ""
        stale = installed.sandbox.run("capkeeper", "systemd-dropin", "--check", check=False)
        assert stale.returncode == 1, stale.stdout

        installed.run("capkeeper", "systemd-dropin")
        installed.daemon_reload()
        installed.start("restart")
        assert installed.getcap(OUTSIDE) == NEW_CAPS
    finally:
        installed.write_state(_state_text())
        installed.run("capkeeper", "systemd-dropin")
        installed.daemon_reload()
        installed.start("restart")
        installed.run("rm", "-f", OUTSIDE)


def test_watchdog_restarts_a_stopped_daemon_which_repairs_drift(installed: Installed) -> None:
    """SIGSTOP: the watchdog restarts the daemon, which then repairs the drift made meanwhile."""
    dropin = f"{RUN_DROPIN_DIR}/60-test-watchdog.conf"
    installed.run("mkdir", "-p", RUN_DROPIN_DIR)
    # LimitCORE=0: the SIGABRT must not leave a core dump anywhere.
    installed.sandbox.path(dropin).write_text(
        "[Service]\nWatchdogSec=2s\nRestartSec=100ms\nLimitCORE=0\n"
    )
    try:
        installed.daemon_reload()
        installed.start("restart")
        before = installed.show("MainPID", "NRestarts", "InvocationID", "WatchdogUSec")
        assert before["WatchdogUSec"] == "2s"
        old_pid = int(before["MainPID"])
        installed.run("kill", "-STOP", str(old_pid))
        mark = installed.mark()
        installed.deploy(APP, "/bin/true")
        assert installed.getcap(APP) == ""  # nobody repairs it: the daemon is stopped

        def restarted() -> dict[str, str] | None:
            shown = installed.show("MainPID", "NRestarts", "SubState")
            again = int(shown["NRestarts"]) > int(before["NRestarts"])
            return shown if again and shown["SubState"] == "running" else None

        after = wait_for(restarted, "the restart by the watchdog", timeout=15)
        assert int(after["NRestarts"]) == int(before["NRestarts"]) + 1
        assert int(after["MainPID"]) != old_pid
        failed = installed.wait_entry(
            mark, f"MESSAGE_ID={UNIT_FAILED}", f"INVOCATION_ID={before['InvocationID']}"
        )
        assert failed["UNIT_RESULT"] == "watchdog"
        assert installed.getcap(APP) == CAPS[APP]  # reconciled before the restart's READY=1
        restored = installed.wait_entry(mark, f"MESSAGE_ID={RESTORED}", f"CAPKEEPER_PATH={APP}")
        assert restored["CAPKEEPER_CAUSE"] == "startup"
        assert restored["_PID"] == after["MainPID"]
    finally:
        installed.run("rm", "-f", dropin)
        installed.daemon_reload()
        installed.start("restart")


def test_stop_is_clean(installed: Installed) -> None:
    """systemctl stop: the daemon says it is stopping and exits 0 (systemd: deactivated)."""
    installed.start()
    invocation = installed.show("InvocationID")["InvocationID"]
    mark = installed.mark()
    installed.stop()
    assert installed.show("ActiveState")["ActiveState"] == "inactive"
    # The exit status is in the journal: an unreferenced inactive unit may be
    # unloaded, and systemctl show then reports ExecMainCode=0 of a fresh one.
    this_run = f"INVOCATION_ID={invocation}"
    installed.wait_entry(mark, f"MESSAGE_ID={UNIT_SUCCESS}", this_run)
    assert installed.entries(mark, f"MESSAGE_ID={UNIT_FAILED}", this_run) == []
    installed.wait_entry(
        mark, "CAPKEEPER_EVENT=daemon_stopping", f"_SYSTEMD_INVOCATION_ID={invocation}"
    )


def test_example_service_starts_after_a_deploy_with_the_daemon_stopped(
    installed: Installed,
) -> None:
    """ExecStartPre=+capkeeper apply restores demo-web's caps: it listens on :80 as www-data."""
    installed.stop()
    installed.run("systemctl", "stop", WEB_UNIT)
    installed.deploy(WEB, "/bin/nc.openbsd")
    assert installed.getcap(WEB) == ""
    www_data = int(installed.run("id", "-u", "www-data"))
    try:
        installed.run("systemctl", "start", WEB_UNIT)
        assert installed.getcap(WEB) == CAPS[WEB]

        def listener() -> str | None:
            lines = installed.run("ss", "-Hltnp", "sport = :80").splitlines()
            return next((line for line in lines if "127.0.0.1:80" in line), None)

        line = wait_for(listener, "a listener on 127.0.0.1:80")
        pid = installed.main_pid(WEB_UNIT)
        assert f"pid={pid}," in line
        status = installed.proc_status(pid)
        assert status["Uid"].split() == [str(www_data)] * 4
        assert int(status["CapEff"], 16) == 1 << CAP_NET_BIND_SERVICE
        assert installed.show("ActiveState", unit=WEB_UNIT)["ActiveState"] == "active"
    finally:
        installed.run("systemctl", "stop", WEB_UNIT)


def test_example_preflight_ignores_the_units_python_path(installed: Installed) -> None:
    """ExecStartPre=+ runs capkeeper as root, yet never imports from the unit's own directories."""
    www = "/srv/capkeeper-test-www"  # the web service's directory, its user's to write
    marker = "/run/capkeeper-test-hijacked"
    dropin_dir = f"/run/systemd/system/{WEB_UNIT}.d"
    planted = f"import os\nopen({marker!r}, 'w').write(str(os.getuid()))\n"
    installed.run("install", "-d", "-o", "www-data", "-g", "www-data", www, f"{www}/capkeeper")
    for name in ("__init__.py", "__main__.py"):
        installed.sandbox.path(f"{www}/capkeeper/{name}").write_text(planted)
    installed.run("chown", "-R", "www-data:www-data", www)
    installed.run("mkdir", "-p", dropin_dir)
    installed.sandbox.path(f"{dropin_dir}/60-test-pythonpath.conf").write_text(
        f"[Service]\nWorkingDirectory={www}\nEnvironment=PYTHONPATH={www}\n"
    )
    try:
        installed.daemon_reload()
        installed.stop()
        installed.deploy(WEB, "/bin/nc.openbsd")
        mark = installed.mark()
        installed.run("systemctl", "start", WEB_UNIT)
        assert not installed.sandbox.path(marker).exists()
        assert installed.getcap(WEB) == CAPS[WEB]
        restored = installed.wait_entry(
            mark, f"MESSAGE_ID={RESTORED}", f"_SYSTEMD_UNIT={WEB_UNIT}", f"CAPKEEPER_PATH={WEB}"
        )
        assert restored["_UID"] == "0"  # the "+" prefix: full privileges, hence the care
    finally:
        installed.run("systemctl", "stop", WEB_UNIT)
        installed.run("rm", "-rf", dropin_dir, www, marker)
        installed.daemon_reload()


def test_example_preflight_has_no_warning(installed: Installed) -> None:
    """apply --unit finds nothing wrong with the example unit (it does work, see above)."""
    out = installed.run("capkeeper", "apply", "--unit", WEB_UNIT, WEB)
    assert "warning" not in out, out


def test_systemd_analyze_verify(installed: Installed) -> None:
    """systemd-analyze verify accepts the shipped, the installed and the example units."""
    units = [
        str(REPO / "systemd" / UNIT),
        f"/usr/lib/systemd/system/{UNIT}",
        str(REPO / "systemd" / "examples" / WEB_UNIT),
    ]
    result = installed.sandbox.run("systemd-analyze", "verify", "--man=no", *units, check=False)
    assert result.returncode == 0, result.stderr
    ours = [
        line for line in result.stderr.splitlines() if "capkeeper" in line or "demo-web" in line
    ]
    assert ours == []


def test_systemd_analyze_security_exposure(installed: Installed) -> None:
    """systemd-analyze security --offline=yes --threshold=9 passes: exposure <= 0.9 (SAFE)."""
    result = installed.sandbox.run(
        "sh", "-c",
        f"cd {REPO} && systemd-analyze security --offline=yes --threshold=9 systemd/{UNIT}",
        check=False,
    )  # fmt: skip
    match = re.search(rf"Overall exposure level for {UNIT}: (\d+\.\d) (\w+)", result.stdout)
    assert match is not None, result.stdout + result.stderr
    print(f"offline exposure of systemd/{UNIT}: {match[1]} {match[2]}")
    assert result.returncode == 0
    assert float(match[1]) <= 0.9
    assert match[2] == "SAFE"
    # The loaded unit with its ReadWritePaths= drop-in, as PID 1 sees it.
    online = installed.run("systemd-analyze", "security", "--no-pager", UNIT)
    loaded = re.search(rf"Overall exposure level for {UNIT}: (\d+\.\d)", online)
    assert loaded is not None
    print(f"online exposure of the installed {UNIT} with its drop-in: {loaded[1]}")
    assert float(loaded[1]) <= 0.9


def test_a_large_start_up_is_shared_with_a_helper_under_the_unit(installed: Installed) -> None:
    """With 1,000 more binaries declared, all stripped, the daemon forks its start-up
    helper under the unit's sandboxing (seccomp filter, no new privileges, the one
    capability): the helper reported part of them, all carry their capabilities when
    ``systemctl start`` returns, and no process of the unit is left but the daemon."""
    many = "/opt/capkeeper-many"
    paths = [f"{many}/d{n % 10}/b{n:04}" for n in range(MIN_ENTRIES)]
    script = (
        "import os, shutil, sys\n"
        "for path in sys.argv[1:]:\n"
        "    os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)\n"
        "    shutil.copy('/bin/true', path)\n"
        "    os.chmod(path, 0o755)\n"
    )
    installed.stop()
    try:
        installed.run("python3", "-c", script, *paths)
        installed.write_state(_state_text(dict.fromkeys(paths, NEW_CAPS)))
        installed.run("capkeeper", "systemd-dropin")
        installed.daemon_reload()
        mark = installed.mark()
        installed.start()
        rescan = installed.wait_entry(
            mark, "CAPKEEPER_EVENT=rescan", "CAPKEEPER_CAUSE=startup", f"_SYSTEMD_UNIT={UNIT}"
        )
        assert int(str(rescan["CAPKEEPER_RESTORED"])) == len(paths)
        assert 0 < int(str(rescan["CAPKEEPER_HELPER_ENTRIES"])) < len(paths) + len(CAPS)
        assert installed.run("getcap", "-r", many).count(NEW_CAPS) == len(paths)
        tasks = installed.show("TasksCurrent")["TasksCurrent"]
        assert tasks == "1", "a helper outlived the start-up"
        assert not installed.entries(mark, "CAPKEEPER_EVENT=start_up_helper_failed")
    finally:
        installed.stop()
        installed.write_state(_state_text())
        installed.run("rm", "-rf", many)
        installed.run("capkeeper", "systemd-dropin")
        installed.daemon_reload()
        installed.start()


def test_daemon_logged_nothing_unexpected(installed: Installed) -> None:
    """Under the unit's sandboxing the daemon wrote only native journal entries, no errors."""
    installed.start()
    entries = installed.sandbox.journal(f"_SYSTEMD_UNIT={UNIT}", "SYSLOG_IDENTIFIER=capkeeper")
    assert entries
    assert {e["_TRANSPORT"] for e in entries} == {"journal"}  # no stray stderr (tracebacks)
    errors = [
        (e.get("CAPKEEPER_EVENT"), e["MESSAGE"])
        for e in entries
        if int(str(e["PRIORITY"])) <= 3
        # Provoked on purpose: the invalid state, the directory missing from the drop-in.
        and e.get("CAPKEEPER_EVENT") != "state_rejected"
        and e.get("CAPKEEPER_PATH") != OUTSIDE
    ]
    assert errors == []
