"""capkeeper adopt: TOML for files set up by hand, fed back as the state."""

from __future__ import annotations

import hashlib
import io
import os
import tomllib
from pathlib import Path

import pytest

from capkeeper.capabilities import parse
from capkeeper.classify import Adoption, render, toml_string
from capkeeper.cli import ExitStatus, main
from capkeeper.trust import Refusal
from tests.conftest import make_binary, setcap


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """Run capkeeper through main(); return (exit status, stdout, stderr)."""
    out = io.StringIO()
    code = main(["--log-format", "console", *argv], out=out)
    return code, out.getvalue(), capsys.readouterr().err


def test_adopted_paths_check_in_sync(tree: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """adopt PATH... prints tables that, used as the state, make check report all in sync."""
    setcap("cap_net_raw=ep", make_binary(tree / "ping"))
    setcap("cap_net_bind_service,cap_sys_nice+p", make_binary(tree / "web"))
    state = tree / "state.toml"
    code, out, err = run(
        ["--state", str(state), "adopt", str(tree / "ping"), str(tree / "web")], capsys
    )
    assert code == ExitStatus.OK
    assert err == ""
    assert out == (
        f'[[binary]]\npath = "{tree}/ping"\ncaps = "cap_net_raw=ep"\n\n'
        f'[[binary]]\npath = "{tree}/web"\ncaps = "cap_net_bind_service,cap_sys_nice=p"\n'
    )
    state.write_text(out)
    code, out, _ = run(["check", "--state", str(state)], capsys)
    assert out.splitlines() == [
        f"in-sync   {tree}/ping  cap_net_raw=ep",
        f"in-sync   {tree}/web  cap_net_bind_service,cap_sys_nice=p",
        "2 declared: 2 in-sync",
    ]
    assert code == ExitStatus.OK


def test_pin_adds_the_sha256_of_the_content(tree: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--pin adds the file's sha256; the pinned state checks in sync."""
    tool = make_binary(tree / "tool")
    setcap("cap_net_raw=ep", tool)
    state = tree / "state.toml"
    code, out, _ = run(["--state", str(state), "adopt", "--pin", str(tool)], capsys)
    assert code == ExitStatus.OK
    digest = hashlib.sha256(tool.read_bytes()).hexdigest()
    assert tomllib.loads(out)["binary"] == [
        {"path": str(tool), "caps": "cap_net_raw=ep", "sha256": digest}
    ]
    state.write_text(out)
    code, _, _ = run(["check", "--state", str(state)], capsys)
    assert code == ExitStatus.OK


def test_inheritable_is_declared(tree: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Inheritable capabilities get allow_inheritable, and the state checks in sync."""
    tool = make_binary(tree / "tool")
    setcap("cap_net_raw=eip", tool)
    state = tree / "state.toml"
    code, out, _ = run(["--state", str(state), "adopt", str(tool)], capsys)
    assert code == ExitStatus.OK
    assert tomllib.loads(out)["binary"] == [
        {"path": str(tool), "caps": "cap_net_raw=eip", "allow_inheritable": True}
    ]
    state.write_text(out)
    code, out, _ = run(["check", "--state", str(state)], capsys)
    assert out.splitlines()[0] == f"in-sync   {tool}  cap_net_raw=eip"
    assert code == ExitStatus.OK


def test_non_root_owner_is_commented_out(tree: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A user-owned file is not adopted silently: its owner could rewrite it and keep the caps."""
    tool = make_binary(tree / "tool")
    os.chown(tool, 65534, 65534)
    setcap("cap_net_raw=ep", tool)  # after chown, which strips capabilities
    _, out, _ = run(["--state", str(tree / "state.toml"), "adopt", str(tool)], capsys)
    assert "binary" not in tomllib.loads(out)
    assert out.splitlines()[0] == (
        f"# capkeeper would refuse this file: {tool} is owned by nobody, who could change its "
        "content without losing the capabilities "
        f'(hint: chown root {tool}, or declare owner = "nobody" knowingly)'
    )
    assert '# owner = "nobody"' in out.splitlines()


def test_reasons_cannot_inject_tables(tree: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A symlink target with newlines stays inside the comment: no live table is injected."""
    evil = 'x\n[[binary]]\npath = "\\u002Ftmp\\u002Fevil"\ncaps = "cap_sys_admin+ep"\n#'
    (tree / evil).mkdir()
    tool = make_binary(tree / evil / "tool")
    setcap("cap_net_raw=ep", tool)
    link = tree / "link"
    link.symlink_to(evil)
    os.lchown(link, 65534, 65534)
    _, out, _ = run(["--state", str(tree / "state.toml"), "adopt", str(link / "tool")], capsys)
    assert "binary" not in tomllib.loads(out)
    assert all(line.startswith("#") or not line for line in out.splitlines())
    assert "-> x\\n[[binary]]\\npath = " in out


def test_from_audit_adopts_unmanaged_and_comments_out_refused(
    tree: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--from-audit declares every unmanaged file; refused ones come commented, with reasons."""
    (tree / "bin").mkdir()
    setcap("cap_net_raw=ep", make_binary(tree / "bin" / "ping"))
    setcap("cap_sys_nice=ep", make_binary(tree / "bin" / "nice"))
    setcap("cap_net_admin=ep", make_binary(tree / "bin" / "managed"))
    make_binary(tree / "bin" / "plain")
    script = tree / "bin" / "run.sh"
    script.write_text("#!/bin/sh\n")
    script.chmod(0o755)
    setcap("cap_net_raw=ep", script)
    state = tree / "state.toml"
    state.write_text(f'[[binary]]\npath = "{tree}/bin/managed"\ncaps = "cap_net_admin=ep"\n')
    code, out, err = run(["--state", str(state), "adopt", "--from-audit", str(tree)], capsys)
    assert out == (
        f'[[binary]]\npath = "{tree}/bin/nice"\ncaps = "cap_sys_nice=ep"\n\n'
        f'[[binary]]\npath = "{tree}/bin/ping"\ncaps = "cap_net_raw=ep"\n\n'
        f"# capkeeper would refuse this file: {tree}/bin/run.sh is a script (#!/bin/sh); the "
        "kernel ignores file capabilities on scripts (hint: give the service "
        "AmbientCapabilities= in its unit instead)\n"
        f'# [[binary]]\n# path = "{tree}/bin/run.sh"\n# caps = "cap_net_raw=ep"\n'
    )
    assert err == (
        f"capkeeper: adopt: {tree}/bin/run.sh: commented out, the trust policy refuses it: "
        f"{tree}/bin/run.sh is a script (#!/bin/sh); the kernel ignores file capabilities on "
        "scripts (hint: give the service AmbientCapabilities= in its unit instead)\n"
    )
    assert code == ExitStatus.FAILED
    dropin = tree / "state.d"
    dropin.mkdir()
    (dropin / "adopted.toml").write_text(out)
    code, out, _ = run(["check", "--state", str(state)], capsys)
    assert out.splitlines()[-1] == "3 declared: 3 in-sync"
    assert code == ExitStatus.OK
    code, out, _ = run(["--state", str(state), "audit", "--json", str(tree)], capsys)
    assert '"verdict": "unmanaged"' in out  # the script, still unmanaged
    assert out.count('"verdict": "in-sync"') == 3


def test_nothing_to_adopt_is_an_error(tree: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A file without capabilities, or a missing one, is not adopted; exit 2."""
    plain = make_binary(tree / "plain")
    code, out, err = run(
        ["--state", str(tree / "s.toml"), "adopt", str(plain), str(tree / "gone")], capsys
    )
    assert out == ""
    assert err.splitlines() == [
        f"capkeeper: adopt: {plain}: not adopted: carries no capabilities",
        f"capkeeper: adopt: {tree}/gone: cannot open: No such file or directory "
        "(hint: the file does not exist)",
    ]
    assert code == ExitStatus.FAILED


def test_already_declared_is_skipped(tree: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A declared file is not printed again (appending the output stays valid)."""
    setcap("cap_net_raw=ep", make_binary(tree / "ping"))
    state = tree / "state.toml"
    state.write_text(f'[[binary]]\npath = "{tree}/ping"\ncaps = "cap_net_raw=p"\n')
    code, out, err = run(["--state", str(state), "adopt", str(tree / "ping")], capsys)
    assert out == ""
    assert err == f"capkeeper: adopt: {tree}/ping: already declared in state.toml: entry 1\n"
    assert code == ExitStatus.OK


def test_adopt_needs_something_to_adopt(capsys: pytest.CaptureFixture[str]) -> None:
    """Without PATH or --from-audit, adopt is a usage error."""
    code, _, err = run(["adopt"], capsys)
    assert code == ExitStatus.USAGE
    assert err == "capkeeper: error: name the files to adopt, or use --from-audit ROOT\n"


def test_render_quotes_paths_as_toml() -> None:
    """Quotes, backslashes and control characters in paths survive a TOML round trip."""
    path = '/opt/we"ird\\name\ttab'
    text = render([Adoption(path, parse("cap_net_raw=ep"))], last_cap=40)
    assert tomllib.loads(text)["binary"][0]["path"] == path
    assert toml_string("é") == '"é"'
    refused = Adoption("/x", parse("cap_net_raw=ep"), refusals=(Refusal("setuid", "why"),))
    assert tomllib.loads(render([refused], last_cap=40)) == {}
