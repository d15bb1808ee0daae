"""sd_notify: real AF_UNIX datagram sockets, and failures that are logged, not swallowed."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog
from structlog.testing import capture_logs

from capkeeper.notify import Notifier, watchdog_interval


@pytest.fixture
def receiver(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """A datagram socket bound in tmp_path and named by NOTIFY_SOCKET."""
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(2)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    yield sock
    sock.close()


def test_watchdog_interval_follows_sd_watchdog_enabled() -> None:
    """Half of WATCHDOG_USEC, only when WATCHDOG_PID is unset or ours; otherwise none."""
    assert watchdog_interval({"WATCHDOG_USEC": "30000000"}, 42) == 15.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "42"}, 42) == 15.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "7"}, 42) is None
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "x"}, 42) is None
    assert watchdog_interval({"WATCHDOG_USEC": "0"}, 42) is None
    assert watchdog_interval({"WATCHDOG_USEC": "soon"}, 42) is None
    assert watchdog_interval({}, 42) is None


def test_messages_reach_the_socket(receiver: socket.socket) -> None:
    """READY/STATUS, RELOADING with MONOTONIC_USEC, STOPPING and WATCHDOG arrive as sent."""
    notifier = Notifier(structlog.get_logger())
    assert notifier.enabled
    assert notifier.ready("watching 3 binaries\nin 2 directories")
    assert receiver.recv(4096) == b"READY=1\nSTATUS=watching 3 binaries in 2 directories"
    assert notifier.reloading()
    reloading = receiver.recv(4096).decode().split("\n")
    assert reloading[0] == "RELOADING=1"
    assert reloading[1].startswith("MONOTONIC_USEC=")
    assert int(reloading[1].split("=")[1]) > 0
    assert notifier.stopping()
    assert receiver.recv(4096) == b"STOPPING=1"
    assert notifier.watchdog()
    assert receiver.recv(4096) == b"WATCHDOG=1"
    notifier.close()
    assert not notifier.enabled


def test_status_is_sent_as_utf8(receiver: socket.socket) -> None:
    """A status naming a non-Latin-1 path arrives as UTF-8 (sdnotify alone would fail)."""
    notifier = Notifier(structlog.get_logger())
    assert notifier.status("last drift /opt/サーバ/bin/x restored")
    assert receiver.recv(4096).decode("utf-8") == "STATUS=last drift /opt/サーバ/bin/x restored"
    notifier.close()


def test_abstract_socket_address(monkeypatch: pytest.MonkeyPatch) -> None:
    """NOTIFY_SOCKET=@name reaches a Linux abstract socket."""
    name = f"capkeeper-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(2)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        notifier = Notifier(structlog.get_logger())
        assert notifier.ready()
        assert sock.recv(4096) == b"READY=1"
        notifier.close()


def test_unreachable_socket_is_logged_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A socket that does not exist: sd_notify_failed logged once, sends report False."""
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "absent.sock"))
    with capture_logs() as logs:
        notifier = Notifier(structlog.get_logger())
        assert not notifier.ready()
        assert not notifier.watchdog()
        notifier.close()
    assert [e["event"] for e in logs] == ["sd_notify_failed"]
    assert logs[0]["log_level"] == "warning"
    assert "FileNotFoundError" in logs[0]["error"]


def test_failed_sends_are_logged_once_then_recover(receiver: socket.socket, tmp_path: Path) -> None:
    """The manager's socket gone: logged once, not per send; re-created: reconnect, recovered."""
    notifier = Notifier(structlog.get_logger())
    assert notifier.ready()
    receiver.close()
    with capture_logs() as logs:
        results = [notifier.watchdog() for _ in range(5)]
        assert results == [False] * 5
        (tmp_path / "notify.sock").unlink()
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as again:
            again.bind(str(tmp_path / "notify.sock"))
            again.settimeout(2)
            assert notifier.watchdog()
            assert again.recv(4096) == b"WATCHDOG=1"
        notifier.close()
    assert [e["event"] for e in logs] == ["sd_notify_failed", "sd_notify_recovered"]
    assert logs[0]["message"] == "WATCHDOG"
    assert "ConnectionRefusedError" in logs[0]["error"]


def test_unsupported_address_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    """A vsock: (or other non-AF_UNIX) NOTIFY_SOCKET is reported, not silently ignored."""
    monkeypatch.setenv("NOTIFY_SOCKET", "vsock:2:1234")
    with capture_logs() as logs:
        notifier = Notifier(structlog.get_logger())
        assert not notifier.ready()
    assert logs[0]["event"] == "sd_notify_failed"
    assert "unsupported NOTIFY_SOCKET address" in logs[0]["error"]


def test_without_notify_socket_nothing_is_sent(monkeypatch: pytest.MonkeyPatch) -> None:
    """Not started by systemd: notifications are no-ops, and nothing is logged."""
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    with capture_logs() as logs:
        notifier = Notifier(structlog.get_logger())
        assert not notifier.enabled
        assert not notifier.ready("x")
        notifier.close()
    assert logs == []
