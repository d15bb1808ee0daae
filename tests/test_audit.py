"""capkeeper audit on a real tree, compared with getcap -r on the same tree.

The planted tree holds files with and without capabilities, nested
directories, symlink loops, a directory root cannot read (the test drops
CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH from its effective set, and runs
getcap with them dropped from its bounding set), a tmpfs mount (local: walked)
and a bind mount of sysfs (pseudo: skipped), in a private mount namespace.
"""

from __future__ import annotations

import ctypes
import errno
import io
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from capkeeper.capabilities import CapSet, parse
from capkeeper.classify import Level, Rating, rate
from capkeeper.cli import ExitStatus, main
from capkeeper.model import Kind, Observation
from capkeeper.scan import RawFinding, WalkOptions, _Progress, walk
from capkeeper.scan import decode_finding as _decode
from capkeeper.trust import Refusal
from tests.conftest import make_binary, require_root, require_tool, setcap
from tests.test_mounts import private_mount_namespace, run

LOADER = "/lib64/ld-linux-x86-64.so.2"
_libc = ctypes.CDLL(None, use_errno=True)
_CAP_V3 = 0x20080522
_DAC = (1 << 1) | (1 << 2)  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    ]


def _capset(data: ctypes.Array[_CapData]) -> None:
    if _libc.capset(ctypes.byref(_CapHeader(_CAP_V3, 0)), data) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


@contextmanager
def without_dac_capabilities() -> Iterator[None]:
    """Drop the two capabilities that let root read any directory, for the body only.

    They leave the effective set of this thread (inherited by forked workers)
    and stay permitted, so they can be raised again afterwards.
    """
    require_root()
    data = (_CapData * 2)()
    assert _libc.capget(ctypes.byref(_CapHeader(_CAP_V3, 0)), data) == 0
    saved = data[0].effective
    data[0].effective = saved & ~_DAC
    _capset(data)
    try:
        yield
    finally:
        data[0].effective = saved
        _capset(data)


def getcap_r(root: Path | str, *, cwd: Path | None = None) -> list[str]:
    """What getcap -r prints on stdout, run without the DAC capabilities, sorted."""
    setpriv = require_tool("setpriv")
    getcap = require_tool("getcap")
    result = subprocess.run(
        [setpriv, "--bounding-set", "-dac_override,-dac_read_search", getcap, "-r", str(root)],
        capture_output=True,
        text=True,
        check=True,
        cwd=cwd,
    )
    return sorted(result.stdout.splitlines())


def audit(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """Run ``capkeeper audit`` through main(); return (exit status, stdout, stderr)."""
    out = io.StringIO()
    code = main(["--log-format", "console", *argv], out=out)
    return code, out.getvalue(), capsys.readouterr().err


@dataclass
class Planted:
    tree: Path
    state: Path


@pytest.fixture
def planted(tree: Path) -> Iterator[Planted]:
    """The acceptance tree, its mounts made in a private namespace held for the test."""
    require_tool("setcap")
    with private_mount_namespace():
        bin_ = tree / "bin"
        bin_.mkdir()
        setcap("cap_net_raw=ep", make_binary(bin_ / "ping"))
        setcap("cap_net_bind_service,cap_net_admin=ep", make_binary(bin_ / "web"))
        make_binary(bin_ / "lost")
        make_binary(bin_ / "plain")
        deep = tree / "nested" / "a" / "b" / "c"
        deep.mkdir(parents=True)
        setcap("cap_sys_nice=p", make_binary(deep / "nice"))
        subprocess.run(
            ["setcap", "-n", "1000", "cap_net_raw=ep", str(make_binary(deep / "ns-tool"))],
            check=True,
        )
        scripts = tree / "scripts"
        scripts.mkdir()
        script = scripts / "run.sh"
        script.write_text("#!/bin/sh\necho hi\n")
        script.chmod(0o755)
        setcap("cap_net_raw=ep", script)
        suid = tree / "suid"
        suid.mkdir()
        setcap("cap_net_raw=ep", make_binary(suid / "helper", mode=0o4755))
        ww = tree / "ww"
        ww.mkdir()
        ww.chmod(0o777)
        setcap("cap_sys_admin=ep", make_binary(ww / "evil"))
        (tree / "loop").symlink_to(".")
        (tree / "nested" / "a" / "up").symlink_to("..")
        (tree / "self").symlink_to("self")
        (tree / "link-ping").symlink_to(bin_ / "ping")
        locked = tree / "locked"
        locked.mkdir()
        setcap("cap_net_raw=ep", make_binary(locked / "hidden"))
        locked.chmod(0)
        (tree / "mnt").mkdir()
        run("mount", "-t", "tmpfs", "-o", "mode=0755", "tmpfs", str(tree / "mnt"))
        setcap("cap_net_raw=ep", make_binary(tree / "mnt" / "tmpfs-tool"))
        (tree / "pseudo").mkdir()
        run("mount", "--bind", "/sys/kernel/mm", str(tree / "pseudo"))
        state = tree / "state.toml"
        state.write_text(
            f'[[binary]]\npath = "{bin_}/ping"\ncaps = "cap_net_raw=ep"\n'
            f'[[binary]]\npath = "{bin_}/web"\ncaps = "cap_net_bind_service=ep"\n'
            f'[[binary]]\npath = "{bin_}/lost"\ncaps = "cap_net_raw=ep"\n'
        )
        yield Planted(tree, state)


EXPECTED_GETCAP = [
    "bin/ping cap_net_raw=ep",
    "bin/web cap_net_bind_service,cap_net_admin=ep",
    "mnt/tmpfs-tool cap_net_raw=ep",
    "nested/a/b/c/nice cap_sys_nice=p",
    "nested/a/b/c/ns-tool cap_net_raw=ep",
    "scripts/run.sh cap_net_raw=ep",
    "suid/helper cap_net_raw=ep",
    "ww/evil cap_sys_admin=ep",
]


def test_getcap_format_equals_getcap_r(
    planted: Planted, capsys: pytest.CaptureFixture[str]
) -> None:
    """--format getcap prints exactly getcap -r's lines for the tree (order aside)."""
    tree = planted.tree
    with without_dac_capabilities():
        reference = getcap_r(tree)
        code, out, err = audit(
            ["--state", str(planted.state), "audit", "--format", "getcap", str(tree)], capsys
        )
    assert sorted(out.splitlines()) == reference
    assert reference == [f"{tree}/{line}" for line in EXPECTED_GETCAP]
    assert code == ExitStatus.DRIFT
    assert f"capkeeper: audit: {tree}/locked: cannot open directory: Permission denied" in err


def test_classifies_and_rates_against_the_state(
    planted: Planted, capsys: pytest.CaptureFixture[str]
) -> None:
    """JSON: managed files in sync or drifted, the rest unmanaged, the planted danger worst."""
    tree = planted.tree
    with without_dac_capabilities():
        reference = getcap_r(tree)
        code, out, err = audit(
            ["--state", str(planted.state), "audit", "--json", str(tree)], capsys
        )
    records = [json.loads(line) for line in out.splitlines()]
    findings = [r for r in records if r["type"] == "finding"]
    verdicts = {r["path"].removeprefix(f"{tree}/"): r["verdict"] for r in findings}
    assert verdicts == {
        "bin/ping": "in-sync",
        "bin/web": "drifted",
        "bin/lost": "drifted",
        "mnt/tmpfs-tool": "unmanaged",
        "nested/a/b/c/nice": "unmanaged",
        "nested/a/b/c/ns-tool": "unmanaged",
        "scripts/run.sh": "unmanaged",
        "suid/helper": "unmanaged",
        "ww/evil": "unmanaged",
    }
    with_caps = sorted(f"{r['path']} {r['caps']}" for r in findings if r["caps"] is not None)
    assert with_caps == reference
    worst = findings[0]
    assert worst["path"] == f"{tree}/ww/evil"
    assert worst["rating"] == "critical"
    assert worst["reasons"] == [
        "cap_sys_admin amounts to root",
        f"directory {tree}/ww is writable by group and others (mode 0777)",
    ]
    assert max(r.get("score", 0) for r in findings) == worst["score"]
    by_path = {r["path"]: r for r in findings}
    web = by_path[f"{tree}/bin/web"]
    assert web["expected"] == "cap_net_bind_service=ep"
    assert web["note"] == "extra capabilities: possible tampering"
    assert by_path[f"{tree}/bin/lost"]["caps"] is None
    assert by_path[f"{tree}/bin/lost"]["note"] == "declared capabilities are missing"
    script = by_path[f"{tree}/scripts/run.sh"]
    assert script["rating"] == "medium"
    assert script["reasons"] == [
        f"{tree}/scripts/run.sh is a script (#!/bin/sh); the kernel ignores file capabilities "
        "on scripts"
    ]
    helper = by_path[f"{tree}/suid/helper"]
    assert helper["rating"] == "medium"
    assert helper["reasons"] == [
        f"{tree}/suid/helper is setuid/setgid (mode 4755); file capabilities and setuid do not "
        "compose"
    ]
    assert by_path[f"{tree}/nested/a/b/c/nice"]["rating"] == "low"
    errors = [r for r in records if r["type"] == "error"]
    assert errors == [
        {
            "type": "error",
            "path": f"{tree}/locked",
            "message": "cannot open directory: Permission denied",
        }
    ]
    skipped = [r for r in records if r["type"] == "skipped"]
    assert skipped == [
        {
            "type": "skipped",
            "path": f"{tree}/pseudo",
            "fstype": "sysfs",
            "reason": "pseudo file system",
        }
    ]
    summary = records[-1]
    assert summary["type"] == "summary"
    assert summary["unmanaged"] == 6
    assert summary["drifted"] == 2
    assert summary["in-sync"] == 1
    assert summary["errors"] == 1
    assert code == ExitStatus.DRIFT
    assert "locked: cannot open directory: Permission denied" in err


def test_table_shows_worst_first_with_reasons(
    planted: Planted, capsys: pytest.CaptureFixture[str]
) -> None:
    """The table opens with the critical finding and its reasons, and ends with a summary."""
    tree = planted.tree
    code, out, _ = audit(["--state", str(planted.state), "audit", str(tree)], capsys)
    lines = out.splitlines()
    assert lines[:3] == [
        f"critical  unmanaged  {tree}/ww/evil  cap_sys_admin=ep",
        "                     - cap_sys_admin amounts to root",
        f"                     - directory {tree}/ww is writable by group and others (mode 0777)",
    ]
    assert f"-         in-sync    {tree}/bin/ping  cap_net_raw=ep" in lines
    assert (
        f"-         drifted    {tree}/bin/web  cap_net_bind_service,cap_net_admin=ep "
        "(declared cap_net_bind_service=ep)"
    ) in lines
    assert lines[-1].startswith("10 files: 7 unmanaged, 2 drifted, 1 in-sync; walked ")
    assert lines[-1].endswith("; skipped 1 mount(s) (sysfs)")
    assert code == ExitStatus.DRIFT


def test_one_file_system_stays_on_the_root_mount(
    planted: Planted, capsys: pytest.CaptureFixture[str]
) -> None:
    """With -x the tmpfs below the root is not entered, and is listed as skipped."""
    tree = planted.tree
    code, out, _ = audit(
        ["--state", str(planted.state), "audit", "--json", "-x", str(tree)], capsys
    )
    records = [json.loads(line) for line in out.splitlines()]
    paths = {r["path"] for r in records if r["type"] == "finding"}
    assert f"{tree}/mnt/tmpfs-tool" not in paths
    assert f"{tree}/ww/evil" in paths
    skipped = {r["path"]: (r["fstype"], r["reason"]) for r in records if r["type"] == "skipped"}
    assert skipped == {
        f"{tree}/mnt": ("tmpfs", "another mount (--one-file-system)"),
        f"{tree}/pseudo": ("sysfs", "another mount (--one-file-system)"),
    }
    assert code == ExitStatus.DRIFT


def test_include_fs_walks_a_pseudo_file_system(
    planted: Planted, capsys: pytest.CaptureFixture[str]
) -> None:
    """--include-fs sysfs enters the sysfs bind mount that is skipped by default."""
    tree = planted.tree
    _, out, _ = audit(
        ["--state", str(planted.state), "audit", "--json", "--include-fs", "proc,sysfs", str(tree)],
        capsys,
    )
    assert '"type": "skipped"' not in out
    skipping = walk([str(tree)], WalkOptions(jobs=2))
    including = walk([str(tree)], WalkOptions(jobs=2, include_fs=frozenset({"sysfs"})))
    mm = sum(1 for _ in os.walk("/sys/kernel/mm"))
    assert [s.path for s in skipping.skipped] == [f"{tree}/pseudo"]
    assert including.skipped == []
    assert including.directories == skipping.directories + mm
    assert [f.path for f in including.found] == [f.path for f in skipping.found]


def test_errors_alone_exit_2(tree: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A walk that finds nothing but cannot read a directory exits 2, not 0."""
    make_binary(tree / "plain")
    (tree / "locked").mkdir(mode=0)
    state = tree / "missing-state.toml"
    with without_dac_capabilities():
        code, out, err = audit(["--state", str(state), "audit", str(tree)], capsys)
    assert code == ExitStatus.FAILED
    (line,) = out.splitlines()
    assert line.startswith("0 files: nothing with capabilities; walked 1 directories, 1 files in ")
    assert line.endswith("; 1 error(s)")
    assert err.splitlines() == [
        f"capkeeper: audit: no state at {state}: every finding is unmanaged",
        f"capkeeper: audit: {tree}/locked: cannot open directory: Permission denied",
    ]


def test_clean_tree_exits_0(tree: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Every file with capabilities managed and in sync: exit 0."""
    setcap("cap_net_raw=ep", make_binary(tree / "ping"))
    make_binary(tree / "plain")
    state = tree / "state.toml"
    state.write_text(f'[[binary]]\npath = "{tree}/ping"\ncaps = "cap_net_raw=ep"\n')
    code, out, err = audit(["--state", str(state), "audit", str(tree)], capsys)
    assert out.splitlines()[0] == f"-         in-sync    {tree}/ping  cap_net_raw=ep"
    assert code == ExitStatus.OK
    assert err == ""


def test_hard_link_of_a_declared_file_is_managed(
    tree: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A second name of a declared inode is classified with that entry, and says so."""
    setcap("cap_net_raw=ep", make_binary(tree / "ping"))
    os.link(tree / "ping", tree / "ping-again")
    state = tree / "state.toml"
    state.write_text(f'[[binary]]\npath = "{tree}/ping"\ncaps = "cap_net_raw=ep"\n')
    code, out, _ = audit(["--state", str(state), "audit", "--json", str(tree)], capsys)
    records = {r["path"]: r for r in map(json.loads, out.splitlines()) if r["type"] == "finding"}
    again = records[f"{tree}/ping-again"]
    assert again["verdict"] == "in-sync"
    assert again["note"] == f"hard link of declared {tree}/ping"
    assert code == ExitStatus.OK


def test_declared_entry_the_trust_policy_refuses_is_refused(
    tree: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A declared path through a directory another user owns is refused by apply, so
    audit says "refused", judging the declared route, not the route the walk took:
    whether that user points it at a capable root-owned binary (the walk reaches it by
    an all-root route) or it holds a file without capabilities. Before: "drifted"."""
    bin_dir, owned = tree / "bin", tree / "home"
    bin_dir.mkdir(mode=0o755)
    owned.mkdir(mode=0o755)
    ping = make_binary(bin_dir / "ping")
    setcap("cap_net_raw=ep", ping)
    (owned / "app").symlink_to(ping)
    make_binary(owned / "tool")
    os.chown(owned, 4242, 4242)
    state = tree / "state.toml"
    state.write_text(
        f'[[binary]]\npath = "{owned}/app"\ncaps = "cap_net_bind_service=ep"\n'
        f'[[binary]]\npath = "{owned}/tool"\ncaps = "cap_net_raw=ep"\n'
    )
    code, out, _ = audit(["--state", str(state), "audit", "--json", str(tree)], capsys)
    records = {r["path"]: r for r in map(json.loads, out.splitlines()) if r["type"] == "finding"}
    assert {path: r["verdict"] for path, r in records.items()} == {
        str(ping): "refused",
        f"{owned}/tool": "refused",
    }
    owner_rule = f"directory {owned} is owned by uid 4242, not by root"
    assert all(owner_rule in r["note"] for r in records.values()), records
    assert code == ExitStatus.DRIFT


def test_work_sharing_gives_the_same_result(tree: Path) -> None:
    """1, 2 and 4 workers find the same files as getcap -r in a wide, deep tree."""
    count = 0
    for top in range(6):
        for middle in range(8):
            directory = tree / f"t{top}" / f"m{middle}"
            for leaf in range(5):
                (directory / f"l{leaf}").mkdir(parents=True)
            if (top + middle) % 3 == 0:
                setcap("cap_net_raw=ep", make_binary(directory / f"l{middle % 5}" / "tool"))
                count += 1
            make_binary(directory / "plain")
    results = [walk([str(tree)], WalkOptions(jobs=jobs)) for jobs in (1, 2, 4)]
    reference = [line.split(" ", 1)[0] for line in getcap_r(tree)]
    for result in results:
        assert [f.path for f in result.found] == reference
        assert result.directories == 1 + 6 + 48 + 240
        assert result.files == 48 + count
        assert result.errors == []
    assert len(reference) == count


def test_relative_root_prints_like_getcap(
    tree: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A relative ROOT is printed the way getcap -r prints it."""
    (tree / "sub").mkdir()
    setcap("cap_net_raw=ep", make_binary(tree / "sub" / "tool"))
    monkeypatch.chdir(tree)
    code, out, _ = audit(["--state", "none.toml", "audit", "--format", "getcap", "sub"], capsys)
    assert out.splitlines() == getcap_r("sub", cwd=tree) == ["sub/tool cap_net_raw=ep"]
    assert code == ExitStatus.DRIFT


def test_root_symlink_is_not_followed(tree: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A ROOT that is a symlink is reported and not walked, like getcap -r (nftw FTW_PHYS)."""
    (tree / "real").mkdir()
    setcap("cap_net_raw=ep", make_binary(tree / "real" / "tool"))
    (tree / "alias").symlink_to("real")
    code, out, err = audit(
        ["--state", "none.toml", "audit", "--format", "getcap", str(tree / "alias")], capsys
    )
    assert out == ""
    assert getcap_r(tree / "alias") == []
    assert f"{tree}/alias: is a symlink to real; not followed (audit the target instead)" in err
    assert code == ExitStatus.FAILED


def test_root_may_be_a_file(tree: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A ROOT that is a regular file is checked itself."""
    setcap("cap_net_raw=ep", make_binary(tree / "tool"))
    code, out, _ = audit(
        ["--state", "none.toml", "audit", "--format", "getcap", str(tree / "tool")], capsys
    )
    assert out.splitlines() == getcap_r(tree / "tool") == [f"{tree}/tool cap_net_raw=ep"]
    assert code == ExitStatus.DRIFT


def test_progress_only_on_a_terminal() -> None:
    """The progress line is drawn and cleared on a terminal, and never elsewhere."""

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    terminal = Terminal()
    progress = _Progress(terminal)
    progress.update(12, 345, 2, force=True)
    progress.clear()
    assert terminal.getvalue() == (
        "\rcapkeeper audit: 12 directories, 345 files, 2 with capabilities\x1b[K\r\x1b[K"
    )
    pipe = io.StringIO()
    quiet = _Progress(pipe)
    quiet.update(12, 345, 2, force=True)
    quiet.clear()
    assert pipe.getvalue() == ""


def _observation(path: str, *, kind: Kind = Kind.ELF, mode: int = 0o100755) -> Observation:
    return Observation(
        path=path,
        resolved=path,
        hops=(),
        uid=0,
        gid=0,
        mode=mode,
        dev=1,
        ino=2,
        kind=kind,
        interpreter="",
        caps=None,
        caps_problem=None,
        sha256=None,
    )


def test_rate_interpreter_is_critical() -> None:
    """Capabilities on an interpreter are rated critical whatever they are."""
    rating = rate(parse("cap_net_raw=ep"), None, _observation("/usr/bin/python3.11"))
    assert rating == Rating(
        61,
        (
            "python3.11 runs other code: its name looks like an interpreter; every script it "
            "runs gets these capabilities",
        ),
    )
    assert rating.level is Level.CRITICAL
    assert rate(parse("cap_net_raw=ep"), None, _observation("/usr/bin/pythonic")).score == 1


def test_capable_loader_and_interpreter_are_the_worst(
    tree: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A loader copy and a python copy that already carry capabilities, declared or not, are
    critical: with a harmless capability they rank above a root-equivalent one on a plain binary
    (whose capabilities only its own code uses)."""
    loader, python, declared = tree / "myapp", tree / "tool", tree / "declared-loader"
    for copy, source in ((loader, LOADER), (python, "/usr/bin/python3.11"), (declared, LOADER)):
        shutil.copyfile(source, copy)
        copy.chmod(0o755)
        setcap("cap_net_raw=ep", copy)
    setcap("cap_sys_admin=ep", make_binary(tree / "admin"))
    state = tree / "state.toml"
    state.write_text(f'[[binary]]\npath = "{declared}"\ncaps = "cap_net_raw=ep"\n')
    code, out, _ = audit(["--state", str(state), "audit", "--json", str(tree)], capsys)
    findings = [json.loads(line) for line in out.splitlines()]
    findings = [f for f in findings if f["type"] == "finding"]
    worst = {f["path"]: f for f in findings[:3]}
    assert set(worst) == {str(loader), str(python), str(declared)}
    assert all(f["rating"] == "critical" for f in worst.values())
    loader_reason = (
        "runs other code: it is the dynamic loader; every program it runs gets these capabilities"
    )
    assert worst[str(loader)]["reasons"] == [f"myapp {loader_reason}"]
    assert worst[str(declared)]["verdict"] == "refused"
    assert worst[str(declared)]["reasons"] == [f"declared-loader {loader_reason}"]
    assert worst[str(python)]["reasons"] == [
        "tool runs other code: it embeds a Python runtime (exports Py_BytesMain); every script "
        "it runs gets these capabilities"
    ]
    assert findings[3]["path"] == str(tree / "admin")
    assert findings[3]["rating"] == "high"
    assert code == ExitStatus.DRIFT


def test_rate_combines_reasons_into_levels() -> None:
    """Scores add up: root-equivalent plus a writable file is critical."""
    writable = Refusal("file-writable", "/x is writable by others (mode 0757)")
    rating = rate(parse("cap_setuid,cap_dac_override=ep"), None, _observation("/x"), [writable])
    assert rating.reasons == (
        "cap_dac_override, cap_setuid amount to root",
        "/x is writable by others (mode 0757)",
    )
    assert rating.level is Level.CRITICAL
    assert rate(parse("cap_net_raw=p"), None, None).level is Level.LOW
    ignored = Refusal("sha256", "content does not match")
    assert rate(parse("cap_net_raw=p"), None, None, [ignored]).reasons == ()


def test_unreadable_values_are_findings() -> None:
    """EINVAL (v1 or malformed) and EOVERFLOW (foreign v3) are present, not absent."""
    assert _decode(RawFinding("/x", None, errno.EINVAL)) == (
        None,
        "present but unreadable (legacy v1 or malformed value)",
    )
    assert _decode(RawFinding("/x", None, errno.EOVERFLOW))[1] == (
        "present but owned by another user namespace (v3 rootid not mapped)"
    )
    rating = rate(None, "present but unreadable (legacy v1 or malformed value)", None)
    assert rating.level is Level.MEDIUM
    assert rating.reasons == (
        "present but unreadable (legacy v1 or malformed value); "
        "the kernel may still honour it at exec",
    )
    assert _decode(RawFinding("/x", bytes.fromhex("0100000200200000" + "00" * 12), 0)) == (
        CapSet(permitted=1 << 13, effective=True),
        None,
    )


def test_jobs_must_be_positive(capsys: pytest.CaptureFixture[str]) -> None:
    """--jobs 0 is a usage error."""
    code, _, err = audit(["audit", "--jobs", "0", "/nonexistent"], capsys)
    assert code == ExitStatus.USAGE
    assert "argument -j/--jobs: must be a positive number, not '0'" in err
