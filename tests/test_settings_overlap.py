"""The daemon's settings check by pydantic-settings runs beside its start-up.

``load_settings(isolate=True)`` returns the values of the rules at once while a
forked child checks the same sources with pydantic-settings; the daemon waits for
that verdict (``confirm_settings``) before ``READY=1``. A verdict only the child
gives (the rules accept, pydantic-settings refuses) still stops the daemon with
exit status 78 and pydantic-settings' text, before any ``READY=1``.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from capkeeper import settings as settings_module
from capkeeper.errors import SettingsError
from capkeeper.settings import SETTINGS_FILE_VARIABLE, confirm_settings, load_settings
from tests.conftest import make_binary, setcap

REPO = Path(__file__).resolve().parents[1]
FILE_TEXT = 'log_level = "warning"\nrescan_interval = 60\n'


def _file(path: Path, text: str) -> Path:
    path.write_text(text)
    os.chmod(path, 0o644)
    return path


def test_the_values_come_at_once_and_the_verdict_later(tmp_path: Path) -> None:
    """Valid sources: the values are returned while the child is still checking; its
    verdict (none) is collected by confirm_settings, which reaps it."""
    path = _file(tmp_path / "settings.toml", FILE_TEXT)
    environ = {SETTINGS_FILE_VARIABLE: str(path), "CAPKEEPER_SETTLE_TIME": "2"}
    loaded = load_settings({}, environ=environ, isolate=True)
    assert loaded == load_settings({}, environ=environ)
    child = settings_module._pending
    assert child is not None
    confirm_settings()
    assert settings_module._pending is None
    with pytest.raises(ChildProcessError):
        os.waitpid(child.pid, os.WNOHANG)  # reaped
    confirm_settings()  # nothing left: nothing to do


_REFUSING_CHILD = """
import os, sys
from capkeeper import settings
from capkeeper.errors import SettingsError
parent, real = os.getpid(), settings._validate_with_pydantic_settings
def validate(*args):
    if os.getpid() != parent:  # the child: a verdict the rules do not give
        raise SettingsError("invalid setting: refused by pydantic-settings only")
    return real(*args)
settings._validate_with_pydantic_settings = validate
"""


def test_a_verdict_of_the_child_only_is_raised_by_confirm(tmp_path: Path) -> None:
    path = _file(tmp_path / "settings.toml", FILE_TEXT)
    namespace: dict[str, object] = {}
    exec(_REFUSING_CHILD, namespace)  # noqa: S102 - the patch the subprocess test uses too
    try:
        load_settings({}, environ={SETTINGS_FILE_VARIABLE: str(path)}, isolate=True)
        with pytest.raises(SettingsError, match="refused by pydantic-settings only"):
            confirm_settings()
    finally:
        settings_module._validate_with_pydantic_settings = namespace["real"]  # type: ignore[assignment]
    assert settings_module._pending is None


def test_the_daemon_refused_by_the_child_only_exits_78_before_ready(
    tree: Path, tmp_path: Path
) -> None:
    """``capkeeper watch`` whose settings only pydantic-settings refuses: exit status 78
    with its text on stderr, and no READY=1 on the notify socket (the start-up reconcile
    ran meanwhile, with the rules' values)."""
    binary = make_binary(tree / "tool")
    setcap("cap_net_raw=ep", binary)
    state = tree.parent / "state.toml"
    state.write_text(f'[[binary]]\npath = "{binary}"\ncaps = "cap_net_raw=ep"\n')
    path = _file(tmp_path / "settings.toml", FILE_TEXT)
    notify = tmp_path / "notify.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(notify))
    code = _REFUSING_CHILD + (
        "from capkeeper.cli import main\n"
        f"sys.exit(main(['watch', '--state', {str(state)!r}, '--log-format', 'json']))\n"
    )
    env = {
        **os.environ,
        SETTINGS_FILE_VARIABLE: str(path),
        "NOTIFY_SOCKET": str(notify),
        "CAPKEEPER_CACHE_DIRECTORY": "",
    }
    try:
        result = subprocess.run(
            [sys.executable, "-c", code],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        listener.setblocking(False)
        sent = []
        while True:
            try:
                sent.append(listener.recv(4096).decode())
            except BlockingIOError:
                break
    finally:
        listener.close()
    assert result.returncode == 78, (result.returncode, result.stderr)
    assert "refused by pydantic-settings only" in result.stderr
    assert not any("READY=1" in message for message in sent), sent
