"""The journald native-protocol sender, against real sockets and a real journald."""

from __future__ import annotations

import array
import errno
import fcntl
import os
import shlex
import socket
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from capkeeper.journal import (
    JOURNAL_SOCKET,
    encode_entry,
    field_name,
    send,
    stderr_is_journal,
    valid_field_name,
)
from tests.sandbox import SystemdSandbox

pytest_plugins = ["tests.sandbox_fixture"]

REPO = Path(__file__).resolve().parents[1]
ALL_SEALS = fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE


def _u64(n: int) -> bytes:
    return n.to_bytes(8, "little")


def _too_big_for_a_datagram() -> int:
    """An entry size above the default send buffer, so sendto() fails with EMSGSIZE."""
    wmem_default = int(Path("/proc/sys/net/core/wmem_default").read_text())
    return max(300_000, wmem_default + 4096)


# -- names ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["MESSAGE", "PRIORITY", "A", "OK_FIELD_9", "CAPKEEPER_PATH", "A" * 64, "X_1_"]
)
def test_valid_field_names(name: str) -> None:
    """Names journald keeps (reference 6.2) are valid, up to 64 characters."""
    assert valid_field_name(name)


@pytest.mark.parametrize(
    "name",
    [
        "",
        "lower",
        "Mixed",
        "_PRIVATE",
        "_PID",
        "_COMM",
        "1DIGIT",
        "A" * 65,
        "HAS-DASH",
        "HAS SPACE",
        "A=B",
        "MESSAGE\n",
        "ÄRGER",
    ],
)
def test_invalid_field_names(name: str) -> None:
    """Names journald drops (reference 6.2) are invalid: case, leading _ or digit, length."""
    assert not valid_field_name(name)


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("path", "CAPKEEPER_PATH"),
        ("expected-caps", "CAPKEEPER_EXPECTED_CAPS"),
        ("event", "CAPKEEPER_EVENT"),
        ("_private", "CAPKEEPER__PRIVATE"),
        ("9lives", "CAPKEEPER_9LIVES"),
        ("état", "CAPKEEPER__TAT"),
        ("a.b c", "CAPKEEPER_A_B_C"),
        ("", "CAPKEEPER_"),
        ("k" * 100, "CAPKEEPER_" + "K" * 54),
    ],
)
def test_field_name_maps_structlog_keys(key: str, expected: str) -> None:
    """Keys are upper-cased, invalid characters become _, prefixed and cut to 64."""
    assert field_name(key) == expected


@given(st.text())
def test_field_name_is_always_valid(key: str) -> None:
    """Whatever the key, the mapped name is one journald keeps."""
    name = field_name(key)
    assert valid_field_name(name)
    assert name.startswith("CAPKEEPER_")


# -- encoding ------------------------------------------------------------------


def test_encode_plain_fields() -> None:
    """Values without a newline use KEY=value lines, in order, repeats kept."""
    entry = encode_entry(
        [("MESSAGE", "hello = world"), ("PRIORITY", "6"), ("TAG", ""), ("TAG", "b")]
    )
    assert entry == b"MESSAGE=hello = world\nPRIORITY=6\nTAG=\nTAG=b\n"


def test_encode_newline_value_uses_the_length_form() -> None:
    """A value with a newline is KEY, newline, u64 little-endian length, bytes, newline."""
    assert encode_entry([("MESSAGE", "line 1\nline 2")]) == (
        b"MESSAGE\n" + _u64(13) + b"line 1\nline 2\n"
    )


def test_encode_binary_and_undecodable_values() -> None:
    """Bytes pass through; lone surrogates from os.fsdecode become their original bytes."""
    assert encode_entry([("BLOB", b"a\0b\nc")]) == b"BLOB\n" + _u64(5) + b"a\0b\nc\n"
    assert encode_entry([("CAPKEEPER_PATH", "/opt/\udcff")]) == b"CAPKEEPER_PATH=/opt/\xff\n"
    assert encode_entry([("MESSAGE", "é")]) == b"MESSAGE=\xc3\xa9\n"


def test_encode_rejects_an_invalid_name() -> None:
    """An invalid name raises ValueError naming it and the rule."""
    with pytest.raises(ValueError, match="invalid journal field name") as info:
        encode_entry([("MESSAGE", "kept"), ("lower", "x")])
    assert str(info.value) == (
        "invalid journal field name 'lower': use 1-64 characters of A-Z, 0-9 and _, "
        "not starting with a digit or _"
    )


# -- a local datagram socket ----------------------------------------------------


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """An AF_UNIX datagram socket bound in tmp_path, standing in for journald."""
    path = str(tmp_path / "journal.sock")
    assert len(path) < 108, "sun_path holds 108 bytes"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        sock.settimeout(5)
        yield sock, path


def _receive(sock: socket.socket) -> tuple[bytes, list[int]]:
    """One datagram and the descriptors that came with it (the caller closes them)."""
    fds = array.array("i")
    data, ancdata, flags, _addr = sock.recvmsg(1 << 20, socket.CMSG_SPACE(4 * fds.itemsize))
    assert not flags & socket.MSG_CTRUNC
    for level, kind, payload in ancdata:
        assert (level, kind) == (socket.SOL_SOCKET, socket.SCM_RIGHTS)
        fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
    return data, list(fds)


def _read_memfd(fd: int) -> tuple[bytes, int]:
    """The contents and the seals of a received memfd; closes it."""
    try:
        size = os.fstat(fd).st_size
        return os.pread(fd, size, 0), fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    finally:
        os.close(fd)


def test_send_one_datagram(listener: tuple[socket.socket, str]) -> None:
    """A small entry arrives as one datagram holding exactly the encoded fields."""
    sock, path = listener
    fields = [("MESSAGE", "two\nlines"), ("PRIORITY", "5"), ("CAPKEEPER_PATH", "/usr/bin/ping")]
    send(fields, socket_path=path)
    data, fds = _receive(sock)
    assert fds == []
    assert data == encode_entry(fields)


def test_send_large_entry_via_sealed_memfd(listener: tuple[socket.socket, str]) -> None:
    """An entry larger than a datagram arrives as an empty datagram with one sealed memfd."""
    sock, path = listener
    fields: list[tuple[str, str | bytes]] = [
        ("MESSAGE", "big"),
        ("CAPKEEPER_BLOB", b"x" * _too_big_for_a_datagram()),
    ]
    send(fields, socket_path=path)
    data, fds = _receive(sock)
    assert data == b""
    assert len(fds) == 1
    content, seals = _read_memfd(fds[0])
    assert content == encode_entry(fields)
    assert seals == ALL_SEALS


def test_send_falls_back_on_enobufs(
    listener: tuple[socket.socket, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """ENOBUFS from sendto() also takes the memfd path."""
    sock, path = listener

    def no_buffers(*_args: object) -> int:
        raise OSError(errno.ENOBUFS, os.strerror(errno.ENOBUFS))

    monkeypatch.setattr(socket.socket, "sendto", no_buffers)
    send([("MESSAGE", "small")], socket_path=path)
    data, fds = _receive(sock)
    assert data == b""
    assert [_read_memfd(fd) for fd in fds] == [(b"MESSAGE=small\n", ALL_SEALS)]


def test_send_reraises_other_errors(
    listener: tuple[socket.socket, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Any other errno from sendto() propagates and nothing is sent."""
    sock, path = listener

    def would_block(*_args: object) -> int:
        raise OSError(errno.EAGAIN, os.strerror(errno.EAGAIN))

    monkeypatch.setattr(socket.socket, "sendto", would_block)
    with pytest.raises(BlockingIOError):
        send([("MESSAGE", "lost")], socket_path=path)
    sock.setblocking(False)
    with pytest.raises(BlockingIOError):
        sock.recv(1024)


def test_send_raises_when_no_journal_listens(tmp_path: Path) -> None:
    """A missing socket raises FileNotFoundError; a stale socket file, ConnectionRefusedError."""
    with pytest.raises(FileNotFoundError):
        send([("MESSAGE", "x")], socket_path=str(tmp_path / "absent.sock"))
    stale = str(tmp_path / "stale.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(stale)
    with pytest.raises(ConnectionRefusedError):
        send([("MESSAGE", "x")], socket_path=stale)


def test_send_rejects_invalid_names_before_sending(listener: tuple[socket.socket, str]) -> None:
    """An invalid name raises ValueError and no datagram is sent."""
    sock, path = listener
    with pytest.raises(ValueError, match="'_PID'"):
        send([("MESSAGE", "x"), ("_PID", "1")], socket_path=path)
    sock.setblocking(False)
    with pytest.raises(BlockingIOError):
        sock.recv(1024)


def test_default_socket_path() -> None:
    """The default is journald's native socket."""
    assert JOURNAL_SOCKET == "/run/systemd/journal/socket"


# -- JOURNAL_STREAM --------------------------------------------------------------


def test_journal_stream_matching_fstat(tmp_path: Path) -> None:
    """JOURNAL_STREAM equal to fstat(fd)'s st_dev:st_ino means the fd is the journal stream."""
    with open(tmp_path / "stream", "w") as stream:
        st = os.fstat(stream.fileno())
        env = {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        assert stderr_is_journal(env, fd=stream.fileno())
        other = {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino + 1}"}
        assert not stderr_is_journal(other, fd=stream.fileno())


def test_journal_stream_from_the_process_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without an explicit mapping the process environment is read."""
    with open(tmp_path / "stream", "w") as stream:
        st = os.fstat(stream.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
        assert stderr_is_journal(fd=stream.fileno())
        monkeypatch.delenv("JOURNAL_STREAM")
        assert not stderr_is_journal(fd=stream.fileno())


@pytest.mark.parametrize(
    "value", ["", "abc", "1", "1:", ":2", "1:2:3", "-1:2", "0x9:28307", "9:28307\n", "\uff19:1"]
)
def test_journal_stream_malformed(value: str) -> None:
    """A malformed JOURNAL_STREAM never matches."""
    assert not stderr_is_journal({"JOURNAL_STREAM": value})


def test_journal_stream_closed_fd() -> None:
    """A descriptor that is not open never matches."""
    fd = os.open(os.devnull, os.O_RDONLY)
    st = os.fstat(fd)
    os.close(fd)
    env = {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
    assert not stderr_is_journal(env, fd=fd)


# -- the real journald in the sandbox --------------------------------------------


def _python_inside(sandbox: SystemdSandbox, code: str) -> str:
    """Run Python code inside the sandbox with this checkout importable; return stdout."""
    prelude = f"import sys; sys.path.insert(0, {str(REPO)!r})\n"
    return sandbox.run(sys.executable, "-I", "-c", prelude + code).stdout


def _only_entry(sandbox: SystemdSandbox, test_id: str) -> dict[str, object]:
    entries = sandbox.journal(f"CAPKEEPER_TEST_ID={test_id}")
    assert len(entries) == 1, entries
    return entries[0]


@pytest.mark.sandbox
def test_entry_lands_in_journald(systemd_sandbox: SystemdSandbox) -> None:
    """send() inside the sandbox stores every field, a multi-line MESSAGE and binary data."""
    test_id = uuid.uuid4().hex
    message_id = uuid.uuid4().hex
    _python_inside(
        systemd_sandbox,
        "from capkeeper.journal import send\n"
        "send([\n"
        "    ('MESSAGE', 'capability_restored\\nsecond line'),\n"
        "    ('PRIORITY', '5'),\n"
        "    ('SYSLOG_IDENTIFIER', 'capkeeper'),\n"
        f"    ('MESSAGE_ID', {message_id!r}),\n"
        "    ('CAPKEEPER_PATH', '/usr/bin/ping'),\n"
        "    ('CAPKEEPER_BLOB', b'a\\0b\\nc'),\n"
        f"    ('CAPKEEPER_TEST_ID', {test_id!r}),\n"
        "])\n",
    )
    entry = _only_entry(systemd_sandbox, test_id)
    assert entry["MESSAGE"] == "capability_restored\nsecond line"
    assert entry["PRIORITY"] == "5"
    assert entry["SYSLOG_IDENTIFIER"] == "capkeeper"
    assert entry["MESSAGE_ID"] == message_id
    assert entry["CAPKEEPER_PATH"] == "/usr/bin/ping"
    assert entry["CAPKEEPER_BLOB"] == [97, 0, 98, 10, 99]
    assert entry["_TRANSPORT"] == "journal"


@pytest.mark.sandbox
def test_journald_drops_invalid_fields_and_keeps_the_rest(
    systemd_sandbox: SystemdSandbox,
) -> None:
    """Fields with names journald refuses are dropped one by one; the entry is stored."""
    test_id = uuid.uuid4().hex
    _python_inside(
        systemd_sandbox,
        "from capkeeper.journal import JOURNAL_SOCKET, _send_payload, encode_entry\n"
        f"valid = encode_entry([('MESSAGE', 'kept'), ('CAPKEEPER_TEST_ID', {test_id!r}),"
        " ('OK_FIELD_9', 'yes'), ('A' * 64, 'long')])\n"
        "invalid = b'lower=x\\nHAS-DASH=x\\n_PRIVATE=x\\n_PID=1\\n1DIGIT=x\\n'\n"
        "invalid += b'B' * 65 + b'=x\\n'\n"
        "_send_payload(valid + invalid, JOURNAL_SOCKET)\n",
    )
    entry = _only_entry(systemd_sandbox, test_id)
    assert entry["MESSAGE"] == "kept"
    assert entry["OK_FIELD_9"] == "yes"
    assert entry["A" * 64] == "long"
    for dropped in ("lower", "HAS-DASH", "_PRIVATE", "1DIGIT", "B" * 65):
        assert dropped not in entry
    assert entry["_PID"] != "1"  # journald's own, not the client's


@pytest.mark.sandbox
def test_large_entry_reaches_journald_via_memfd(systemd_sandbox: SystemdSandbox) -> None:
    """An entry too big for a datagram is stored whole through the sealed memfd."""
    test_id = uuid.uuid4().hex
    size = _too_big_for_a_datagram()
    _python_inside(
        systemd_sandbox,
        "from capkeeper.journal import send\n"
        f"send([('MESSAGE', 'big'), ('CAPKEEPER_TEST_ID', {test_id!r}),"
        f" ('CAPKEEPER_BLOB', 'y' * {size})])\n",
    )
    entry = _only_entry(systemd_sandbox, test_id)
    assert entry["MESSAGE"] == "big"
    assert entry["CAPKEEPER_BLOB"] == "y" * size


@pytest.mark.sandbox
@pytest.mark.parametrize(("redirect", "expected"), [("", "yes"), ("2>/dev/null", "no")])
def test_stderr_is_journal_in_a_service(
    systemd_sandbox: SystemdSandbox, redirect: str, expected: str
) -> None:
    """In a service logging to journald it is true; with stderr redirected, false."""
    unit = f"capkeeper-stream-{uuid.uuid4().hex[:12]}.service"
    code = (
        f"import sys; sys.path.insert(0, {str(REPO)!r}); "
        "from capkeeper.journal import stderr_is_journal; "
        "print('stream=' + ('yes' if stderr_is_journal() else 'no'))"
    )
    command = f"{shlex.join([sys.executable, '-I', '-c', code])} {redirect}"
    systemd_sandbox.run(
        "systemd-run",
        "--wait",
        "--quiet",
        f"--unit={unit}",
        "-p",
        "StandardOutput=journal",
        "-p",
        "StandardError=journal",
        "sh",
        "-c",
        command,
    )
    messages = [e["MESSAGE"] for e in systemd_sandbox.journal(f"_SYSTEMD_UNIT={unit}")]
    assert messages == [f"stream={expected}"]
