"""capkeeper doctor: each problem found on real mounts, files and systemd units.

Where it matters the kernel is asked too: a copy of grep carrying
cap_net_raw=ep prints its own CapPrm when run with the ``noroot`` securebit
(root then gets only what the file grants), so a test can show that the
capabilities doctor calls ineffective really are. Unit checks run against the
throwaway systemd of ``tests/sandbox.py``.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from capkeeper import diagnose as doctor
from capkeeper.capabilities import parse
from capkeeper.cli import ExitStatus, main
from capkeeper.diagnose import (
    UnitProperties,
    check_declared,
    check_unit,
    parse_unit_properties,
)
from tests.conftest import make_binary, require_tool, setcap
from tests.sandbox import SystemdSandbox
from tests.test_attacks import RACE_RUNS, exchanging
from tests.test_mounts import private_mount_namespace, run

pytest_plugins = ["tests.sandbox_fixture"]

REPO = Path(__file__).resolve().parents[1]
LOADER = "/lib64/ld-linux-x86-64.so.2"
NET_RAW = 1 << 13


def doctor_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """Run capkeeper through main(); return (exit status, stdout, stderr)."""
    out = io.StringIO()
    code = main(["--log-format", "console", *argv], out=out)
    return code, out.getvalue(), capsys.readouterr().err


def make_grep(path: Path) -> Path:
    """A copy of grep: run as ``grep ^CapPrm /proc/self/status`` it shows what it got."""
    shutil.copyfile(shutil.which("grep") or "/bin/grep", path)
    path.chmod(0o755)
    return path


def cap_prm(*argv: str) -> int:
    """CapPrm of ``argv`` (grep printing /proc/self/status) run by root with the noroot
    securebit, so that it holds only what file capabilities grant."""
    setpriv = require_tool("setpriv")
    result = subprocess.run(
        [setpriv, "--securebits", "+noroot", *argv],
        capture_output=True,
        text=True,
        check=True,
    )
    (line,) = [line for line in result.stdout.splitlines() if "CapPrm:" in line]
    return int(line.split("CapPrm:")[1], 16)


def grep_caps(grep: Path) -> tuple[str, ...]:
    return (str(grep), "^CapPrm", "/proc/self/status")


def declare(tree: Path, *entries: tuple[Path, str]) -> Path:
    """Write a state declaring ``(path, caps)`` entries; return its path."""
    state = tree / "state.toml"
    state.write_text("".join(f'[[binary]]\npath = "{p}"\ncaps = "{c}"\n' for p, c in entries))
    return state


def test_nosuid_mount(tree: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A binary on a nosuid bind mount: doctor says so, and the kernel grants nothing."""
    (tree / "bin").mkdir()
    grep = make_grep(tree / "bin" / "ck-grep")
    setcap("cap_net_raw=ep", grep)
    mnt = tree / "mnt"
    mnt.mkdir()
    state = declare(tree, (mnt / "ck-grep", "cap_net_raw=ep"))
    with private_mount_namespace():
        run("mount", "--bind", str(tree / "bin"), str(mnt))
        run("mount", "-o", "remount,bind,nosuid", str(mnt))
        code, out, err = doctor_cli(["--state", str(state), "doctor"], capsys)
        assert cap_prm(*grep_caps(mnt / "ck-grep")) == 0
        assert cap_prm(*grep_caps(grep)) == NET_RAW
    assert out.splitlines() == [
        f"{mnt}/ck-grep: error: the mount {mnt} (ext4) is nosuid: the kernel ignores file "
        "capabilities there",
        f"  fix: remount it with suid (mount -o remount,suid {mnt}), or install the binary on "
        "a mount without nosuid",
        "1 binaries checked: 1 error(s), 0 warning(s)",
    ]
    assert err == ""
    assert code == ExitStatus.DRIFT


def test_read_only_and_noexec_mount(tree: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A read-only, noexec mount: two problems, each with its fix."""
    (tree / "bin").mkdir()
    setcap("cap_net_raw=ep", make_binary(tree / "bin" / "tool"))
    mnt = tree / "mnt"
    mnt.mkdir()
    with private_mount_namespace():
        run("mount", "--bind", str(tree / "bin"), str(mnt))
        run("mount", "-o", "remount,bind,ro,noexec", str(mnt))
        code, out, _ = doctor_cli(["--state", "none.toml", "doctor", str(mnt / "tool")], capsys)
    assert out.splitlines() == [
        f"{mnt}/tool: error: the mount {mnt} (ext4) is noexec: the binary cannot be executed "
        "at all",
        f"  fix: remount it with exec (mount -o remount,exec {mnt}), or install the binary "
        "elsewhere",
        f"{mnt}/tool: warning: the mount {mnt} (ext4) is read-only: capkeeper cannot restore "
        "capabilities there (those present still work)",
        "  fix: set them in the image the file system is built from, or make it writable",
        "1 binaries checked: 1 error(s), 1 warning(s)",
    ]
    assert code == ExitStatus.DRIFT


def test_file_system_without_xattrs(tree: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """On ramfs, which has no extended attributes, no capabilities can be kept."""
    mnt = tree / "ramfs"
    mnt.mkdir()
    with private_mount_namespace():
        run("mount", "-t", "ramfs", "ramfs", str(mnt))
        tool = make_binary(mnt / "tool")
        state = declare(tree, (tool, "cap_net_raw=ep"))
        code, out, _ = doctor_cli(["--state", str(state), "doctor"], capsys)
    assert out.splitlines()[:2] == [
        f"{tool}: error: the file system (ramfs) does not support extended attributes: it "
        "cannot carry file capabilities",
        "  fix: install the binary on ext4, xfs, btrfs or tmpfs",
    ]
    assert code == ExitStatus.DRIFT


def test_script(tree: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A script with capabilities: doctor says the kernel ignores them, and it does."""
    interpreter = make_grep(tree / "ck-grep")
    script = tree / "show-caps"
    script.write_text(f"#!{interpreter} ^CapPrm\n")
    script.chmod(0o755)
    setcap("cap_net_raw=ep", script)
    code, out, _ = doctor_cli(["--state", "none.toml", "doctor", str(script)], capsys)
    assert cap_prm(str(script), "/proc/self/status") == 0
    setcap("cap_net_raw=ep", interpreter)
    assert cap_prm(str(script), "/proc/self/status") == NET_RAW  # the interpreter's count
    assert out.splitlines() == [
        f"{script}: error: is a script (#!{interpreter} ^CapPrm): the kernel ignores file "
        "capabilities "
        "on scripts",
        "  fix: give the service AmbientCapabilities= in its unit, or put the capabilities on "
        "a compiled program",
        "1 binaries checked: 1 error(s), 0 warning(s)",
    ]
    assert code == ExitStatus.DRIFT


def test_setuid_with_capabilities(tree: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """setuid plus file capabilities is reported with its fix."""
    tool = make_binary(tree / "tool", mode=0o4755)
    setcap("cap_net_raw=ep", tool)
    state = declare(tree, (tool, "cap_net_raw=ep"))
    code, out, _ = doctor_cli(["--state", str(state), "doctor", str(tool)], capsys)
    assert out.splitlines() == [
        f"{tool}: warning: is setuid/setgid (mode 4755): for a setuid-root binary the file "
        "capabilities replace root's full set; setuid and file capabilities do not compose",
        f"  fix: use one mechanism: chmod ug-s {tool}, or drop the file capabilities",
        "1 binaries checked: 0 error(s), 1 warning(s)",
    ]
    assert code == ExitStatus.DRIFT


def test_interpreter(tree: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Capabilities on an interpreter reach every script it runs: an error once it has them."""
    python = make_binary(tree / "python3.11")
    setcap("cap_net_raw=ep", python)
    code, out, _ = doctor_cli(["--state", "none.toml", "doctor", str(python)], capsys)
    assert out.splitlines()[:2] == [
        f"{python}: error: runs other code: its name looks like an interpreter; every script it "
        "runs gets these capabilities",
        "  fix: use AmbientCapabilities= in the unit of the one service that needs them, or a "
        f"dedicated compiled program; remove them now: setcap -r {python}",
    ]
    assert code == ExitStatus.DRIFT


def test_capable_loader_and_python_copies(tree: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A loader copy and a python copy carrying capabilities are errors, found by content;
    a loader copy only declared (no capabilities yet) is a warning."""
    loader, python, declared = tree / "myapp", tree / "tool", tree / "later"
    for copy, source in ((loader, LOADER), (python, "/usr/bin/python3.11"), (declared, LOADER)):
        shutil.copyfile(source, copy)
        copy.chmod(0o755)
    setcap("cap_dac_read_search=ep", loader)
    setcap("cap_net_raw=ep", python)
    state = declare(tree, (declared, "cap_net_raw=ep"))
    argv = ["--state", str(state), "doctor", "--json", str(loader), str(python), str(declared)]
    code, out, _ = doctor_cli(argv, capsys)
    found = {
        (r["path"], r["severity"], r["message"])
        for r in map(json.loads, out.splitlines())
        if r["check"] == "interpreter"
    }
    assert found == {
        (
            str(loader),
            "error",
            "runs other code: it is the dynamic loader; every program it runs gets these "
            "capabilities",
        ),
        (
            str(python),
            "error",
            "runs other code: it embeds a Python runtime (exports Py_BytesMain); every script it "
            "runs gets these capabilities",
        ),
        (
            str(declared),
            "warning",
            "runs other code: it is the dynamic loader; every program it runs gets these "
            "capabilities",
        ),
    }
    assert code == ExitStatus.DRIFT


def test_allowed_interpreter_is_only_a_warning(
    tree: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An entry that says allow_interpreter = true keeps the warning, not the error."""
    python = tree / "tool"
    shutil.copyfile("/usr/bin/python3.11", python)
    python.chmod(0o755)
    setcap("cap_net_raw=ep", python)
    state = tree / "state.toml"
    state.write_text(
        f'[[binary]]\npath = "{python}"\ncaps = "cap_net_raw=ep"\nallow_interpreter = true\n'
    )
    code, out, _ = doctor_cli(["--state", str(state), "doctor", "--json"], capsys)
    (found,) = [r for r in map(json.loads, out.splitlines()) if r["check"] == "interpreter"]
    assert found["severity"] == "warning"
    assert "setcap -r" not in found["fix"]
    assert code == ExitStatus.DRIFT


def test_declared_set_problems(tree: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Inheritable nobody holds, and +e beyond a typical bounding set, are warned about."""
    tool = make_binary(tree / "tool")
    state = tree / "state.toml"
    state.write_text(
        f'[[binary]]\npath = "{tool}"\ncaps = "cap_sys_admin,cap_net_raw=eip"\n'
        "allow_inheritable = true\n"
    )
    code, out, _ = doctor_cli(["--state", str(state), "doctor"], capsys)
    assert out.splitlines() == [
        f"{tool}: warning: declares inheritable cap_net_raw, cap_sys_admin: they only reach "
        "a process that already holds them in its inheritable set, and the process that runs "
        "it does not",
        "  fix: drop '+i' (and allow_inheritable) from the declared capabilities",
        f"{tool}: warning: is effective with cap_sys_admin, outside the default bounding set "
        "of container runtimes: where the bounding set lacks one, execve fails with EPERM",
        "  fix: check that every bounding set it runs under has them (doctor --unit), or "
        "declare them without '+e' and raise them in the program",
        "1 binaries checked: 0 error(s), 2 warning(s)",
    ]
    assert code == ExitStatus.DRIFT


def test_clean_and_missing(tree: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A binary with nothing wrong is ok; a missing one cannot be checked."""
    tool = make_binary(tree / "tool")
    setcap("cap_net_raw=p", tool)
    state = declare(tree, (tool, "cap_net_raw=p"), (tree / "gone", "cap_net_raw=p"))
    code, out, _ = doctor_cli(["--state", str(state), "doctor"], capsys)
    assert out.splitlines() == [
        f"{tool}: ok",
        f"{tree}/gone: error: cannot be checked: cannot open: No such file or directory",
        "  fix: install it, or remove its entry from the state",
        "2 binaries checked: 1 error(s), 0 warning(s)",
    ]
    assert code == ExitStatus.DRIFT
    code, out, _ = doctor_cli(["--state", str(state), "doctor", "--json", str(tool)], capsys)
    assert (code, out) == (ExitStatus.OK, "")


SHOW = """\
Id=web.service
LoadState=loaded
NoNewPrivileges=no
CapabilityBoundingSet=cap_net_raw cap_net_admin cap_unknown_future
AmbientCapabilities=
User=
DynamicUser=yes
ExecStart={ path=/usr/bin/web ; argv[]=/usr/bin/web -p 80 ; ignore_errors=no }
SystemCallFilter=~
RestrictAddressFamilies=AF_UNIX AF_INET
RestrictNamespaces=no
ProtectHostname=no
"""


def test_parse_unit_properties() -> None:
    """systemctl show output: sets by name, ExecStart= paths, options implying NNP."""
    unit = parse_unit_properties("web", SHOW)
    assert unit == UnitProperties(
        name="web.service",
        bounding_set=frozenset({12, 13}),
        dynamic_user=True,
        exec_paths=("/usr/bin/web",),
        implying_nnp=("RestrictAddressFamilies",),
    )
    assert not unit.runs_as_root


def test_unit_checks_pure() -> None:
    """Ambient with file caps, root, implied NNP and a masking bounding set, in one unit."""
    unit = UnitProperties(
        name="x.service",
        bounding_set=frozenset({13}),
        ambient=frozenset({10}),
        implying_nnp=("SystemCallFilter",),
    )
    caps = parse("cap_net_raw,cap_net_bind_service=p")
    checks = [p.check for p in check_unit("/x", caps, unit)]
    assert checks == ["bounding-set", "ambient", "user"]  # root: NNP is not implied
    unprivileged = UnitProperties(**{**unit.__dict__, "user": "web"})
    problems = check_unit("/x", caps, unprivileged)
    assert [p.check for p in problems] == ["no-new-privileges", "bounding-set", "ambient"]
    assert problems[0].message == (
        "unit x.service sets SystemCallFilter= which imply NoNewPrivileges=yes for an "
        "unprivileged service: the kernel ignores file capabilities"
    )
    assert problems[1].message == (
        "unit x.service's CapabilityBoundingSet= lacks cap_net_bind_service: the bounding "
        "set masks them, so the process never gets them"
    )
    held = UnitProperties(name="y.service", ambient=frozenset({13}))
    assert check_declared("/x", parse("cap_net_raw=eip"), held) == []


# -- against a real systemd ------------------------------------------------------------


def _install_unit(sandbox: SystemdSandbox, name: str, body: str) -> None:
    sandbox.run("sh", "-c", f"cat > /run/systemd/system/{name}", input=body)
    sandbox.run("systemctl", "daemon-reload")


@pytest.fixture
def in_sandbox(systemd_sandbox: SystemdSandbox, monkeypatch: pytest.MonkeyPatch) -> SystemdSandbox:
    """Point doctor's systemctl at the sandbox's service manager."""
    nsenter = require_tool("nsenter")
    prefix = [nsenter, "-t", str(systemd_sandbox.pid), "-m", "-p", "-u", "-i", "-n", "--"]
    monkeypatch.setattr(doctor, "SYSTEMCTL", (*prefix, "systemctl"))
    return systemd_sandbox


@pytest.mark.sandbox
def test_unit_no_new_privileges(
    in_sandbox: SystemdSandbox, tree: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A unit with NoNewPrivileges=yes: file capabilities are ignored."""
    tool = make_binary(tree / "tool")
    state = declare(tree, (tool, "cap_net_raw=ep"))
    name = f"ck-nnp-{uuid.uuid4().hex[:8]}.service"
    _install_unit(
        in_sandbox,
        name,
        f"[Service]\nExecStart={tool}\nUser=nobody\nNoNewPrivileges=yes\n",
    )
    code, out, err = doctor_cli(["--state", str(state), "doctor", "--unit", name], capsys)
    assert out.splitlines() == [
        f"{tool}: error: unit {name} has NoNewPrivileges=yes: the kernel ignores file "
        "capabilities of every program the service executes",
        f"  fix: set AmbientCapabilities= in {name} instead of file capabilities, or drop "
        "NoNewPrivileges=yes",
        "1 binaries checked: 1 error(s), 0 warning(s)",
    ]
    assert err == ""
    assert code == ExitStatus.DRIFT


@pytest.mark.sandbox
def test_unit_bounding_set_lacks_capability(
    in_sandbox: SystemdSandbox, tree: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A bounding set without the declared capability: with +e, execve fails with EPERM."""
    tool = make_binary(tree / "tool")
    state = declare(tree, (tool, "cap_net_raw,cap_net_admin=ep"))
    name = f"ck-bnd-{uuid.uuid4().hex[:8]}.service"
    _install_unit(
        in_sandbox,
        name,
        f"[Service]\nExecStart={tool}\nUser=nobody\nCapabilityBoundingSet=CAP_NET_ADMIN\n",
    )
    code, out, _ = doctor_cli(["--state", str(state), "doctor", "--unit", name, str(tool)], capsys)
    assert out.splitlines() == [
        f"{tool}: error: unit {name}'s CapabilityBoundingSet= lacks cap_net_raw: with the "
        "effective bit set, execve fails with EPERM",
        f"  fix: add cap_net_raw to CapabilityBoundingSet= in {name}",
        "1 binaries checked: 1 error(s), 0 warning(s)",
    ]
    assert code == ExitStatus.DRIFT


@pytest.mark.sandbox
def test_unknown_unit_cannot_be_checked(
    in_sandbox: SystemdSandbox, capsys: pytest.CaptureFixture[str]
) -> None:
    """A unit the manager does not know exits 2 with the reason on stderr."""
    code, out, err = doctor_cli(
        ["--state", "none.toml", "doctor", "--unit", "ck-no-such.service", "/bin/true"], capsys
    )
    assert out.splitlines()[-1] == "1 binaries checked: 0 error(s), 1 warning(s)"
    assert err == (
        "capkeeper: doctor: unit ck-no-such.service is not-found "
        "(hint: check the unit name with 'systemctl status')\n"
    )
    assert code == ExitStatus.FAILED


def _capkeeper_inside(sandbox: SystemdSandbox, *argv: str) -> subprocess.CompletedProcess[str]:
    return sandbox.run(
        sys.executable, "-I", "-c",
        f"import sys; sys.path.insert(0, {str(REPO)!r}); from capkeeper.cli import main; "
        "sys.exit(main())",
        "--log-format", "console", *argv,
        check=False,
    )  # fmt: skip


UNIT_CASES = [
    # (unit settings, doctor checks that are errors, CapPrm the kernel grants or None: EPERM)
    ("User=nobody\n", [], NET_RAW),
    ("User=nobody\nNoNewPrivileges=yes\n", ["no-new-privileges"], 0),
    ("User=nobody\nSystemCallFilter=@system-service\n", ["no-new-privileges"], 0),
    ("User=nobody\nProtectKernelTunables=yes\n", ["no-new-privileges"], 0),
    ("User=nobody\nCapabilityBoundingSet=CAP_NET_ADMIN\n", ["bounding-set"], None),
]


@pytest.mark.sandbox
@pytest.mark.parametrize(("settings", "errors", "granted"), UNIT_CASES)
def test_doctor_agrees_with_the_kernel(
    systemd_sandbox: SystemdSandbox, settings: str, errors: list[str], granted: int | None
) -> None:
    """Inside the sandbox: doctor reports an error exactly when the service gets nothing."""
    sandbox = systemd_sandbox
    grep = f"/usr/local/lib/capkeeper-test/ck-grep-{uuid.uuid4().hex[:8]}"
    sandbox.install_file(shutil.which("grep") or "/bin/grep", grep, mode=0o755)
    sandbox.run("setcap", "cap_net_raw=ep", grep)
    name = f"ck-kernel-{uuid.uuid4().hex[:8]}.service"
    _install_unit(
        sandbox,
        name,
        f"[Service]\nType=oneshot\nExecStart={grep} ^CapPrm /proc/self/status\n{settings}",
    )
    result = _capkeeper_inside(sandbox, "--state", "/nonexistent.toml", "doctor", "--json",
                               "--unit", name)  # fmt: skip
    problems = [json.loads(line) for line in result.stdout.splitlines()]
    assert [p["check"] for p in problems if p["severity"] == "error"] == errors
    started = sandbox.run("systemctl", "start", name, check=False)
    if granted is None:
        assert started.returncode != 0
        status = sandbox.run("systemctl", "show", name, "-p", "ExecMainStatus").stdout
        assert status.strip() == "ExecMainStatus=203"  # EXIT_EXEC: execve failed
    else:
        assert started.returncode == 0, started.stderr
        lines = [str(e["MESSAGE"]) for e in sandbox.journal(f"_SYSTEMD_UNIT={name}")]
        assert lines == [f"CapPrm:\t{granted:016x}"]


@pytest.mark.sandbox
def test_apply_unit_in_exec_start_pre(systemd_sandbox: SystemdSandbox) -> None:
    """ExecStartPre=+capkeeper apply --unit warns in the journal and lets the service start."""
    sandbox = systemd_sandbox
    tag = uuid.uuid4().hex[:8]
    grep = f"/usr/local/lib/capkeeper-test/ck-pre-{tag}"
    sandbox.install_file(shutil.which("grep") or "/bin/grep", grep, mode=0o755)
    state = f"/etc/capkeeper-test-{tag}/state.toml"
    sandbox.run("install", "-D", "-m", "644", "/dev/stdin", state,
                input=f'[[binary]]\npath = "{grep}"\ncaps = "cap_net_raw=ep"\n')  # fmt: skip
    name = f"ck-pre-{tag}.service"
    pre = (
        f'+{sys.executable} -I -c \'import sys; sys.path.insert(0, "{REPO}"); '
        "from capkeeper.cli import main; sys.exit(main())' "
        f"apply --unit %n --state {state}"
    )
    _install_unit(
        sandbox,
        name,
        "[Service]\nType=oneshot\nUser=nobody\nNoNewPrivileges=yes\n"
        f"ExecStartPre={pre}\nExecStart={grep} ^CapPrm /proc/self/status\n",
    )
    sandbox.run("systemctl", "start", name)
    messages = [str(e["MESSAGE"]) for e in sandbox.journal(f"_SYSTEMD_UNIT={name}")]
    assert (
        f"warning   {grep}  unit {name} has NoNewPrivileges=yes: the kernel ignores file "
        "capabilities of every program the service executes (fix: set AmbientCapabilities= "
        f"in {name} instead of file capabilities, or drop NoNewPrivileges=yes)"
    ) in messages
    assert f"restored  {grep}  found none, expected cap_net_raw=ep" in messages
    assert "CapPrm:\t0000000000000000" in messages
    events = sandbox.journal(f"_SYSTEMD_UNIT={name}", "CAPKEEPER_EVENT=capability_ineffective")
    assert [(e["CAPKEEPER_CHECK"], e["CAPKEEPER_PATH"]) for e in events] == [
        ("no-new-privileges", grep)
    ]
    assert sandbox.run("getcap", grep).stdout.split() == [grep, "cap_net_raw=ep"]


def test_binary_in_a_directory_others_can_write(
    tree: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A declared binary in a sticky world-writable directory: a warning naming the
    directory (anyone can flood it with events), and no change of the exit status."""
    public = tree / "public"
    public.mkdir()
    public.chmod(0o1777)
    tool = make_binary(public / "tool")
    setcap("cap_net_raw=ep", tool)
    state = declare(tree, (tool, "cap_net_raw=ep"))
    code, out, _ = doctor_cli(["--state", str(state), "doctor"], capsys)
    assert out.splitlines() == [
        f"{tool}: warning: its directory {public} can be written by users other than root: "
        "any of them can flood it with file events, and restores there then wait for a rescan",
        "  fix: keep binaries with capabilities in a directory only root can write",
        "1 binaries checked: 0 error(s), 1 warning(s)",
    ]
    assert code == ExitStatus.OK
    public.chmod(0o755)
    code, out, _ = doctor_cli(["--state", str(state), "doctor"], capsys)
    assert out.splitlines()[0] == f"{tool}: ok"


def test_gather_reads_the_mount_through_the_observed_descriptor(tree: Path) -> None:
    """The mount doctor reports is the mount of the very file it observed. Two directories
    are swapped in a loop (renameat2 RENAME_EXCHANGE): one holds a nosuid tmpfs with a
    tool, the other a tool on the parent file system. Looking the mount up again by
    path (as gather did) could name the other one: doctor would then call a binary on a
    nosuid mount fine, or the reverse."""
    x, y = tree / "x", tree / "y"
    (x / "m").mkdir(parents=True)
    (y / "m").mkdir(parents=True)
    with private_mount_namespace():
        run("mount", "-t", "tmpfs", "-o", "nosuid,mode=0755", "tmpfs", str(x / "m"))
        nosuid_dev = make_binary(x / "m" / "tool").stat().st_dev
        make_binary(y / "m" / "tool")
        wrong: list[tuple[bool, bool]] = []
        with exchanging(x, y, attacker=False):
            for _ in range(RACE_RUNS):
                facts = doctor.gather(str(x / "m" / "tool"))
                if facts.observation is None or facts.mount is None:
                    continue  # replaced while opening: nothing reported, nothing wrong
                on_nosuid = facts.observation.dev == nosuid_dev
                if facts.mount.nosuid != on_nosuid:
                    wrong.append((on_nosuid, facts.mount.nosuid))
    assert wrong == []


def test_declared_binary_the_trust_policy_refuses_is_an_error(
    tree: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A declared binary in a directory another user owns: apply refuses it (that user
    can swap in anything), so doctor must not call it "ok"; it reports the refusal as
    validate does, and a refusal doctor explains itself (setuid here) only once."""
    owned = tree / "home"
    owned.mkdir(mode=0o755)
    os.chown(owned, 4242, 4242)
    tool = make_binary(owned / "tool")
    state = declare(tree, (tool, "cap_net_raw=ep"))
    code, out, _ = doctor_cli(["--state", str(state), "doctor"], capsys)
    assert out.splitlines() == [
        f"{tool}: error: capkeeper refuses it: directory {owned} is owned by uid 4242, not by root",
        "  fix: whoever owns a directory can replace the binary inside it",
        "1 binaries checked: 1 error(s), 0 warning(s)",
    ]
    assert code == ExitStatus.DRIFT
    os.chown(owned, 0, 0)
    tool.chmod(0o4755)
    code, out, _ = doctor_cli(["--state", str(state), "doctor", str(tool)], capsys)
    assert [line.split(": ")[1] for line in out.splitlines()[:-1:2]] == ["warning"]
