"""Issue 12 acceptance: the Ansible collection against a booted systemd 252.

The pinned ansible-core (``.venv-ansible``, built by ``make ansible`` from
``packaging/ansible/requirements-test.txt``) runs inside a throwaway systemd of
this module's own (the session's shared sandbox has capkeeper.service driven by
other tests), with a local connection: ``tests/ansible/inventory.ini`` names the
one sandbox twice, ``fleet-a`` and ``fleet-b``. The modules run there with the
image's ``/usr/bin/python3``; capkeeper is installed by the collection's role
through ``packaging/install.sh --venv`` (the sandbox has no network, so the venv
is made beforehand, as in ``test_systemd_service``). The tests run in file order
and build on each other: converge, converge again, check mode, an invalid
declaration, a deploy, the fleet audit.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.sandbox import SystemdSandbox, unavailable_reason
from tests.test_systemd_service import make_capkeeper_venv

pytestmark = pytest.mark.sandbox

REPO = Path(__file__).resolve().parents[1]
ANSIBLE_BIN = REPO / ".venv-ansible" / "bin"
PLAYS = REPO / "tests" / "ansible"
COLLECTION = REPO / "packaging" / "ansible"
PROMTOOL = REPO / ".cache" / "prometheus" / "usr" / "bin" / "promtool"
WORK = "/root/fleet"  # inside the sandbox
REPORT = f"{WORK}/audit.txt"
STATE_DIR = "/etc/capkeeper"
DROPIN_DIR = f"{STATE_DIR}/state.d"
APP = "/usr/local/bin/fleet-app"
TOOL = "/usr/local/bin/fleet-tool"
PLANTED = "/usr/local/sbin/fleet-planted"
NEW = "/usr/local/bin/fleet-new"
NEW_CAPS = "cap_net_admin=ep"
APP_CAPS = "cap_net_bind_service=ep"
TOOL_CAPS = "cap_net_raw=ep"

_RECAP = re.compile(
    r"^(\S+)\s+: ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)", re.MULTILINE
)


@dataclass
class Fleet:
    """The sandbox with the collection on its Ansible path."""

    sandbox: SystemdSandbox
    first_run: str = ""  # ansible-playbook's output of the converging run

    def ansible(self, tool: str, *args: str) -> subprocess.CompletedProcess[str]:
        """Run an Ansible command inside the sandbox (never raises on its exit status)."""
        env = {
            "ANSIBLE_COLLECTIONS_PATH": f"{WORK}/collections",
            "ANSIBLE_NOCOLOR": "1",
            "ANSIBLE_HOST_KEY_CHECKING": "0",
            "ANSIBLE_RETRY_FILES_ENABLED": "0",
            "ANSIBLE_PIPELINING": "1",  # no module file written per task: faster
            "ANSIBLE_LOCAL_TEMP": f"{WORK}/tmp",
            "ANSIBLE_REMOTE_TMP": f"{WORK}/tmp",
        }
        return self.sandbox.run(str(ANSIBLE_BIN / tool), *args, check=False, timeout=300, env=env)

    def play(self, *args: str) -> subprocess.CompletedProcess[str]:
        """``ansible-playbook -i inventory.ini ARGS`` with the test's variables."""
        extra = {"capkeeper_checkout": str(REPO)}
        return self.ansible(
            "ansible-playbook", "-i", str(PLAYS / "inventory.ini"), "-e", json.dumps(extra), *args
        )

    def run(self, *argv: str, check: bool = True) -> str:
        return self.sandbox.run(*argv, check=check).stdout

    def getcap(self, path: str) -> str:
        return self.run("getcap", path).strip().removeprefix(path).strip()

    def declarations(self) -> dict[str, str]:
        """Every file in state.d (and stray temporaries beside the state) with its content."""
        found = {}
        for directory in (STATE_DIR, DROPIN_DIR):
            inside = self.sandbox.path(directory)
            if inside.is_dir():
                for entry in sorted(inside.iterdir()):
                    if entry.is_file():
                        found[f"{directory}/{entry.name}"] = entry.read_text()
                    elif entry.name != "state.d":
                        found[f"{directory}/{entry.name}"] = "<directory>"
        return found


def results_of(result: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    """The module results the site play prints in its last task (a debug message)."""
    match = re.search(r'^\s*"msg": ("FLEET-RESULTS .*")$', result.stdout, re.MULTILINE)
    assert match is not None, result.stdout
    data: dict[str, Any] = json.loads(json.loads(match.group(1)).removeprefix("FLEET-RESULTS "))
    return data


def recap(result: subprocess.CompletedProcess[str]) -> dict[str, dict[str, int]]:
    """PLAY RECAP counts per host."""
    counts = {
        host: {"ok": int(ok), "changed": int(changed), "unreachable": int(u), "failed": int(f)}
        for host, ok, changed, u, f in _RECAP.findall(result.stdout)
    }
    assert counts, f"no PLAY RECAP in the output:\n{result.stdout}\n{result.stderr}"
    return counts


def wait_for_caps(fleet: Fleet, path: str, caps: str, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while fleet.getcap(path) != caps:
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} did not get {caps} back within {timeout}s")
        time.sleep(0.1)


@pytest.fixture(scope="module")
def fleet() -> Iterator[Fleet]:
    """A sandbox of this module's own, with the collection linked onto its Ansible path."""
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    if not (ANSIBLE_BIN / "ansible-playbook").exists():
        pytest.skip(f"needs the pinned ansible-core in {ANSIBLE_BIN.parent} (make ansible)")
    # Imported here: other modules load it as a pytest plugin, which must import it first.
    from tests.sandbox_fixture import _dirs_outside_root_fs

    sandbox = SystemdSandbox(binds=_dirs_outside_root_fs())
    try:
        sandbox.boot()
        make_capkeeper_venv(sandbox)
        link = f"{WORK}/collections/ansible_collections/capkeeper"
        sandbox.run("install", "-d", "-m", "0700", WORK, f"{WORK}/tmp", link)
        sandbox.run("ln", "-s", str(COLLECTION), f"{link}/capkeeper")
        for path in (APP, TOOL):
            sandbox.run("install", "-m", "0755", "/bin/true", path)
        yield Fleet(sandbox)
    finally:
        sandbox.kill()


@pytest.fixture(scope="module")
def converged(fleet: Fleet) -> Fleet:
    """The first run of the site play: installs capkeeper and declares both binaries."""
    first = fleet.play(str(PLAYS / "site.yml"))
    assert first.returncode == 0, first.stdout + first.stderr
    assert recap(first)["fleet-a"]["changed"] > 0
    results = results_of(first)
    assert results["module"]["changed"] is True
    assert results["module"]["status"] == "restored"
    assert [r["status"] for r in results["role"]] == ["restored"]
    assert fleet.getcap(APP) == APP_CAPS
    assert fleet.getcap(TOOL) == TOOL_CAPS
    fleet.first_run = first.stdout
    return fleet


# -- the acceptance tests ----------------------------------------------------------------


def test_first_run_changes_and_second_identical_run_does_not(converged: Fleet) -> None:
    """Run 1 installs, declares, restores and starts the service; run 2 reports changed=0."""
    fleet = converged
    assert fleet.run("systemctl", "is-active", "capkeeper.service").strip() == "active"
    assert fleet.run("systemctl", "is-enabled", "capkeeper.service").strip() == "enabled"
    declared = {k: v for k, v in fleet.declarations().items() if k.startswith(DROPIN_DIR)}
    assert len(declared) == 2
    assert all(Path(name).name.startswith("ansible-usr_local_bin_fleet-") for name in declared)
    assert any(f'path = "{TOOL}"\ncaps = "{TOOL_CAPS}"\n' in text for text in declared.values())
    # The handlers ran: the drop-in lists the binaries' directory, the daemon watches both.
    dropin = fleet.run("cat", "/etc/systemd/system/capkeeper.service.d/50-capkeeper-paths.conf")
    assert "ReadWritePaths=-/usr/local/bin" in dropin.splitlines()
    assert "RUNNING HANDLER [capkeeper.capkeeper.capkeeper : Restart capkeeper]" in (
        fleet.first_run
    )

    second = fleet.play(str(PLAYS / "site.yml"))
    assert second.returncode == 0, second.stdout + second.stderr
    assert recap(second)["fleet-a"]["changed"] == 0, second.stdout
    results = results_of(second)
    assert results["module"]["changed"] is False
    assert results["module"]["status"] == "in-sync"
    assert [r["changed"] for r in results["role"]] == [False]
    assert "RUNNING HANDLER" not in second.stdout


def test_check_mode_reports_the_change_and_leaves_the_host_untouched(converged: Fleet) -> None:
    """--check --diff with new caps: changed and a diff, but state.d and the xattr stay."""
    fleet = converged
    before = fleet.declarations()
    new_caps = "cap_net_raw,cap_net_admin=ep"
    result = fleet.play(
        str(PLAYS / "site.yml"), "--check", "--diff", "-e", f"fleet_tool_caps={new_caps}"
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert recap(result)["fleet-a"]["changed"] >= 1, result.stdout
    module = results_of(result)["module"]
    assert module["changed"] is True
    assert module["declaration_changed"] is True
    assert module["status"] == "drift"  # capkeeper check on the would-be state
    assert module["restored"] is True  # would be
    assert f'-caps = "{TOOL_CAPS}"' in result.stdout
    assert f'+caps = "{new_caps}"' in result.stdout
    assert fleet.declarations() == before
    assert fleet.getcap(TOOL) == TOOL_CAPS


def test_invalid_caps_fail_with_capkeepers_message_and_change_nothing(converged: Fleet) -> None:
    """An unknown capability fails the task with capkeeper's own message; state.d is as it was."""
    fleet = converged
    before = fleet.declarations()
    result = fleet.play(str(PLAYS / "site.yml"), "-e", "fleet_tool_caps=cap_bogus=ep")
    assert result.returncode != 0
    assert recap(result)["fleet-a"]["failed"] == 1
    assert "TASK [Declare fleet-tool with the module]" in result.stdout
    # capkeeper's loader message, naming the would-be file and the entry.
    assert re.search(
        r"state\.d/ansible-usr_local_bin_fleet-tool-[0-9a-f]{10}\.toml: entry 1 "
        rf"\({re.escape(TOOL)}\): caps: unknown capability 'cap_bogus'",
        result.stdout,
    ), result.stdout
    assert fleet.declarations() == before  # no change, no leftover temporary copy
    assert fleet.getcap(TOOL) == TOOL_CAPS
    assert fleet.run("capkeeper", "validate").endswith(": no problems\n")


def test_deploy_over_a_declared_binary_is_repaired_by_the_service(converged: Fleet) -> None:
    """After the play, cp over either binary drops its caps and the daemon restores them."""
    fleet = converged
    for path, caps in ((APP, APP_CAPS), (TOOL, TOOL_CAPS)):
        pid = fleet.run("systemctl", "show", "-p", "MainPID", "--value", "capkeeper.service")
        fleet.run("cp", "/bin/true", path)  # rewrites in place: the kernel drops the xattr
        wait_for_caps(fleet, path, caps)
        assert fleet.run("systemctl", "show", "-p", "MainPID", "--value", "capkeeper.service") == (
            pid
        )
    restored = fleet.sandbox.journal(
        "MESSAGE_ID=5aaaaf94bc4b4066b6c2dd65cc94600a", f"CAPKEEPER_PATH={TOOL}"
    )
    assert any(entry.get("_SYSTEMD_UNIT") == "capkeeper.service" for entry in restored)


def test_a_new_declaration_reloads_the_running_service(converged: Fleet) -> None:
    """A binary added in a watched directory: SIGHUP reload (same PID), then it is kept."""
    fleet = converged
    fleet.run("install", "-m", "0755", "/bin/true", NEW)
    pid = fleet.run("systemctl", "show", "-p", "MainPID", "--value", "capkeeper.service")
    more = {"fleet_more": [{"path": NEW, "caps": NEW_CAPS}]}
    result = fleet.play(str(PLAYS / "site.yml"), "-e", json.dumps(more))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "RUNNING HANDLER [capkeeper.capkeeper.capkeeper : Reload capkeeper]" in result.stdout
    assert "Restart capkeeper" not in result.stdout  # the drop-in already lists the directory
    assert [r["status"] for r in results_of(result)["role"]] == ["in-sync", "restored"]
    assert fleet.run("systemctl", "show", "-p", "MainPID", "--value", "capkeeper.service") == pid
    fleet.run("cp", "/bin/true", NEW)
    wait_for_caps(fleet, NEW, NEW_CAPS)


def test_metrics_dropin_from_the_readme_feeds_the_alert_rules(converged: Fleet) -> None:
    """README's metrics drop-in: the service writes a lint-clean textfile that outlives it."""
    fleet = converged
    if not PROMTOOL.is_file():
        pytest.skip(f"needs promtool at {PROMTOOL} (make promtool)")
    readme = (REPO / "README.md").read_text()
    match = re.search(r"```ini\n# (/etc/systemd/system/\S+\.conf)\n(.*?)```", readme, re.DOTALL)
    assert match is not None
    target, text = match.groups()
    fleet.sandbox.path(Path(target).parent).mkdir(parents=True, exist_ok=True)
    fleet.sandbox.path(target).write_text(text)
    fleet.run("systemctl", "daemon-reload")
    fleet.run("systemctl", "reset-failed", "capkeeper.service", check=False)
    fleet.run("systemctl", "restart", "capkeeper.service")
    metrics = fleet.sandbox.path("/var/lib/capkeeper/capkeeper.prom")
    started = time.time()
    deadline = time.monotonic() + 15
    while not (metrics.is_file() and f'path="{TOOL}",status="in-sync"' in metrics.read_text()):
        assert time.monotonic() < deadline, "no metrics file from the service"
        time.sleep(0.1)
    lines = metrics.read_text().splitlines()
    for path in (APP, TOOL):
        assert f'capkeeper_entry_status{{path="{path}",status="in-sync"}} 1' in lines
        assert f'capkeeper_entry_in_sync{{path="{path}"}} 1' in lines
    assert "capkeeper_rescan_interval_seconds 300" in lines
    (stamp,) = (line.split()[1] for line in lines if line.startswith("capkeeper_metrics_time"))
    assert started - 5 <= float(stamp) <= time.time() + 5  # the sandbox shares the clock
    lint = subprocess.run(
        [str(PROMTOOL), "check", "metrics"],
        input=metrics.read_text(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert lint.returncode == 0, lint.stdout + lint.stderr
    # Stopped, the daemon leaves its last file behind: the stale alert can fire.
    fleet.run("systemctl", "stop", "capkeeper.service")
    assert metrics.is_file()
    fleet.run("systemctl", "start", "capkeeper.service")


def test_fleet_audit_reports_every_host_and_fails_on_a_planted_binary(converged: Fleet) -> None:
    """fleet_audit over two inventory names: one table; a planted cap_sys_admin fails it."""
    fleet = converged
    args = [
        "capkeeper.capkeeper.fleet_audit",
        "-e",
        json.dumps({"capkeeper_audit_roots": ["/usr/local"], "capkeeper_audit_report": REPORT}),
    ]
    clean = fleet.play(*args)
    assert clean.returncode == 0, clean.stdout + clean.stderr
    table = fleet.sandbox.path(REPORT).read_text().splitlines()
    assert table[0].split() == ["host", "unmanaged", "drifted", "refused", "worst", "rating"]
    assert [line.split() for line in table[1:]] == [
        ["fleet-a", "0", "0", "0", "none"],
        ["fleet-b", "0", "0", "0", "none"],
    ]

    fleet.run("install", "-D", "-m", "0755", "/bin/true", PLANTED)
    fleet.run("setcap", "cap_sys_admin=ep", PLANTED)
    try:
        dirty = fleet.play(*args)
    finally:
        fleet.run("rm", "-f", PLANTED)
    assert dirty.returncode == 2, dirty.stdout + dirty.stderr
    assert recap(dirty)["localhost"]["failed"] == 1
    assert "findings rated above medium on fleet-a, fleet-b" in dirty.stdout
    report = fleet.sandbox.path(REPORT).read_text().splitlines()
    assert [line.split() for line in report[1:3]] == [
        ["fleet-a", "1", "0", "0", "high"],
        ["fleet-b", "1", "0", "0", "high"],
    ]
    assert report[3] == "findings rated above medium:"
    for host in ("fleet-a", "fleet-b"):
        assert (
            f"{host}: high unmanaged {PLANTED} cap_sys_admin=ep; cap_sys_admin amounts to root"
            in report
        )
