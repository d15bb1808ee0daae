"""Issue 9 acceptance: the .deb and .rpm for production hosts.

The packages are built once per session, the way ``make test`` runs in CI:
``make wheels`` fetches the pinned wheelhouse (network, cached in ``dist/``),
then ``make deb``, a second .deb of an older version (to upgrade from) and
``make rpm`` are built in parallel, each under ``unshare -n`` (no network).
The .deb is then installed with ``dpkg -i`` into a throwaway systemd booted for
this module (``tests/sandbox.py``), never on the host, and exercised there:
the hardened service, the dpkg file trigger, the zero-touch drop-in, upgrade,
removal and purge. The rpm cannot be installed here (no rpm-based system); its
scriptlets, file trigger and file list are checked instead.

The sandbox's root is an overlay of the host's, so its ``/usr/sbin/policy-rc.d``
(``exit 101`` on container images) would stop dpkg from starting services;
it is removed inside the sandbox, as on a production host.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from capkeeper.events import EVENTS
from tests.conftest import IN_CI
from tests.sandbox import SystemdSandbox, unavailable_reason
from tests.sandbox_fixture import _dirs_outside_root_fs
from tests.test_systemd_service import wait_for

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
DIST = REPO / "dist"
WHEELHOUSE = DIST / "wheelhouse"
PREVIOUS_OUT = REPO / "build" / "prev-dist"
TIMES = REPO / "build" / "packaging-times.txt"
# Developers iterating on the sandbox tests may set this to reuse the packages
# of the previous run (never in CI: there every session builds them).
REUSE = "CAPKEEPER_TEST_REUSE_PACKAGES"
VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
PREVIOUS = f"{VERSION}~prev1"  # sorts before VERSION: an upgrade to VERSION
PREVIOUS_BUILD_ARGS = (str(WHEELHOUSE), str(PREVIOUS_OUT), str(REPO / "build" / "deb-previous"))

VENV = "/usr/lib/capkeeper"
STATE = "/etc/capkeeper/state.toml"
STATE_D = "/etc/capkeeper/state.d"
DROPIN = "/etc/systemd/system/capkeeper.service.d/50-capkeeper-paths.conf"
UNIT = "capkeeper.service"
PATH_UNIT = "capkeeper-dropin.path"
CAP_SETFCAP_MASK = f"{1 << 31:016x}"
RESTORED = EVENTS["capability_restored"].message_id
TOOL = "/usr/bin/ck-test-tool"
TOOL_CAPS = "cap_net_raw=ep"
# Prints each argument that exists and is not a directory.
PRINT_EXISTING_FILES = (
    'for p; do if { [ -e "$p" ] || [ -L "$p" ]; } && [ ! -d "$p" ]; then echo "$p"; fi; done'
)


# -- building (once per session) ----------------------------------------------------------


@dataclass(frozen=True)
class Built:
    """The packages built for this session, and how long each build took."""

    deb: Path
    previous_deb: Path
    rpm: Path
    seconds: dict[str, float]


def _run_logged(argv: list[str], log: Path, env: dict[str, str] | None = None) -> None:
    with log.open("w") as out:
        result = subprocess.run(
            argv, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=env, check=False
        )
    if result.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-40:])
        raise AssertionError(f"{' '.join(argv)} failed ({result.returncode}):\n{tail}")


@pytest.fixture(scope="session")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    """``make wheels`` (network), then the three package builds in parallel, offline."""
    if os.geteuid() != 0:
        pytest.skip("needs root: the package builds run under unshare -n")
    for tool in ("dpkg-buildpackage", "dh", "rpmbuild", "unshare"):
        if shutil.which(tool) is None:
            pytest.skip(f"needs '{tool}' (make test installs it)")
    result = Built(
        deb=DIST / f"capkeeper_{VERSION}_amd64.deb",
        previous_deb=PREVIOUS_OUT / f"capkeeper_{PREVIOUS}_amd64.deb",
        rpm=DIST / f"capkeeper-{VERSION}-1.x86_64.rpm",
        seconds={},
    )
    packages = (result.deb, result.previous_deb, result.rpm)
    if os.environ.get(REUSE) and not IN_CI and all(p.is_file() for p in packages):
        return result
    logs = tmp_path_factory.mktemp("package-builds")
    start = time.monotonic()
    # -o: never rebuild the test venv from inside the tests.
    _run_logged(["make", "-o", ".venv/bin/.installed", "wheels"], logs / "wheels.log")
    seconds = {"wheels (cached after the first run)": time.monotonic() - start}
    offline = ["unshare", "--net", "--"]
    jobs = {
        "deb": ([*offline, "make", "deb"], None),
        "previous deb": (
            [*offline, "sh", "packaging/build-deb.sh", *PREVIOUS_BUILD_ARGS],
            {**os.environ, "DEB_VERSION": PREVIOUS},
        ),
        "rpm": ([*offline, "make", "rpm"], None),
    }
    procs = {}
    started = time.monotonic()
    for name, (argv, env) in jobs.items():
        log = (logs / f"{name.replace(' ', '-')}.log").open("w")
        procs[name] = (
            subprocess.Popen(argv, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env),
            log,
            time.monotonic(),
        )
    failures = []
    while procs:
        for name, (proc, log, began) in list(procs.items()):
            code = proc.poll()
            if code is None:
                continue
            del procs[name]
            log.close()
            seconds[name] = time.monotonic() - began
            if code != 0:
                text = Path(log.name).read_text(errors="replace").splitlines()
                failures.append(f"{name} build failed ({code}):\n" + "\n".join(text[-40:]))
        time.sleep(0.2)
    seconds["three builds in parallel"] = time.monotonic() - started
    TIMES.parent.mkdir(parents=True, exist_ok=True)
    TIMES.write_text("".join(f"{name}: {s:.1f} s\n" for name, s in seconds.items()))
    assert not failures, "\n\n".join(failures)
    result.seconds.update(seconds)
    return result


def _out(*argv: str) -> str:
    return subprocess.run(argv, capture_output=True, text=True, check=True).stdout


def deb_members(deb: Path) -> dict[str, str]:
    """Path -> type ('d', '-', 'l') of every member of a .deb's data archive."""
    data = subprocess.run(["dpkg-deb", "--fsys-tarfile", str(deb)], capture_output=True, check=True)
    listing = subprocess.run(
        ["tar", "-tv", "--quoting-style=literal"],
        input=data.stdout,
        capture_output=True,
        check=True,
    ).stdout.decode()
    members = {}
    for line in listing.splitlines():
        name = line.split(None, 5)[5].split(" -> ")[0]
        members["/" + name.removeprefix("./").rstrip("/")] = line[0]
    members.pop("/", None)
    return members


# -- the source tree (no build needed) --------------------------------------------------


def test_man_pages_are_current(tmp_path: Path) -> None:
    """man/capkeeper.8 and man/capkeeper-state.5 are what packaging/manpages.py makes now."""
    subprocess.run(
        [sys.executable, str(REPO / "packaging" / "manpages.py"), str(tmp_path)], check=True
    )
    for name in ("capkeeper.8", "capkeeper-state.5"):
        fresh = (tmp_path / name).read_text()
        assert (REPO / "man" / name).read_text() == fresh, (
            f"man/{name} is stale (the CLI, settings or state keys changed): run make man"
        )


@pytest.mark.parametrize("page", ["capkeeper.8", "capkeeper-state.5"])
def test_man_pages_render_without_warnings(page: str) -> None:
    """man --warnings -l renders each page with no warning at 80 and 200 columns."""
    for width in ("80", "200"):
        result = subprocess.run(
            ["man", "--warnings", "-l", str(REPO / "man" / page)],
            capture_output=True,
            text=True,
            env={**os.environ, "MANWIDTH": width, "MAN_KEEP_STDERR": "1"},
            check=False,
        )
        assert result.returncode == 0
        assert result.stderr == "", result.stderr
        assert "EXIT STATUS" in result.stdout or "TRUST RULES" in result.stdout


def test_capkeeper_8_documents_every_command() -> None:
    """Every subcommand, exit status and CAPKEEPER_* setting appears in capkeeper(8)."""
    from capkeeper.cli import COMMANDS, ExitStatus
    from capkeeper.settings import Settings

    text = (REPO / "man" / "capkeeper.8").read_text().replace("\\-", "-")
    for command in COMMANDS:
        assert f"COMMAND \\fI\\,'capkeeper {command}'" in text, command
    for status in ExitStatus:
        assert f".B {int(status)}\n" in text
    for name in Settings.model_fields:
        assert f"CAPKEEPER_{name.upper()}" in text
    for section in ("SIGNALS", "FILES", "ENVIRONMENT", "EXAMPLES", "EXIT STATUS"):
        assert f".SH {section}" in text


def test_versions_agree() -> None:
    """pyproject.toml, the Debian changelog and the rpm spec name one version."""
    changelog = (REPO / "packaging" / "debian" / "changelog").read_text()
    spec = (REPO / "packaging" / "rpm" / "capkeeper.spec").read_text()
    assert changelog.startswith(f"capkeeper ({VERSION}) ")
    assert re.search(rf"^Version:\s+{re.escape(VERSION)}$", spec, re.MULTILINE)


def test_lock_pins_every_runtime_dependency_with_hashes() -> None:
    """requirements.lock pins each dependency of pyproject.toml (and the build tools) by hash."""
    lock = (REPO / "packaging" / "requirements.lock").read_text()
    pinned = {
        canonicalize_name(m[1]): m[2]
        for m in re.finditer(r"^([A-Za-z0-9._-]+)==(\S+) \\$", lock, re.MULTILINE)
    }
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    for text in project["dependencies"]:
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate({"python_version": "3.11"}):
            continue  # not installed on Debian 12's python3.11
        name = canonicalize_name(req.name)
        assert name in pinned, f"{name} is not in packaging/requirements.lock: run make lock"
        assert req.specifier.contains(pinned[name], prereleases=True), (name, pinned[name])
    for tool in ("pip", "setuptools", "wheel"):
        assert tool in pinned
    blocks = re.split(r"^(?=[A-Za-z0-9._-]+==)", lock, flags=re.MULTILINE)[1:]
    assert all("--hash=sha256:" in block for block in blocks)


def test_leak_check_fails_on_the_build_path(tmp_path: Path) -> None:
    """packaging/check-leaks.sh fails when a file still names the build directory."""
    tree = tmp_path / "tree" / "usr" / "lib" / "capkeeper"
    tree.mkdir(parents=True)
    (tree / "pyvenv.cfg").write_text("home = /usr/bin\n")
    check = ["sh", str(REPO / "packaging" / "check-leaks.sh"), str(tmp_path / "tree")]
    build = "/srv/build/capkeeper-0.1.0"
    assert subprocess.run([*check, build], check=False).returncode == 0
    (tree / "bin").mkdir()
    (tree / "bin" / "tool").write_bytes(b"#!" + build.encode() + b"/debian/x/bin/python\n")
    result = subprocess.run(
        [*check, "/elsewhere", build], capture_output=True, text=True, check=False
    )
    assert result.returncode == 1
    assert "bin/tool" in result.stderr


def test_lintian_overrides_are_commented() -> None:
    """Every lintian override in the repo sits under a comment that justifies it."""
    commented = False
    text = (REPO / "packaging" / "debian" / "capkeeper.lintian-overrides").read_text()
    for line in text.splitlines():
        if line.startswith("#"):
            commented = True
        elif not line.strip():
            commented = False
        else:
            assert commented, f"override without a comment above it: {line}"


# -- the built packages -------------------------------------------------------------------


def test_deb_is_built_offline_with_the_expected_name(built: Built) -> None:
    """make deb under unshare -n produced dist/capkeeper_<version>_amd64.deb."""
    assert built.deb.is_file()
    fields = _out("dpkg-deb", "-f", str(built.deb), "Package", "Version", "Architecture")
    assert fields.split() == [
        "Package:",
        "capkeeper",
        "Version:",
        VERSION,
        "Architecture:",
        "amd64",
    ]
    depends = _out("dpkg-deb", "-f", str(built.deb), "Depends")
    assert "python3.11" in depends
    print(f"package size: {built.deb.stat().st_size} bytes; build times: {built.seconds}")


def test_deb_contents(built: Built, tmp_path: Path) -> None:
    """The files the issue lists, a conffile, no byte code, no build path, a clean venv."""
    members = deb_members(built.deb)
    for path, kind in {
        "/usr/bin/capkeeper": "-",
        "/lib/systemd/system/capkeeper.service": "-",
        "/lib/systemd/system/capkeeper-dropin.path": "-",
        "/lib/systemd/system/capkeeper-dropin.service": "-",
        "/usr/lib/sysusers.d/capkeeper.conf": "-",
        "/usr/lib/systemd/catalog/capkeeper.catalog": "-",
        "/etc/capkeeper/state.toml": "-",
        "/etc/capkeeper/state.d": "d",
        "/usr/share/man/man8/capkeeper.8.gz": "-",
        "/usr/share/man/man5/capkeeper-state.5.gz": "-",
        "/usr/libexec/capkeeper/reapply": "-",
        f"{VENV}/bin/python3.11": "l",
        f"{VENV}/pyvenv.cfg": "-",
    }.items():
        assert members.get(path) == kind, path
    assert not any("__pycache__" in p or p.endswith(("direct_url.json", ".pyc")) for p in members)
    assert not any(p.startswith(f"{VENV}/bin/activate") for p in members)
    control = tmp_path / "control"
    subprocess.run(["dpkg-deb", "-e", str(built.deb), str(control)], check=True)
    assert (control / "conffiles").read_text().split() == ["/etc/capkeeper/state.toml"]
    data = tmp_path / "data"
    subprocess.run(["dpkg-deb", "-x", str(built.deb), str(data)], check=True)
    assert (data / "usr/bin/capkeeper").read_text() == (
        f'#!/bin/sh\nexec "{VENV}/bin/python" -I -m capkeeper "$@"\n'
    )
    cfg = (data / VENV.lstrip("/") / "pyvenv.cfg").read_text()
    assert "command" not in cfg
    assert "home = /usr/bin" in cfg
    for script in (data / VENV.lstrip("/") / "bin").iterdir():
        if script.is_file() and not script.is_symlink():
            assert script.read_bytes().startswith(f"#!{VENV}/bin/python".encode()), script
    leaks = subprocess.run(
        ["grep", "-rlF", "-e", str(REPO), "-e", "/build/deb", str(data)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert leaks.stdout == ""
    state = (data / "etc/capkeeper/state.toml").read_text()
    assert "# [[binary]]" in state
    assert tomllib.loads(state) == {}  # only commented examples: an empty state


def _venv_digests(deb: Path) -> dict[str, str]:
    """md5 of every file the .deb installs below the venv (from its md5sums)."""
    with tempfile.TemporaryDirectory() as control:
        subprocess.run(["dpkg-deb", "-e", str(deb), control], check=True)
        lines = Path(control, "md5sums").read_text().splitlines()
    return {
        path: digest
        for digest, path in (line.split(None, 1) for line in lines)
        if path.startswith(VENV.lstrip("/"))
    }


def test_two_builds_give_the_same_venv(built: Built) -> None:
    """Two dpkg-buildpackage runs from the same wheelhouse install identical venv files."""
    first, second = _venv_digests(built.deb), _venv_digests(built.previous_deb)
    assert len(first) > 100
    assert first == second


def test_lintian_is_clean(built: Built, tmp_path: Path) -> None:
    """lintian: no error, no warning (beyond the commented overrides), no no-manual-page.

    Its temporary files go to the test's own directory: lintian leaves one behind
    (``mldbm-elf-*``, a Berkeley DB of ELF facts) in ``$TMPDIR`` at every run."""
    result = subprocess.run(
        ["lintian", "--pedantic", "--display-info", "--show-overrides", str(built.deb)],
        capture_output=True,
        text=True,
        env={**os.environ, "TMPDIR": str(tmp_path)},
        check=False,
    )
    output = result.stdout
    (REPO / "build" / "lintian.txt").write_text(output + result.stderr)
    print(output)
    problems = [line for line in output.splitlines() if line.startswith(("E:", "W:"))]
    assert problems == [], output
    assert "no-manual-page" not in output
    assert result.returncode == 0, result.stderr


def test_rpm_scriptlets_and_file_trigger(built: Built) -> None:
    """rpm -qp --scripts shows the systemd, sysusers and clean-up scriptlets; the file trigger
    re-applies after transactions touching /usr/bin and /usr/sbin."""
    scripts = _out("rpm", "-qp", "--scripts", str(built.rpm))
    units = "capkeeper.service capkeeper-dropin.path"
    for expected in (
        f"systemd-update-helper install-system-units {units}",
        f"systemd-update-helper remove-system-units {units} capkeeper-dropin.service",
        f"systemd-update-helper mark-restart-system-units {units}",
        "getent passwd capkeeper >/dev/null || useradd -r -g capkeeper",
        "compileall",
    ):
        assert expected in scripts, expected
    for section in ("preinstall", "postinstall", "preuninstall", "postuninstall"):
        assert f"{section} scriptlet" in scripts
    triggers = _out("rpm", "-qp", "--filetriggers", str(built.rpm))
    assert "transfiletriggerin scriptlet (using /bin/sh) -- /usr/bin, /usr/sbin" in triggers
    assert "/usr/libexec/capkeeper/reapply || :" in triggers


def test_rpmlint_reports_no_error(built: Built) -> None:
    """rpmlint (from PyPI) with the repo's commented filters: 0 errors."""
    rpmlint = Path(sys.executable).parent / "rpmlint"
    result = subprocess.run(
        [str(rpmlint), "-c", str(REPO / "packaging" / "rpm" / "rpmlint.toml"), str(built.rpm)],
        capture_output=True,
        text=True,
        check=False,
    )
    (REPO / "build" / "rpmlint.txt").write_text(result.stdout + result.stderr)
    summary = re.search(r"(\d+) errors, (\d+) warnings", result.stdout)
    assert summary is not None, result.stdout + result.stderr
    print(summary[0])
    assert summary[1] == "0", result.stdout


def test_rpm_and_deb_install_the_same_files(built: Built) -> None:
    """rpm -qlp and dpkg -c list the same files (Debian's /lib/systemd is /usr/lib/systemd).

    Not compared: each distribution's documentation (/usr/share/doc) and lintian's overrides.
    """

    def ours(path: str) -> bool:
        return not path.startswith(("/usr/share/doc/", "/usr/share/lintian/"))

    deb = {
        re.sub(r"^/lib/systemd/", "/usr/lib/systemd/", path): kind
        for path, kind in deb_members(built.deb).items()
    }
    rpm_files = set(_out("rpm", "-qlp", str(built.rpm)).split())
    deb_files = {p for p, kind in deb.items() if kind != "d" and ours(p)}
    assert {p for p in rpm_files if ours(p) and deb.get(p) != "d"} == deb_files
    # The directories the package owns are the same too.
    own = ("/usr/lib/capkeeper", "/usr/libexec/capkeeper", "/etc/capkeeper")
    deb_dirs = {p for p, kind in deb.items() if kind == "d" and p.startswith(own)}
    assert {p for p in rpm_files if deb.get(p) == "d" and p.startswith(own)} == deb_dirs
    assert rpm_files >= deb_dirs


# -- installed in a throwaway systemd -----------------------------------------------------


@contextlib.contextmanager
def booted() -> Iterator[SystemdSandbox]:
    """A fresh throwaway systemd, ready for dpkg -i (see the module docstring)."""
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    sandbox = SystemdSandbox(binds=_dirs_outside_root_fs())
    try:
        sandbox.boot()
        sandbox.run("rm", "-f", "/usr/sbin/policy-rc.d")
        yield sandbox
    finally:
        sandbox.kill()


def copy_in(sandbox: SystemdSandbox, package: Path) -> str:
    inside = f"/root/{package.name}"
    sandbox.install_file(package, inside)
    return inside


@dataclass
class Host:
    """A sandbox with the package installed, and the helpers the tests share."""

    sandbox: SystemdSandbox

    def run(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.sandbox.run(*argv, check=check, timeout=300)

    def show(self, unit: str, *properties: str) -> dict[str, str]:
        argv = ["systemctl", "show", unit, *(f"--property={p}" for p in properties)]
        return dict(line.split("=", 1) for line in self.run(*argv).stdout.splitlines())

    def main_pid(self) -> int:
        return int(self.show(UNIT, "MainPID")["MainPID"])

    def getcap(self, path: str) -> str:
        return self.run("getcap", path).stdout.strip().removeprefix(path).strip()

    def caps_are(self, path: str, caps: str) -> bool:
        return self.getcap(path) == caps

    def write(self, path: str, text: str) -> None:
        """Write a file inside as an admin would (``cat >``): root-owned, mode 0644."""
        self.sandbox.run("sh", "-c", 'umask 022 && cat > "$0"', path, input=text)

    def running(self) -> int | None:
        """capkeeper.service's main PID once it is active and running, else None."""
        shown = self.show(UNIT, "ActiveState", "SubState", "MainPID")
        ok = (shown["ActiveState"], shown["SubState"]) == ("active", "running")
        return int(shown["MainPID"]) if ok and shown["MainPID"] != "0" else None

    def journal_after(self, mark: int, *matches: str) -> list[dict[str, object]]:
        return [
            e for e in self.sandbox.journal(*matches) if int(str(e["__MONOTONIC_TIMESTAMP"])) > mark
        ]

    def settled(self) -> None:
        """Wait until capkeeper-dropin.service has finished what the last state edit started."""

        def idle() -> bool:
            state = self.show("capkeeper-dropin.service", "ActiveState")["ActiveState"]
            return state in ("inactive", "failed")

        wait_for(idle, "capkeeper-dropin.service to finish", 60)

    def mark(self) -> int:
        return int(str(self.sandbox.journal("-n", "1")[-1]["__MONOTONIC_TIMESTAMP"]))


def tool_package(directory: Path, version: str) -> Path:
    """A small .deb shipping /usr/bin/ck-test-tool (a copy of true), built with dpkg-deb."""
    root = directory / f"ck-test-tool-{version}"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "usr" / "bin").mkdir(parents=True)
    (root / "DEBIAN" / "control").write_text(
        "Package: ck-test-tool\n"
        f"Version: {version}\n"
        "Architecture: amd64\n"
        "Maintainer: capkeeper tests <dev@capkeeper.invalid>\n"
        "Description: a binary for capkeeper's dpkg trigger test\n"
    )
    shutil.copy(shutil.which("true") or "/bin/true", root / "usr" / "bin" / "ck-test-tool")
    os.chmod(root / "usr" / "bin" / "ck-test-tool", 0o755)
    out = directory / f"ck-test-tool_{version}_amd64.deb"
    subprocess.run(
        ["dpkg-deb", "--root-owner-group", "-Zgzip", "-b", str(root), str(out)],
        check=True,
        capture_output=True,
    )
    return out


@pytest.fixture(scope="module")
def host(built: Built) -> Iterator[Host]:
    """The current .deb installed with dpkg -i in a sandbox booted for this module."""
    with booted() as sandbox:
        deb = copy_in(sandbox, built.deb)
        sandbox.run("dpkg", "-i", deb, timeout=300)
        installed = Host(sandbox)
        wait_for(installed.running, "capkeeper.service running after dpkg -i", 60)
        yield installed


@pytest.mark.sandbox
def test_installed_service_is_hardened_and_enabled(host: Host) -> None:
    """dpkg -i: capkeeper.service active as user capkeeper with CapEff = CAP_SETFCAP only."""
    pid = wait_for(host.running, "capkeeper.service running", 30)
    status = {
        k: v.strip()
        for k, v in (
            line.split(":", 1)
            for line in host.sandbox.path(f"/proc/{pid}/status").read_text().splitlines()
        )
    }
    uid = host.run("id", "-u", "capkeeper").stdout.strip()
    assert status["Uid"].split() == [uid] * 4
    assert status["CapEff"] == CAP_SETFCAP_MASK
    assert status["CapBnd"] == CAP_SETFCAP_MASK
    assert host.run("systemctl", "is-enabled", UNIT, PATH_UNIT).stdout.split() == ["enabled"] * 2
    assert host.run("systemctl", "is-active", PATH_UNIT).stdout.strip() == "active"
    verify = host.run(
        "systemd-analyze", "verify", "--man=no", UNIT, PATH_UNIT, "capkeeper-dropin.service",
        check=False,
    )  # fmt: skip
    assert verify.returncode == 0, verify.stderr
    assert [line for line in verify.stderr.splitlines() if "capkeeper" in line] == []
    # The catalog was indexed by systemd's own dpkg trigger.
    catalog = host.run("journalctl", "--dump-catalog", RESTORED)
    assert "Subject: capkeeper restored" in catalog.stdout


@pytest.mark.sandbox
def test_version_without_a_venv_on_path(host: Host) -> None:
    """capkeeper --version works with a plain PATH, and man finds both pages."""
    result = host.run("env", "-i", "PATH=/usr/bin:/bin", "capkeeper", "--version")
    assert result.stdout.strip() == f"capkeeper {VERSION}"
    for page in (("8", "capkeeper"), ("5", "capkeeper-state")):
        where = host.run("man", "-w", *page).stdout.strip()
        assert where == f"/usr/share/man/man{page[0]}/{page[1]}.{page[0]}.gz"


def _declare(host: Host, name: str, entries: dict[str, str]) -> None:
    text = "".join(f'[[binary]]\npath = "{p}"\ncaps = "{c}"\n\n' for p, c in entries.items())
    host.write(f"{STATE_D}/{name}", text)


def _dropin_lists(host: Host, directory: str) -> bool:
    path = host.sandbox.path(DROPIN)
    return path.is_file() and f"ReadWritePaths=-{directory}\n" in path.read_text()


@pytest.mark.sandbox
def test_zero_touch_a_new_directory_restarts_and_the_daemon_repairs(host: Host) -> None:
    """A state.d file declaring binaries in new directories (/usr/local/bin, /opt/...) is
    enforced with no other command: drop-in written, service restarted, cp repaired."""
    app, zero = "/usr/local/bin/ck-app", "/opt/ck-zero/bin/ck-zero"
    host.run("install", "-D", "-m", "0755", "/bin/true", app)
    host.run("install", "-D", "-m", "0755", "/bin/true", zero)
    before = wait_for(host.running, "the daemon", 30)
    mark = host.mark()
    _declare(host, "10-zero.toml", {app: "cap_net_bind_service=ep", zero: "cap_net_raw=ep"})

    wait_for(lambda: _dropin_lists(host, "/opt/ck-zero/bin"), "the drop-in for /opt", 60)
    assert _dropin_lists(host, "/usr/local/bin")

    def new_daemon() -> int | None:
        pid = host.running()
        return pid if pid != before else None

    restarted = wait_for(new_daemon, "a restart", 60)
    wait_for(partial(host.caps_are, zero, "cap_net_raw=ep"), "startup apply", 30)
    for path, caps in ((app, "cap_net_bind_service=ep"), (zero, "cap_net_raw=ep")):
        host.run("cp", "/bin/false", path)  # a deploy: cp over the file strips the xattr
        wait_for(partial(host.caps_are, path, caps), f"{path} repaired", 30)
    repaired = host.journal_after(mark, f"MESSAGE_ID={RESTORED}", f"CAPKEEPER_PATH={zero}")
    assert any(str(e["_PID"]) == str(restarted) for e in repaired)
    assert host.show("capkeeper-dropin.service", "Result")["Result"] == "success"
    assert host.run("capkeeper", "systemd-dropin", "--check").returncode == 0

    # Another binary in an already writable directory: a reload, not a restart.
    other = "/usr/local/bin/ck-other"
    host.run("install", "-m", "0755", "/bin/true", other)
    _declare(host, "20-other.toml", {other: "cap_chown=ep"})
    wait_for(partial(host.caps_are, other, "cap_chown=ep"), "the reloaded daemon's apply", 60)
    assert host.running() == restarted


@pytest.mark.sandbox
def test_dpkg_trigger_reapplies_with_the_service_stopped(host: Host, tmp_path: Path) -> None:
    """Service stopped: dpkg -i of a package shipping a declared /usr/bin binary ends with the
    capabilities on it, on install and on upgrade (which replaces the file)."""
    _declare(host, "30-tool.toml", {TOOL: TOOL_CAPS})
    wait_for(lambda: _dropin_lists(host, "/usr/bin"), "the drop-in for /usr/bin", 60)
    host.settled()
    host.run("systemctl", "stop", UNIT)
    try:
        for version in ("1.0", "1.1"):
            mark = host.mark()
            package = copy_in(host.sandbox, tool_package(tmp_path, version))
            result = host.run("dpkg", "-i", package)
            assert host.run("systemctl", "is-active", UNIT, check=False).stdout.strip() != "active"
            assert host.getcap(TOOL) == TOOL_CAPS, result.stdout + result.stderr
            restored = host.journal_after(mark, f"MESSAGE_ID={RESTORED}", f"CAPKEEPER_PATH={TOOL}")
            assert [e["CAPKEEPER_CAUSE"] for e in restored] == ["apply"]
            assert "installed" in host.run("dpkg-query", "-W", "-f=${Status}", "capkeeper").stdout
    finally:
        host.run("systemctl", "start", UNIT)


@pytest.mark.sandbox
def test_failing_trigger_never_fails_dpkg(host: Host, tmp_path: Path) -> None:
    """An invalid state makes the trigger's apply fail: dpkg still exits 0, capkeeper stays
    configured, and the error is in the journal."""
    broken = f"{STATE_D}/40-broken.toml"
    host.write(broken, '[[binary]]\npath = "/usr/bin/ck-test-tool"\ncaps = "cap_no_such_thing"\n')
    try:
        mark = host.mark()
        package = copy_in(host.sandbox, tool_package(tmp_path, "1.2"))
        result = host.run("dpkg", "-i", package, check=False)
        assert result.returncode == 0, result.stderr
        assert "capkeeper: the state is invalid" in result.stderr
        status = host.run("dpkg-query", "-W", "-f=${Status}", "capkeeper").stdout
        assert status == "install ok installed"
        errors = host.journal_after(mark, "SYSLOG_IDENTIFIER=capkeeper-trigger", "PRIORITY=3")
        assert any("cap_no_such_thing" in str(e["MESSAGE"]) for e in errors), errors
        assert host.run("dpkg", "--audit").stdout == ""  # nothing half-configured
    finally:
        host.run("rm", "-f", broken)
        wait_for(host.running, "the daemon", 30)


@pytest.mark.sandbox
def test_upgrade_keeps_the_edited_state_then_remove_and_purge(built: Built) -> None:
    """In a fresh sandbox: install the previous build, edit /etc/capkeeper, upgrade (the
    service restarts, the edits stay), dpkg -r (stopped, no process left), dpkg --purge
    (no file of the package and no conffile left; the admin's state.d file stays)."""
    with booted() as sandbox:
        host = Host(sandbox)
        host.run("dpkg", "-i", copy_in(sandbox, built.previous_deb))
        wait_for(host.running, "the previous build's daemon", 60)
        edited = (
            host.sandbox.path(STATE).read_text()
            + '\n[[binary]]\npath = "/usr/local/bin/ck-edited"\ncaps = "cap_net_raw=ep"\n'
        )
        host.write(STATE, edited)
        mine = f"{STATE_D}/50-mine.toml"
        host.write(mine, "# the admin's own file\n")
        wait_for(lambda: _dropin_lists(host, "/usr/local/bin"), "the edit's drop-in", 60)
        host.settled()  # the edit restarted the daemon: take its PID after that
        old_pid = wait_for(host.running, "the daemon after the edit", 60)

        host.run("dpkg", "-i", copy_in(sandbox, built.deb))
        version = host.run("dpkg-query", "-W", "-f=${Version}", "capkeeper").stdout
        assert version == VERSION
        new_pid = wait_for(host.running, "the upgraded daemon", 60)
        assert new_pid != old_pid
        assert host.sandbox.path(STATE).read_text() == edited
        assert host.sandbox.path(mine).read_text() == "# the admin's own file\n"

        package_files = host.run("dpkg-query", "-L", "capkeeper").stdout.split()
        host.run("dpkg", "-r", "capkeeper")
        assert host.run("systemctl", "is-active", UNIT, check=False).stdout.strip() == "inactive"
        uid = host.run("id", "-u", "capkeeper").stdout.strip()
        left = host.run("ps", "-e", "-o", "uid=,args=").stdout.splitlines()
        assert [p for p in left if "capkeeper" in p or p.split()[0] == uid] == []
        assert not host.sandbox.path(VENV).exists()  # no byte code left behind either
        assert host.sandbox.path(STATE).exists()  # dpkg -r keeps conffiles

        host.run("dpkg", "--purge", "capkeeper")
        assert host.run("dpkg-query", "-W", "capkeeper", check=False).returncode != 0
        assert not host.sandbox.path(STATE).exists()
        assert not host.sandbox.path(DROPIN).exists()
        assert not host.sandbox.path(os.path.dirname(DROPIN)).exists()
        files = [p for p in package_files if p not in ("/.", "/etc/capkeeper", STATE_D)]
        leftovers = host.run("sh", "-c", PRINT_EXISTING_FILES, "sh", *files).stdout.split()
        assert leftovers == []
        for owned in (VENV, "/usr/libexec/capkeeper", "/usr/share/doc/capkeeper"):
            assert not host.sandbox.path(owned).exists(), owned
        wants = host.run("find", "/etc/systemd/system", "-name", "capkeeper*").stdout
        assert wants == ""
        assert host.sandbox.path(mine).read_text() == "# the admin's own file\n"
        # Debian policy for system users: the account stays (files may still be its).
        assert host.run("getent", "passwd", "capkeeper").returncode == 0


def test_package_build_times_recorded(built: Built) -> None:
    """The session's build times are written to build/packaging-times.txt for the report."""
    text = TIMES.read_text()
    assert "three builds in parallel" in text
    print(text + f"\n.deb: {built.deb.stat().st_size} bytes, .rpm: {built.rpm.stat().st_size}")
