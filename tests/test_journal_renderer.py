"""The structlog -> journald renderer: fields, priorities, ids, and the stderr fallback."""

from __future__ import annotations

import io
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from capkeeper.events import EVENTS, render_message
from capkeeper.journal import JournalRenderer
from capkeeper.log import ConsoleRenderer, configure, get_logger


@pytest.fixture
def journal_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    path = str(tmp_path / "journal.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(2)
    try:
        yield sock, path
    finally:
        sock.close()


def _fields(datagram: bytes) -> dict[str, str]:
    out = {}
    for line in datagram.decode().splitlines():
        key, _, value = line.partition("=")
        out[key] = value
    return out


def test_restore_event_becomes_a_journal_entry(journal_socket: tuple[socket.socket, str]) -> None:
    """A restore is PRIORITY=4 with its MESSAGE_ID and CAPKEEPER_* fields."""
    sock, path = journal_socket
    renderer = JournalRenderer(io.StringIO(), socket_path=path)
    with pytest.raises(structlog.DropEvent):
        renderer(
            None,
            "warning",
            {
                "event": "capability_restored",
                "level": "warning",
                "timestamp": "2026-11-28T00:00:00Z",
                "path": "/usr/bin/x",
                "expected": "cap_net_raw=ep",
                "found": "none",
                "cause": "IN_MOVED_TO",
            },
        )
    fields = _fields(sock.recv(65536))
    assert fields == {
        "MESSAGE": "restored capabilities of /usr/bin/x: found none, expected cap_net_raw=ep "
        "(cause: IN_MOVED_TO)",
        "PRIORITY": "4",
        "SYSLOG_IDENTIFIER": "capkeeper",
        "CAPKEEPER_EVENT": "capability_restored",
        "MESSAGE_ID": EVENTS["capability_restored"].message_id,
        "CAPKEEPER_PATH": "/usr/bin/x",
        "CAPKEEPER_EXPECTED": "cap_net_raw=ep",
        "CAPKEEPER_FOUND": "none",
        "CAPKEEPER_CAUSE": "IN_MOVED_TO",
    }


@pytest.mark.parametrize(
    ("event", "level", "priority"),
    [
        ("restore_refused", "critical", "2"),
        ("capability_tampering", "critical", "2"),
        ("restore_failed", "error", "3"),
        ("state_loaded", "info", "6"),
        ("capability_in_sync", "debug", "7"),  # unregistered: priority from the level
    ],
)
def test_priorities(
    journal_socket: tuple[socket.socket, str], event: str, level: str, priority: str
) -> None:
    """Refusals and tampering are critical, failures errors, routine info/debug."""
    sock, path = journal_socket
    with pytest.raises(structlog.DropEvent):
        JournalRenderer(io.StringIO(), socket_path=path)(None, level, {"event": event})
    assert _fields(sock.recv(65536))["PRIORITY"] == priority


def test_no_journal_falls_back_to_stderr(tmp_path: Path) -> None:
    """Without a journal socket the sentence goes to stderr with a <N> prefix."""
    fallback = io.StringIO()
    renderer = JournalRenderer(fallback, socket_path=str(tmp_path / "absent.sock"))
    with pytest.raises(structlog.DropEvent):
        renderer(None, "critical", {"event": "restore_refused", "path": "/x", "reason": "r"})
    assert fallback.getvalue() == "<2>refused to grant capabilities to /x: r\n"


def test_configure_journal_format_sends_events(journal_socket: tuple[socket.socket, str]) -> None:
    """log.configure('journal') routes structlog events through the renderer."""
    sock, path = journal_socket
    stream = io.StringIO()
    assert configure("journal", "info", stream=stream) == "journal"
    logger = structlog.get_config()["processors"][-1]
    assert isinstance(logger, JournalRenderer)
    logger.socket_path = path
    get_logger().warning("capability_drift", path="/y", expected="=", found="none")
    assert (
        _fields(sock.recv(65536))["MESSAGE"] == "capabilities of /y drifted: found none, expected ="
    )
    assert stream.getvalue() == ""
    configure("json", "info", stream=io.StringIO())


def test_sentences_escape_untrusted_names(tmp_path: Path) -> None:
    """Console lines and MESSAGE= show a name's newline escaped; CAPKEEPER_PATH keeps it exact."""
    event = {
        "event": "restore_refused",
        "level": "critical",
        "timestamp": "2026-11-28T12:34:56Z",
        "path": "/opt/evil\nfake \u202e",
        "reason": "r",
    }
    sentence = "refused to grant capabilities to /opt/evil\\nfake \\u202e: r"
    assert ConsoleRenderer()(None, "critical", dict(event)) == f"12:34:56 critical {sentence}"
    renderer = JournalRenderer(io.StringIO(), socket_path=str(tmp_path / "absent.sock"))
    fields = dict(renderer.fields("critical", dict(event)))
    assert fields["MESSAGE"] == sentence
    assert fields["CAPKEEPER_PATH"] == "/opt/evil\nfake \u202e"
    assert render_message("routine", {"path": "/a\nb"}) == "routine path=/a\\nb"
