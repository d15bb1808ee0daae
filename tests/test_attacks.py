"""Attacks by a local unprivileged user, each run for real and each with what must not happen.

Read top to bottom: every section names the attack, the uid it runs as
(``setpriv --reuid``, never a mock) and the property asserted. Every test
of a fix failed on the code before that fix; a test named ``test_real_…``
shows that the attack works against the reference tool.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import tempfile
import unicodedata
from collections.abc import Iterator
from pathlib import Path

import pytest

from capkeeper.cli import ExitStatus, main
from capkeeper.errors import printable
from tests.conftest import elf_source, require_root, require_tool

ATTACKER = 4242  # a uid with no passwd entry, as in the issue


def as_attacker(*argv: str) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` as the unprivileged :data:`ATTACKER` uid, with no supplementary groups."""
    setpriv = require_tool("setpriv")
    return subprocess.run(
        [setpriv, f"--reuid={ATTACKER}", f"--regid={ATTACKER}", "--clear-groups", "--", *argv],
        capture_output=True,
        text=True,
        check=False,
    )


@pytest.fixture
def attacker_dir() -> Iterator[Path]:
    """A directory owned by the attacker, below a root-owned 0755 directory in /tmp.

    Not below pytest's tmp_path: its ``pytest-of-root`` parent is mode 0700,
    which the attacker could not traverse.
    """
    require_root()
    base = Path(tempfile.mkdtemp(prefix="capkeeper-attack-"))
    try:
        os.chmod(base, 0o755)
        home = base / "home"
        home.mkdir(mode=0o755)
        os.chown(home, ATTACKER, ATTACKER)
        yield home
    finally:
        shutil.rmtree(base)


def _hidden(text: str) -> list[str]:
    """Control and format characters, separators and undecodable bytes in ``text``."""
    return [ch for ch in text if unicodedata.category(ch) in {"Cc", "Cf", "Cs", "Zl", "Zp"}]


def _lines(text: str) -> list[str]:
    """``text`` split at its newlines only, each line checked to hide nothing."""
    lines = text.split("\n")
    for line in lines:
        assert not _hidden(line), f"output line carries {_hidden(line)!r}: {line!r}"
    return [line for line in lines if line]


# -- item 4: output forged with newlines --
#
# Attacker: uid 4242, owner of a directory. It copies an ELF into that directory
# under a name holding a newline followed by text that reads like a getcap line,
# and gives it cap_sys_admin=ep in a user namespace of its own
# (``unshare -Ur setcap``: a v3 value with rootid 4242, no privilege needed).
# Must not happen: any capkeeper output (audit table, its reasons and summary,
# --format getcap, adopt, doctor, show) printing a line that the attacker wrote,
# or any control character reaching the terminal. The name is shown escaped.

FORGED_NAMES = [
    "evil\nfake cap_sys_admin=ep",
    "evil\rfake cap_sys_admin=ep",  # a carriage return overwrites the line on a terminal
    "evil\x1b[2K\rfake",  # erase the line, then write over it
    "evil\u2028fake",  # a line separator
    "gpj.\u202eexe",  # a bidi override shows the name reversed
]


def _plant(directory: Path, name: str) -> Path:
    """As the attacker: copy an ELF to ``directory/name`` and setcap it in a user namespace."""
    require_tool("unshare")
    setcap = require_tool("setcap")
    path = directory / name
    planted = as_attacker(
        "sh", "-c", 'cp "$1" "$2" && exec unshare -Ur "$3" cap_sys_admin=ep "$2"', "sh",
        str(elf_source()), str(path), setcap,
    )  # fmt: skip
    assert planted.returncode == 0, f"the attacker could not plant the file: {planted.stderr}"
    assert os.stat(path).st_uid == ATTACKER
    value = os.getxattr(path, "security.capability")
    magic, *_, rootid = struct.unpack("<6I", value)  # vfs_ns_cap_data
    assert (magic >> 24, rootid) == (3, ATTACKER)  # a v3 value owned by the attacker's namespace
    return path


def test_real_getcap_prints_the_forged_line(attacker_dir: Path) -> None:
    """The attack is real: getcap -r prints the attacker's text as a line of its own."""
    _plant(attacker_dir, FORGED_NAMES[0])
    getcap = require_tool("getcap")
    out = subprocess.run(
        [getcap, "-r", str(attacker_dir)], capture_output=True, text=True, check=True
    ).stdout
    assert "fake cap_sys_admin=ep cap_sys_admin=ep" in out.splitlines()


@pytest.mark.parametrize("name", FORGED_NAMES)
def test_audit_output_cannot_be_forged_by_a_name(
    attacker_dir: Path, name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """audit (table, reasons, summary, getcap format) prints the name escaped, one line per
    file; --json keeps the exact name."""
    path = _plant(attacker_dir, name)
    escaped = printable(str(path))
    assert escaped != str(path)
    state = ["--state", str(attacker_dir.parent / "none.toml")]

    assert main([*state, "audit", str(attacker_dir)]) == ExitStatus.DRIFT
    out, err = capsys.readouterr()
    finding, *reasons, summary = _lines(out)
    assert finding.startswith(f"critical  unmanaged  {escaped}  cap_sys_admin=ep")
    assert reasons, "the table lists its reasons"
    assert all(reason.startswith(" " * 21 + "- ") for reason in reasons)
    assert f"{escaped} is owned by uid {ATTACKER}" in "\n".join(reasons)
    assert summary.startswith("1 files: 1 unmanaged;")
    assert not any(line.startswith("fake") for line in _lines(out) + _lines(err))

    assert main([*state, "audit", "--format", "getcap", str(attacker_dir)]) == ExitStatus.DRIFT
    out, err = capsys.readouterr()
    assert _lines(out) == [f"{escaped} cap_sys_admin=ep"]
    assert _lines(err) == []

    assert main([*state, "audit", "--json", str(attacker_dir)]) == ExitStatus.DRIFT
    out, _ = capsys.readouterr()
    records = [json.loads(line) for line in _lines(out)]
    assert [r["path"] for r in records if r["type"] == "finding"] == [str(path)]


@pytest.mark.parametrize("name", FORGED_NAMES)
def test_adopt_doctor_and_show_cannot_be_forged_by_a_name(
    attacker_dir: Path, name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """adopt (named and --from-audit), doctor and show print the name escaped on one line."""
    path = _plant(attacker_dir, name)
    escaped = printable(str(path))
    state = ["--state", str(attacker_dir.parent / "none.toml")]
    not_adopted = (
        f"capkeeper: adopt: {escaped}: not adopted: its capabilities belong to the root of a "
        f"user namespace (rootid {ATTACKER}), which the state cannot declare"
    )

    assert main([*state, "adopt", str(path)]) == ExitStatus.FAILED
    out, err = capsys.readouterr()
    assert (out, _lines(err)) == ("", [not_adopted])

    assert main([*state, "adopt", "--from-audit", str(attacker_dir)]) == ExitStatus.FAILED
    out, err = capsys.readouterr()
    assert (out, _lines(err)) == ("", [not_adopted])

    assert main([*state, "doctor", str(path)]) == ExitStatus.DRIFT
    out, err = capsys.readouterr()
    lines = _lines(out)
    assert lines[0].startswith(f"{escaped}: warning: ")
    assert all(line.startswith((escaped, "  fix: ")) for line in lines[:-1])
    assert lines[-1] == "1 binaries checked: 0 error(s), 1 warning(s)"
    assert _lines(err) == []

    assert main(["show", str(path)]) == ExitStatus.OK
    out, _ = capsys.readouterr()
    assert _lines(out) == [f"{escaped} cap_sys_admin=ep"]
