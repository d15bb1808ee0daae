"""The CLI end to end: run main(argv), assert stdout, stderr and the exit status."""

from __future__ import annotations

import ast
import contextlib
import importlib
import io
import json
import os
import subprocess
import sys
from itertools import chain
from pathlib import Path

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from capkeeper.cli import COMMANDS, ExitStatus, build_parser, main, parse_args, quick_args
from capkeeper.commands import GLOBAL_ARGUMENTS, Arguments, command_module
from capkeeper.errors import UsageError
from capkeeper.parser import parse
from tests.conftest import getcap, make_binary, setcap
from tests.test_mounts import private_mount_namespace
from tests.test_mounts import run as mount_command


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    out = io.StringIO()
    code = main(["--log-format", "console", *argv], out=out)
    return code, out.getvalue(), capsys.readouterr().err


@pytest.fixture
def state(tree: Path) -> Path:
    make_binary(tree / "web")
    make_binary(tree / "ping")
    setcap("cap_net_raw=ep", tree / "ping")
    main_file = tree / "state.toml"
    main_file.write_text(
        f'[[binary]]\npath = "{tree}/web"\ncaps = "cap_net_bind_service=+ep"\n'
        f'[[binary]]\npath = "{tree}/ping"\ncaps = "cap_net_raw=ep"\n'
    )
    return main_file


def test_check_reports_drift_without_changing(
    state: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """check prints one line per entry and exits DRIFT, leaving files alone."""
    tree = state.parent
    code, out, err = run(["check", "--state", str(state)], capsys)
    assert code == ExitStatus.DRIFT
    assert out.splitlines() == [
        f"drift     {tree}/web  found none, expected cap_net_bind_service=ep",
        f"in-sync   {tree}/ping  cap_net_raw=ep",
        "2 declared: 1 drift, 1 in-sync",
    ]
    assert err == ""
    assert getcap(tree / "web") == ""


def test_apply_then_check_in_sync(state: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """apply restores and exits 0; a following check exits 0."""
    tree = state.parent
    code, out, _ = run(["apply", "--state", str(state)], capsys)
    assert code == ExitStatus.OK
    assert out.splitlines()[0] == (
        f"restored  {tree}/web  found none, expected cap_net_bind_service=ep"
    )
    assert getcap(tree / "web") == "cap_net_bind_service=ep"
    code, out, _ = run(["check", "--state", str(state)], capsys)
    assert code == ExitStatus.OK
    assert out.splitlines()[-1] == "2 declared: 2 in-sync"


def test_check_json(state: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """check --json prints one JSON object per entry."""
    tree = state.parent
    code, out, _ = run(["check", "--json", "--state", str(state)], capsys)
    assert code == ExitStatus.DRIFT
    assert [json.loads(line) for line in out.splitlines()] == [
        {"path": f"{tree}/web", "expected": "cap_net_bind_service=ep", "found": "none",
         "status": "drift"},
        {"path": f"{tree}/ping", "expected": "cap_net_raw=ep", "found": "cap_net_raw=ep",
         "status": "in-sync"},
    ]  # fmt: skip


def test_apply_named_path_only(state: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """apply PATH touches only that declared binary."""
    tree = state.parent
    code, out, _ = run(["apply", "--state", str(state), str(tree / "ping")], capsys)
    assert code == ExitStatus.OK
    assert out.splitlines() == [f"in-sync   {tree}/ping  cap_net_raw=ep", "1 declared: 1 in-sync"]
    assert getcap(tree / "web") == ""


def test_apply_undeclared_path_is_usage_error(
    state: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Naming a path the state does not declare is an error."""
    code, out, err = run(["apply", "--state", str(state), "/usr/bin/other"], capsys)
    assert code == ExitStatus.USAGE
    assert out == ""
    assert err == (
        "capkeeper: error: not declared in the state: /usr/bin/other "
        "(hint: add a [[binary]] table for it, or check the path)\n"
    )


def test_one_refusal_does_not_stop_the_others(
    state: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A refused entry fails the run but the other entries are still applied."""
    tree = state.parent
    make_binary(tree / "bad", mode=0o777)
    with state.open("a") as f:
        f.write(f'[[binary]]\npath = "{tree}/bad"\ncaps = "cap_chown=p"\n')
    code, out, _ = run(["apply", "--state", str(state)], capsys)
    assert code == ExitStatus.FAILED
    assert out.splitlines() == [
        f"restored  {tree}/web  found none, expected cap_net_bind_service=ep",
        f"in-sync   {tree}/ping  cap_net_raw=ep",
        f"refused   {tree}/bad  {tree}/bad is writable by group and others (mode 0777) "
        f"(hint: chmod go-w {tree}/bad)",
        "3 declared: 1 restored, 1 in-sync, 1 refused",
    ]
    assert getcap(tree / "web") == "cap_net_bind_service=ep"
    assert getcap(tree / "bad") == ""


def test_bad_state_file_lists_every_problem(tree: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An invalid state exits CONFIG and prints every problem."""
    bad = tree / "state.toml"
    bad.write_text(
        '[[binary]]\npath = "bin/x"\ncaps = "cap_net_raw+ep"\n'
        '[[binary]]\npath = "/x"\ncaps = "cap_net_raw+EP"\nextra = 1\n'
    )
    for command in ("apply", "check", "validate"):
        code, out, err = run([command, "--state", str(bad)], capsys)
        assert code == ExitStatus.CONFIG
        assert out == ""
        assert err == (
            "capkeeper: 3 problems in the state:\n"
            "  state.toml: entry 1 (bin/x): path: must be an absolute path, got 'bin/x'\n"
            "  state.toml: entry 2 (/x): extra: unknown key\n"
            "  state.toml: entry 2 (/x): caps: unknown flag 'E' after '+' "
            "(flags are lower-case e, i, p) (clause 1: 'cap_net_raw+EP')\n"
        )


def test_missing_state_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A missing state file is a clear error, not a traceback."""
    code, _, err = run(["check", "--state", str(tmp_path / "none.toml")], capsys)
    assert code == ExitStatus.CONFIG
    assert err == (
        "capkeeper: 1 problem in the state:\n"
        f"  {tmp_path}/none.toml: not found "
        "(create it, or point --state / CAPKEEPER_STATE at another file)\n"
    )


@pytest.mark.parametrize(
    "text",
    [
        "x = " + "[" * 3000 + "]" * 3000 + "\n",
        '[[binary]]\npath = "/x"\ncaps = "cap_chown=p"\nowner = "\u00b2"\n',
        '[[binary]]\npath = "/x"\ncaps = "cap_chown=p"\nowner = "\u0661\u0662"\n',
    ],
    ids=["nested-3000-deep", "owner-superscript-2", "owner-arabic-12"],
)
def test_state_the_parser_chokes_on_is_an_invalid_state(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str
) -> None:
    """A state nested deeper than tomllib can recurse, or an owner in non-ASCII digits, is
    an invalid state (exit 78, listed as a problem); before, the first two were an
    ``internal error`` (RecursionError, ValueError; exit 2) and the third was uid 12."""
    state = tmp_path / "state.toml"
    state.write_text(text)
    code, _, err = run(["validate", "--state", str(state)], capsys)
    assert "internal error" not in err, err
    assert code == ExitStatus.CONFIG, err
    assert err.startswith("capkeeper: 1 problem in the state:\n  state.toml: "), err


def test_empty_state_path_is_an_error(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An empty --state (exit 64) or CAPKEEPER_STATE (exit 78), such as an unset variable
    expanded in a unit file, is an error: it used to mean the default state silently."""
    for argv in (["--state", "", "check"], ["check", "--state", ""]):
        code, _, err = run(argv, capsys)
        assert code == ExitStatus.USAGE
        assert err == "capkeeper: error: --state: empty path (name the state file)\n"
    monkeypatch.setenv("CAPKEEPER_STATE", "")
    code, _, err = run(["check"], capsys)
    assert code == ExitStatus.CONFIG
    assert err == (
        "capkeeper: error: invalid setting: CAPKEEPER_STATE: must not be empty (name the "
        "state file, or unset it)\n"
    )


def test_relative_state_from_a_removed_working_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A relative --state needs the working directory: once it is removed, that is an
    invalid state with a sentence saying so (it was "[Errno 2]", exit 2)."""
    gone = tmp_path / "gone"
    gone.mkdir()
    monkeypatch.chdir(gone)
    gone.rmdir()
    code, _, err = run(["validate", "--state", "state.toml"], capsys)
    assert code == ExitStatus.CONFIG
    assert err == (
        "capkeeper: 1 problem in the state:\n  state.toml: a relative state path is read from "
        "the working directory, which is gone (No such file or directory): give an absolute "
        "path\n"
    )


def test_state_from_environment(
    state: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """CAPKEEPER_STATE points at the state when --state is not given."""
    monkeypatch.setenv("CAPKEEPER_STATE", str(state))
    code, out, _ = run(["check"], capsys)
    assert code == ExitStatus.DRIFT
    assert out.splitlines()[-1] == "2 declared: 1 drift, 1 in-sync"


def test_invalid_environment_setting(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A malformed CAPKEEPER_* setting is reported, not a traceback."""
    monkeypatch.setenv("CAPKEEPER_RESCAN_INTERVAL", "soon")
    code, _, err = run(["check"], capsys)
    assert code == ExitStatus.CONFIG
    assert err.startswith("capkeeper: error: invalid setting: CAPKEEPER_RESCAN_INTERVAL: ")


def test_show_matches_getcap(state: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """show prints exactly what getcap prints, including nothing for a file without caps."""
    tree = state.parent
    setcap("cap_chown,cap_kill=eip cap_net_raw+ep", tree / "web")
    paths = [str(tree / "web"), str(tree / "ping"), str(state)]
    import subprocess

    expected = subprocess.run(["getcap", *paths], capture_output=True, text=True, check=True).stdout
    code, out, _ = run(["show", *paths], capsys)
    assert code == ExitStatus.OK
    assert out == expected
    assert out == f"{tree}/web cap_chown,cap_kill=eip cap_net_raw+ep\n{tree}/ping cap_net_raw=ep\n"


def test_show_verbose_and_json(tree: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """show -v adds revision and rootid; --json gives the decoded value."""
    binary = make_binary(tree / "ns")
    import subprocess

    subprocess.run(["setcap", "-n", "1000", "cap_net_raw+ep", str(binary)], check=True)
    plain = make_binary(tree / "plain")
    code, out, _ = run(["show", "-v", str(binary), str(plain)], capsys)
    assert code == ExitStatus.OK
    assert out == f"{binary} cap_net_raw=ep [v3 rootid=1000]\n{plain} (no capabilities)\n"
    code, out, _ = run(["show", "--json", str(binary)], capsys)
    assert json.loads(out) == {
        "path": str(binary), "caps": "cap_net_raw=ep", "revision": 3, "rootid": 1000,
        "effective": True, "permitted": 1 << 13, "inheritable": 0,
    }  # fmt: skip


def test_show_missing_file(capsys: pytest.CaptureFixture[str]) -> None:
    """show on a missing file reports it on stderr and exits FAILED."""
    code, out, err = run(["show", "/nonexistent/file"], capsys)
    assert code == ExitStatus.FAILED
    assert out == ""
    assert err == (
        "capkeeper: /nonexistent/file: cannot get capabilities: No such file or directory "
        "(hint: the file does not exist)\n"
    )


def test_validate_reports_trust_problems(state: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """validate lists trust problems of declared files and notes missing ones."""
    tree = state.parent
    make_binary(tree / "gw", mode=0o775)
    with state.open("a") as f:
        f.write(
            f'[[binary]]\npath = "{tree}/gw"\ncaps = "cap_chown=p"\n'
            f'[[binary]]\npath = "{tree}/later"\ncaps = "cap_chown=p"\n'
        )
    code, out, _ = run(["validate", "--state", str(state)], capsys)
    assert code == ExitStatus.FAILED
    assert out.splitlines() == [
        f"state.toml: entry 3 ({tree}/gw): {tree}/gw is writable by group (mode 0775) "
        f"(hint: chmod go-w {tree}/gw)",
        f"state.toml: entry 4 ({tree}/later): note: not present yet (enforced when it appears)",
        f"4 declared binaries in {state}: 1 problem(s)",
    ]


def test_validate_clean(state: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """validate on a good state exits 0."""
    code, out, _ = run(["validate", "--state", str(state)], capsys)
    assert code == ExitStatus.OK
    assert out == f"2 declared binaries in {state}: no problems\n"


def test_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    """Unknown commands and options exit USAGE with a message, no traceback."""
    code, _, err = run(["frobnicate"], capsys)
    assert code == ExitStatus.USAGE
    assert err.startswith("capkeeper: error: argument COMMAND: invalid choice: 'frobnicate'")
    code, _, err = run(["show"], capsys)
    assert code == ExitStatus.USAGE
    assert "the following arguments are required: PATH" in err


def test_exit_status_values() -> None:
    """Exit codes are stable: scripts depend on them."""
    assert {s.name: int(s) for s in ExitStatus} == {
        "OK": 0, "DRIFT": 1, "FAILED": 2, "USAGE": 64, "CONFIG": 78, "INTERRUPTED": 130,
    }  # fmt: skip


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    """--version prints the version."""
    assert main(["--version"]) == 0
    assert capsys.readouterr().out == "capkeeper 0.1.0\n"


def test_python_dash_m(state: Path) -> None:
    """python -m capkeeper runs the same CLI."""
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "capkeeper", "--log-format", "json", "check", "--state", str(state)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert result.returncode == 1
    assert result.stdout.splitlines()[-1] == "2 declared: 1 drift, 1 in-sync"


def test_validate_reports_two_paths_for_one_file(
    state: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two declared paths naming the same file with different caps are a problem."""
    tree = state.parent
    (tree / "web-link").symlink_to("web")
    with state.open("a") as f:
        f.write(f'[[binary]]\npath = "{tree}/web-link"\ncaps = "cap_net_raw=ep"\n')
    code, out, _ = run(["validate", "--state", str(state)], capsys)
    assert code == ExitStatus.FAILED
    assert out.splitlines() == [
        f"state.toml: entry 1 ({tree}/web): is the same file as {tree}/web-link "
        "(cap_net_raw=ep) but declares cap_net_bind_service=ep; declare one set for it",
        f"3 declared binaries in {state}: 1 problem(s)",
    ]


def test_validate_warns_about_non_root_owner(
    tree: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A declared non-root owner is allowed but its consequence is spelled out."""
    binary = make_binary(tree / "app")
    os.chown(binary, 65534, 65534)
    state = tree / "state.toml"
    state.write_text(f'[[binary]]\npath = "{binary}"\ncaps = "cap_net_raw=ep"\nowner = "nobody"\n')
    code, out, _ = run(["validate", "--state", str(state)], capsys)
    assert code == ExitStatus.OK
    assert out.splitlines() == [
        f"state.toml: entry 1 ({binary}): warning: owner nobody can rewrite this binary through "
        "a shared mmap without losing its capabilities: that user effectively holds "
        "cap_net_raw=ep",
        f"1 declared binaries in {state}: no problems",
    ]


def test_file_system_without_xattrs_is_a_failure_not_drift(
    tree: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """On ramfs (no extended attributes at all) check and apply fail saying why, and
    validate counts it as a problem, instead of 'drift' and 'no problems'."""
    mnt = tree / "ram"
    mnt.mkdir()
    why = (
        f"{mnt}/tool: the file system does not support extended attributes, so it cannot "
        "keep security.capability (hint: keep managed binaries on ext4, xfs, btrfs or tmpfs)"
    )
    with private_mount_namespace():
        mount_command("mount", "-t", "ramfs", "-o", "mode=0755", "ramfs", str(mnt))
        tool = make_binary(mnt / "tool")
        state = tree / "state.toml"
        state.write_text(f'[[binary]]\npath = "{tool}"\ncaps = "cap_net_raw=ep"\n')
        checked = run(["check", "--state", str(state)], capsys)
        applied = run(["apply", "--state", str(state)], capsys)
        validated = run(["validate", "--state", str(state)], capsys)
    for code, out, _ in (checked, applied):
        assert code == ExitStatus.FAILED
        assert why in out.splitlines()[0]
        assert out.splitlines()[-1] == "1 declared: 1 failed"
    code, out, _ = validated
    assert code == ExitStatus.FAILED
    assert out.splitlines() == [
        f"state.toml: entry 1 ({tool}): {why}",
        f"1 declared binaries in {state}: 1 problem(s)",
    ]


def test_validate_warns_about_a_directory_others_can_write(
    tree: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A binary in a sticky world-writable directory is trusted, with a warning that names
    the directory: any user can flood it with file events. The exit status stays 0."""
    public = tree / "public"
    public.mkdir()
    public.chmod(0o1777)
    binary = make_binary(public / "app")
    state = tree / "state.toml"
    state.write_text(f'[[binary]]\npath = "{binary}"\ncaps = "cap_net_raw=ep"\n')
    code, out, _ = run(["validate", "--state", str(state)], capsys)
    assert out.splitlines() == [
        f"state.toml: entry 1 ({binary}): warning: its directory {public} can be written by "
        "users other than root: any of them can flood it with file events, and restores there "
        "then wait for a rescan (keep binaries with capabilities in a directory only root can "
        "write)",
        f"1 declared binaries in {state}: no problems",
    ]
    assert code == ExitStatus.OK


def test_extra_capabilities_are_flagged_as_tampering(
    state: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """check and apply flag a binary carrying more than declared as possible tampering
    (the verdict of reconcile.event_for), and a missing capability as plain drift."""
    tree = state.parent
    setcap("cap_net_raw,cap_sys_admin=ep", tree / "ping")
    code, out, _ = run(["check", "--state", str(state)], capsys)
    assert code == ExitStatus.DRIFT
    assert out.splitlines()[:2] == [
        f"drift     {tree}/web  found none, expected cap_net_bind_service=ep",
        f"drift     {tree}/ping  found cap_net_raw,cap_sys_admin=ep, expected cap_net_raw=ep "
        "(possible tampering: extra capabilities)",
    ]
    code, out, _ = run(["apply", "--state", str(state), str(tree / "ping")], capsys)
    assert code == ExitStatus.OK
    assert out.splitlines()[0] == (
        f"restored  {tree}/ping  found cap_net_raw,cap_sys_admin=ep, expected cap_net_raw=ep "
        "(possible tampering: extra capabilities)"
    )


def _capkeeper(
    *argv: str, env: dict[str, str] | None = None, flags: tuple[str, ...] = ()
) -> subprocess.CompletedProcess[str]:
    """``python [flags] -m capkeeper ARGV`` in a subprocess, as the command line runs it."""
    return subprocess.run(
        [sys.executable, *flags, "-m", "capkeeper", *argv],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        check=False,
        timeout=120,
    )


def test_invalid_log_level_from_the_environment(state: Path) -> None:
    """CAPKEEPER_LOG_LEVEL=bogus is one line on stderr and exit 78, as every invalid setting
    (it was "internal error: KeyError: 'BOGUS'", exit 2); an upper-case level is valid."""
    result = _capkeeper("check", "--state", str(state), env={"CAPKEEPER_LOG_LEVEL": "bogus"})
    assert result.returncode == ExitStatus.CONFIG
    assert result.stdout == ""
    assert result.stderr == (
        "capkeeper: error: invalid setting: CAPKEEPER_LOG_LEVEL: must be one of debug, info, "
        "warning, error, critical, got 'bogus'\n"
    )
    result = _capkeeper("check", "--state", str(state), env={"CAPKEEPER_LOG_LEVEL": "WARNING"})
    assert result.returncode == ExitStatus.DRIFT, result.stderr


def _importers(importtime: str) -> dict[str, list[str]]:
    """From ``python -X importtime`` output: each module imported, with the chain of
    modules that imported it (innermost first). A module is listed after the modules it
    imports, one indentation level deeper than its importer."""
    rows = []
    for line in importtime.splitlines():
        if not line.startswith("import time:") or line.endswith("| imported package"):
            continue
        name = line.split("|")[2]
        rows.append((len(name) - len(name.lstrip()), name.strip()))
    chains: dict[str, list[str]] = {}
    for i, (depth, name) in enumerate(rows):
        chain, want = [], depth
        for outer_depth, outer in rows[i + 1 :]:
            if outer_depth < want:
                chain.append(outer)
                want = outer_depth
        chains[name] = chain
    return chains


# What a one-shot apply must never pay for: the daemon's inotify, audit, adopt and
# doctor (and, through them, importlib.metadata for the version).
NOT_FOR_APPLY = (
    "pyinotify",
    "capkeeper.daemon",
    "capkeeper.watcher",
    "capkeeper.audit",
    "capkeeper.adopt",
    "capkeeper.doctor",
    "capkeeper.commands.check",
    "capkeeper.commands.watch",
)


def test_apply_imports_only_what_it_needs(tree: Path) -> None:
    """``capkeeper apply --state S PATH`` (ExecStartPre=) imports neither the daemon nor
    pyinotify nor another command's module, nor importlib.metadata (--version only)."""
    binary = make_binary(tree / "tool")
    setcap("cap_net_raw=ep", binary)
    state = tree / "state.toml"
    state.write_text(f'[[binary]]\npath = "{binary}"\ncaps = "cap_net_raw=ep"\n')
    result = _capkeeper("apply", "--state", str(state), str(binary), flags=("-X", "importtime"))
    assert result.returncode == ExitStatus.OK, result.stderr
    assert result.stdout == f"in-sync   {binary}  cap_net_raw=ep\n1 declared: 1 in-sync\n"
    importers = _importers(result.stderr)
    # The parse read the right output (importlib.import_module, cli's way of importing
    # the command's module, is not itself timed: its imports show at the top level).
    assert "capkeeper.commands._entries" in importers
    assert [m for m in NOT_FOR_APPLY if m in importers] == []
    assert "importlib.metadata" not in importers


@pytest.mark.parametrize(
    ("argv", "command_modules"),
    [
        (["--help"], []),
        (["show", "--help"], ["capkeeper.commands.show"]),
        (["--state", "x", "--debug", "validate", "--help"], ["capkeeper.commands.validate"]),
        (["frobnicate"], []),
    ],
)
def test_only_the_chosen_command_is_imported(argv: list[str], command_modules: list[str]) -> None:
    """``capkeeper --help`` lists every command from the registry without importing one;
    ``capkeeper CMD --help`` imports CMD's module only."""
    modules = sorted({info.module for info in COMMANDS.values()})
    script = (
        "import os, sys\n"
        "from capkeeper.cli import main\n"
        "code = main(sys.argv[1:])\n"
        "for module in os.environ['COMMAND_MODULES'].split():\n"
        "    if module in sys.modules:\n"
        "        print(module, file=sys.stderr)\n"
        "sys.exit(code)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, *argv],
        capture_output=True,
        text=True,
        env={**os.environ, "COMMAND_MODULES": " ".join(modules)},
        check=False,
        timeout=120,
    )
    assert result.returncode == (ExitStatus.USAGE if argv == ["frobnicate"] else ExitStatus.OK)
    imported = [line for line in result.stderr.splitlines() if line in modules]
    assert imported == command_modules
    if argv == ["--help"]:
        listed = " ".join(result.stdout.split())
        for name, info in COMMANDS.items():
            assert f" {name} {info.help} " in listed, name


@pytest.mark.parametrize(
    "argv",
    [
        ["check", "--state", "s"],
        ["--state", "check", "apply", "p"],
        ["--state=apply", "check"],
        ["--stat", "watch", "--debug", "check", "--json"],
        ["--log-format", "json", "--log-level", "debug", "show", "-v", "x"],
        ["--debug", "systemd-dropin", "--check", "--output", "-"],
        ["watch", "--settle-time", "1", "--status-file", "s", "--state", "t"],
        ["audit", "--state", "s", "/usr"],
    ],
)
def test_parse_args_agrees_with_the_full_parser(argv: list[str]) -> None:
    """Parsing with only the chosen command's options gives what the full parser gives,
    even when a global option's value is a command name."""
    assert parse_args(argv) == build_parser().parse_args(argv)


def test_command_modules_follow_the_registry() -> None:
    """Every registered command's module has the interface cli uses, and its HELP is the
    registry's (the one line ``capkeeper --help`` shows without importing it)."""
    for name, info in COMMANDS.items():
        module = importlib.import_module(info.module)
        assert info.help == module.HELP, name
        assert isinstance(module.DESCRIPTION, str), name
        assert callable(module.add_arguments), name
        assert callable(module.run), name


def test_exit_numbers_in_help_come_from_exit_status(capsys: pytest.CaptureFixture[str]) -> None:
    """A help text that names an exit status names the number ExitStatus gives it."""
    assert main(["systemd-dropin", "--help"]) == ExitStatus.OK
    help_text = " ".join(capsys.readouterr().out.split())
    assert f"exit {int(ExitStatus.DRIFT)} when the drop-in is missing or out of date" in help_text


def test_version_is_the_installed_distribution_s() -> None:
    """capkeeper.__version__ (a constant, read without importlib.metadata) is the version
    pyproject.toml names, and the one the installed distribution carries."""
    import tomllib
    from importlib import metadata

    import capkeeper

    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    named = tomllib.loads(pyproject.read_text())["project"]["version"]
    assert capkeeper.__version__ == named == metadata.version("capkeeper")


@pytest.mark.parametrize(
    ("given", "expected"), [("/var/tmp/ck-cache", "/var/tmp/ck-cache"), ("", None)]
)
def test_watch_takes_its_cache_directory_as_an_option(given: str, expected: str | None) -> None:
    """``watch --cache-directory`` (empty: no cache) is an option like the others: the
    settings come from the rules alone, with no pydantic-settings child left to wait for."""
    from capkeeper import settings as settings_module
    from capkeeper.cli import _overrides

    args = parse_args(["watch", "--cache-directory", given])
    loaded = settings_module.load_settings(_overrides(args), environ={}, isolate=True)
    assert loaded.cache_directory == expected
    assert settings_module._pending is None


def test_watch_refuses_a_relative_cache_directory(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["watch", "--cache-directory", "cache"]) == ExitStatus.USAGE
    assert "--cache-directory: must be an absolute path" in capsys.readouterr().err


def _blocked(argv: list[str], *, when: str) -> list[str]:
    """The signals blocked in a fresh interpreter that runs ``capkeeper.__main__.entry()``
    on ``argv``, whose mask is empty at the start: ``when`` "main" is called (here it
    only looks), or "after" entry() returned."""
    report = "print(sorted(s.name for s in signal.pthread_sigmask(signal.SIG_BLOCK, [])))"
    script = (
        "import signal, sys\n"
        "import capkeeper.cli\n"
        "assert not signal.pthread_sigmask(signal.SIG_BLOCK, [])\n"
        f"def look(*args, **kwargs):\n    {report}\n    return 0\n"
        f"{'capkeeper.cli.main = look' if when == 'main' else ''}\n"
        "from capkeeper.__main__ import entry\n"
        "entry()\n"
        f"{report if when == 'after' else ''}\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, *argv], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    return list(ast.literal_eval(result.stdout))


@pytest.mark.parametrize(
    ("argv", "blocked"),
    [
        (["watch"], ["SIGHUP", "SIGINT", "SIGTERM"]),
        (["--state", "/s.toml", "watch", "--debug"], ["SIGHUP", "SIGINT", "SIGTERM"]),
        (["apply", "--state", "/s.toml"], []),
    ],
)
def test_the_daemons_signals_are_held_before_capkeeper_is_imported(
    argv: list[str], blocked: list[str]
) -> None:
    """``capkeeper.__main__`` holds SIGHUP, SIGTERM and SIGINT back for any command line
    that names ``watch``, wherever the word is, before it imports the CLI."""
    assert _blocked(argv, when="main") == blocked


@pytest.mark.parametrize(
    "argv",
    [
        ["show", "watch"],  # "watch" is a file name here: held, then let go
        ["--state", "watch", "validate"],
        ["show", "/nonexistent"],
    ],
)
def test_a_one_shot_does_not_keep_the_daemons_signals_blocked(argv: list[str]) -> None:
    """A command other than ``watch`` lets them go again, so an interrupt still stops it."""
    assert _blocked(argv, when="after") == []


def _argparse(argv: list[str]) -> Arguments | None:
    """What argparse reads from ``argv``; None when it refuses it (or prints help)."""
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            return parse(argv)
    except (UsageError, SystemExit):
        return None


# Command lines an ExecStartPre= or a deploy hook writes: read without argparse.
PLAIN = [
    ["apply"],
    ["apply", "--state", "/etc/capkeeper/state.toml", "/usr/local/bin/app"],
    ["--state", "/s.toml", "apply", "/a", "/b"],
    ["--state=apply", "apply", "--unit", "app.service"],
    ["apply", "/a", "--unit=app.service", "--state=/s.toml", "--json"],
    ["--debug", "--log-format", "journal", "apply", "--log-level=warning"],
    ["check", "--json", "/a", "/b"],
    ["check", "/a", "--state", "/s.toml", "--debug"],
    ["apply", ""],
    ["apply", "--json", "--json"],  # the last of a repeated option counts, as in argparse
    ["--state", "s", "apply", "--state", "t", "--state=u"],
    ["--state=", "apply"],  # read as argparse reads it: the CLI then refuses the empty path
]


@pytest.mark.parametrize("argv", PLAIN)
def test_a_plain_one_shot_command_line_is_read_without_argparse(argv: list[str]) -> None:
    """The quick reader takes these, and reads what argparse reads."""
    quick = quick_args(argv)
    assert quick is not None
    assert vars(quick) == vars(_argparse(argv) or Arguments())


@pytest.mark.parametrize(
    "argv",
    [
        ["apply", "--help"],
        ["--version"],
        ["apply", "--js"],  # argparse takes an abbreviation: the quick reader does not
        ["apply", "a", "--json", "b"],  # argparse refuses a second run of positionals
        ["apply", "--state", "-s"],
        ["apply", "--log-level", "loud"],
        ["apply", "--json=yes"],
        ["check", "--state=--"],  # argparse takes "--" out even there: a list, refused
        ["apply", "--unit=--"],
        ["--json", "apply"],  # a command's own option before its name
        ["apply", "--", "-x"],
        ["apply", "-"],
        ["show", "/a"],  # a command that declares no ARGUMENTS
        ["bogus"],
        [],
    ],
)
def test_any_other_command_line_goes_to_argparse(argv: list[str]) -> None:
    """Help, abbreviations, repeats and mistakes are argparse's to read and explain."""
    assert quick_args(argv) is None


_WORDS = [
    *("apply", "check", "show", "watch", "bogus"),
    *("--state", "--state=s", "--state=", "--state=-x", "s", "p", "", "-", "--", "-1"),
    *("--state=--", "--unit=--", "--state=a b", "-1.5", "a b", "-x y"),
    *("--json", "--json=1", "--js", "--unit", "--unit=u", "u", "-h", "--help", "--version"),
    *("--debug", "--log-format", "json", "--log-format=bogus", "--log-level=debug"),
    *("--log-level", "info", "--sta", "-v", "--settle-time", "1"),
]
# Pieces of command lines, mostly plain ones, so that many reach the end of both readers.
_BEFORE = [["--state", "s"], ["--state=s"], ["--debug"], ["--log-format", "json"]]
_BEFORE += [["--sta", "s"]]
_PLAIN = [["p"], ["q"], [""], ["--json"], ["--unit", "u"], ["--unit=--x"], ["--debug"]]
_PLAIN += [["--state", "t"], ["--state=-x"], ["--log-level", "info"]]
_ODD = [["--log-format=bogus"], ["--json=1"], ["-"], ["--"], ["--js"], ["--state", "-x"]]
_ODD += [["-1"], ["--unit"], ["-h"], ["--unit", "--json"]]
_LINES = st.builds(
    lambda before, command, after: [*chain(*before), command, *chain(*after)],
    st.lists(st.sampled_from(_BEFORE), max_size=2),
    st.sampled_from(["apply", "check", "show", "apply"]),
    st.lists(st.sampled_from(_PLAIN * 4 + _ODD), max_size=5),
)


@st.composite
def _plain_lines(draw: st.DrawFn) -> list[str]:
    """A plain command line by construction: whole options, one run of positionals."""
    before = draw(st.lists(st.sampled_from(_BEFORE[:-1]), max_size=2))  # no abbreviation
    after = draw(st.lists(st.sampled_from([p for p in _PLAIN if p[0][:1] == "-"]), max_size=4))
    paths = draw(st.lists(st.sampled_from(["p", "q", ""]), max_size=3))
    at = draw(st.integers(0, len(after)))
    command = draw(st.sampled_from(["apply", "check"]))
    return [*chain(*before), command, *chain(*after[:at]), *paths, *chain(*after[at:])]


@settings(max_examples=3000, deadline=None)
@given(st.lists(st.sampled_from(_WORDS), max_size=7) | _LINES | _plain_lines())
def test_the_quick_reader_reads_what_argparse_reads(argv: list[str]) -> None:
    """Whatever the quick reader takes, argparse takes too, with the same result."""
    quick = quick_args(argv)
    event("quick" if quick is not None else "argparse")
    if quick is not None:
        full = _argparse(argv)
        assert full is not None, argv
        assert vars(quick) == vars(full), argv


def test_no_declared_option_abbreviates_a_global_one() -> None:
    """argparse's top-level parser looks at the words after the command too, and takes
    one that abbreviates two of its options for an ambiguous option: a command's own
    option must not be such a prefix, or argparse would refuse a line the quick reader
    takes."""
    for name in COMMANDS:
        declared = getattr(command_module(name), "ARGUMENTS", ())
        for argument in declared:
            clashes = [g.name for g in GLOBAL_ARGUMENTS if g.name.startswith(argument.name)]
            assert clashes in ([], [argument.name]), (name, argument.name, clashes)
