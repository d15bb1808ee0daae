"""The systemd integration files: drop-in generation and the shipped catalog."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest

from capkeeper.cli import ExitStatus, main
from capkeeper.errors import CapkeeperError
from capkeeper.events import EVENTS
from capkeeper.state import load_state
from capkeeper.systemd import catalog_text, dropin_text, unit_word, writable_directory

ROOT = Path(__file__).resolve().parent.parent


def test_shipped_catalog_is_generated_from_the_registry() -> None:
    """systemd/capkeeper.catalog equals what the event registry generates."""
    assert (ROOT / "systemd" / "capkeeper.catalog").read_text() == catalog_text()


def test_catalog_format() -> None:
    """One entry per event, 32 lower-case hex ids, text lines within 76 columns."""
    text = catalog_text()
    ids = [line[3:] for line in text.splitlines() if line.startswith("-- ")]
    assert ids == [spec.message_id for spec in EVENTS.values()]
    assert all(len(i) == 32 and i == i.lower() and int(i, 16) >= 0 for i in ids)
    assert len(set(ids)) == len(ids)
    body = [line for line in text.splitlines() if not line.startswith("#")]
    assert max(len(line) for line in body) <= 76


def test_writable_directory_stops_at_first_symlink(tmp_path: Path) -> None:
    """A symlinked release directory makes the directory holding the link writable."""
    (tmp_path / "releases" / "v1" / "bin").mkdir(parents=True)
    (tmp_path / "current").symlink_to("releases/v1")
    assert writable_directory(f"{tmp_path}/current/bin/app") == str(tmp_path)
    assert writable_directory(f"{tmp_path}/releases/v1/bin/app") == f"{tmp_path}/releases/v1/bin"
    assert writable_directory("/usr/local/bin/app") == "/usr/local/bin"


def test_dropin_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """systemd-dropin writes ReadWritePaths= per directory, then --check says up to date."""
    state = tmp_path / "state.toml"
    state.write_text(
        '[[binary]]\npath = "/usr/local/bin/a"\ncaps = "cap_chown=p"\n'
        '[[binary]]\npath = "/usr/local/bin/b"\ncaps = "cap_chown=p"\n'
        '[[binary]]\npath = "/opt/app/bin/c"\ncaps = "cap_chown=p"\n'
    )
    target = tmp_path / "dropin" / "50-capkeeper-paths.conf"
    base = ["--log-format", "console", "systemd-dropin", "--state", str(state)]
    out = io.StringIO()
    assert main([*base, "--output", str(target), "--check"], out=out) == ExitStatus.DRIFT
    assert out.getvalue() == f"{target}: out of date\n"
    out = io.StringIO()
    assert main([*base, "--output", str(target)], out=out) == ExitStatus.OK
    assert target.read_text().splitlines()[3:] == [
        "[Service]",
        "ReadWritePaths=-/opt/app/bin",
        "ReadWritePaths=-/usr/local/bin",
    ]
    assert os.stat(target).st_mode & 0o777 == 0o644
    out = io.StringIO()
    assert main([*base, "--output", str(target), "--check"], out=out) == ExitStatus.OK
    assert out.getvalue() == f"{target}: up to date\n"
    assert capsys.readouterr().err == ""


def test_top_level_symlink_never_makes_root_writable() -> None:
    """On merged /usr, /bin/x must not yield '/' (that would undo ProtectSystem=strict)."""
    links = {"/bin": "/usr/bin"}
    found = writable_directory(
        "/bin/ping", islink=links.__contains__, realpath=lambda p: links.get(p, p)
    )
    assert found == "/usr/bin"


def test_unit_words_are_escaped() -> None:
    """Spaces, quotes, backslashes and % specifiers cannot split or expand a path."""
    assert unit_word("-/usr/local/bin") == "-/usr/local/bin"
    assert unit_word("-/opt/my app") == '"-/opt/my app"'
    assert unit_word('-/opt/a"b\\c') == '"-/opt/a\\"b\\\\c"'
    assert unit_word("-/opt/50%n") == "-/opt/50%%n"


def test_dropin_warns_about_paths_the_service_cannot_see(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Binaries under /tmp or /home are invisible to the sandboxed service: said so."""
    state = tmp_path / "state.toml"
    state.write_text('[[binary]]\npath = "/home/app/bin/x"\ncaps = "cap_chown=p"\n')
    out = io.StringIO()
    argv = ["--log-format", "console", "systemd-dropin", "--state", str(state), "--output", "-"]
    assert main(argv, out=out) == ExitStatus.OK
    assert capsys.readouterr().err == (
        "capkeeper: warning: /home/app/bin/x is hidden from the service "
        "(PrivateTmp=/ProtectHome= in capkeeper.service); keep managed binaries elsewhere\n"
    )


@pytest.mark.parametrize(
    ("binary", "directory"),
    [
        ("/tool", "/"),
        ("/usr/tool", "/usr"),
        ("/etc/tool", "/etc"),
        ("/opt/tool", "/opt"),
        ("/usr/local/tool", "/usr/local"),
        ("/usr/lib/tool", "/usr/lib"),
        ("/var/lib/tool", "/var/lib"),
    ],
)
@pytest.mark.parametrize("mode", [[], ["--check"], ["--output", "-"]])
def test_dropin_never_opens_a_system_directory(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    binary: str,
    directory: str,
    mode: list[str],
) -> None:
    """A binary directly in / or a system hierarchy is refused by name; nothing is written."""
    state = tmp_path / "state.toml"
    state.write_text(
        '[[binary]]\npath = "/opt/app/bin/ok"\ncaps = "cap_chown=p"\n'
        f'[[binary]]\npath = "{binary}"\ncaps = "cap_chown=p"\n'
    )
    target = tmp_path / "dropin" / "50-capkeeper-paths.conf"
    output = mode if mode == ["--output", "-"] else ["--output", str(target), *mode]
    argv = ["--log-format", "console", "systemd-dropin", "--state", str(state), *output]
    out = io.StringIO()
    assert main(argv, out=out) == ExitStatus.FAILED
    assert out.getvalue() == ""
    assert not target.parent.exists()
    assert capsys.readouterr().err == (
        f"capkeeper: error: state.toml: entry 2 ({binary}): refusing to write "
        f"ReadWritePaths=-{directory}: it would let the service set capabilities on "
        f"everything below {directory} (hint: move the binary, or the release symlink on its "
        "path, into a directory of its own such as /opt/NAME/bin/ and declare it there)\n"
    )


def test_release_symlink_in_a_system_directory_is_refused(tmp_path: Path) -> None:
    """A release symlink directly in /srv would open /srv: dropin_text refuses it too."""
    links = {"/srv/current": "/srv/releases/v1"}
    assert (
        writable_directory("/srv/current/bin/app", islink=links.__contains__, realpath=lambda p: p)
        == "/srv"
    )
    state = tmp_path / "state.toml"
    state.write_text('[[binary]]\npath = "/tool"\ncaps = "cap_chown=p"\n')
    with pytest.raises(CapkeeperError, match=r"refusing to write ReadWritePaths=-/: "):
        dropin_text(load_state(state, last_cap=40))
