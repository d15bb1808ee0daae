"""Send structured entries to journald over its native protocol.

The protocol is documented in systemd's ``docs/JOURNAL_NATIVE_PROTOCOL.md``
(https://systemd.io/JOURNAL_NATIVE_PROTOCOL/): one ``AF_UNIX`` datagram
per entry on ``/run/systemd/journal/socket``, each field either ``KEY=value\\n``
or, for values holding a newline (and binary-safe for any value),
``KEY\\n<little-endian u64 length><value>\\n``. An entry too large for one
datagram goes into a sealed memfd whose descriptor is sent instead.

This stdlib-only sender replaces the ``systemd-python`` bindings, which need
libsystemd's headers and a C build for the same dozen lines.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import struct
from collections.abc import Iterable, Mapping
from typing import Any, TextIO

__all__ = [
    "JOURNAL_SOCKET",
    "JournalRenderer",
    "encode_entry",
    "field_name",
    "send",
    "stderr_is_journal",
    "valid_field_name",
]

JOURNAL_SOCKET = "/run/systemd/journal/socket"

_MAX_NAME = 64
_FIELD_NAME = re.compile(r"[A-Z][A-Z0-9_]{0,63}")
_INVALID_NAME_CHARS = re.compile(r"[^A-Z0-9_]")
_JOURNAL_STREAM = re.compile(r"([0-9]+):([0-9]+)")
_PREFIX = "CAPKEEPER_"

# sendto() on an AF_UNIX datagram socket fails with EMSGSIZE for a datagram
# larger than the send buffer, and may fail with ENOBUFS under memory pressure;
# sd_journal_sendv() answers both with the memfd fallback.
_FALLBACK_ERRNOS = frozenset({errno.EMSGSIZE, errno.ENOBUFS})
# journald takes an unsealed memfd only from root; sealed, from anyone.
_SEALS = fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE


def valid_field_name(name: str) -> bool:
    """Whether journald keeps a field of this name from a client.

    1 to 64 characters of ``A-Z``, ``0-9`` and ``_``, not starting with a
    digit or ``_`` (a leading ``_`` marks trusted fields only journald sets).
    journald silently drops a field whose name breaks these rules.
    """
    return _FIELD_NAME.fullmatch(name) is not None


def field_name(key: str) -> str:
    """The journald field name for a structlog key: ``"path"`` -> ``"CAPKEEPER_PATH"``.

    Upper-cased, every character outside ``A-Z0-9_`` replaced by ``_``,
    prefixed with ``CAPKEEPER_`` and cut to 64 characters; always valid.
    """
    return (_PREFIX + _INVALID_NAME_CHARS.sub("_", key.upper()))[:_MAX_NAME]


def encode_entry(fields: Iterable[tuple[str, str | bytes]]) -> bytes:
    """Serialise ``(name, value)`` pairs into one native-protocol entry.

    Strings are encoded as UTF-8, with lone surrogates (from undecodable file
    names) turned back into their original bytes. Names may repeat. Raises
    ``ValueError`` for a name journald would drop.
    """
    out = bytearray()
    for name, value in fields:
        if not valid_field_name(name):
            raise ValueError(
                f"invalid journal field name {name!r}: use 1-64 characters of A-Z, 0-9 "
                "and _, not starting with a digit or _"
            )
        data = value.encode("utf-8", "surrogateescape") if isinstance(value, str) else value
        key = name.encode("ascii")
        if b"\n" in data:
            out += key + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"
        else:
            out += key + b"=" + data + b"\n"
    return bytes(out)


def send(fields: Iterable[tuple[str, str | bytes]], *, socket_path: str = JOURNAL_SOCKET) -> None:
    """Send one entry to journald; raises ``OSError`` when it cannot be delivered.

    The entry goes in one datagram, or, when that is too large for the socket
    (``EMSGSIZE``) or the kernel is short of buffers (``ENOBUFS``), in a
    sealed memfd passed with ``SCM_RIGHTS``. A missing socket raises
    ``FileNotFoundError``, one nobody listens on ``ConnectionRefusedError``.
    """
    _send_payload(encode_entry(fields), socket_path)


def stderr_is_journal(environ: Mapping[str, str] | None = None, fd: int = 2) -> bool:
    """Whether ``fd`` (stderr) is the journald stream named in ``$JOURNAL_STREAM``.

    systemd sets ``JOURNAL_STREAM=<st_dev>:<st_ino>`` (decimal) for a service
    whose output goes to journald; it is inherited by children that may have
    redirected stderr, so the variable counts only when it matches ``fstat(fd)``.
    """
    value = (os.environ if environ is None else environ).get("JOURNAL_STREAM", "")
    match = _JOURNAL_STREAM.fullmatch(value)
    if match is None:
        return False
    try:
        st = os.fstat(fd)
    except OSError:
        return False
    return (st.st_dev, st.st_ino) == (int(match[1]), int(match[2]))


def _send_payload(payload: bytes, socket_path: str) -> None:
    """Send an encoded entry: one datagram, or the sealed-memfd fallback."""
    # Imported here: log.py imports this module for stderr_is_journal() on every run.
    import socket  # noqa: PLC0415

    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        try:
            sock.sendto(payload, socket_path)
        except OSError as exc:
            if exc.errno not in _FALLBACK_ERRNOS:
                raise
        else:
            return
        memfd = os.memfd_create("capkeeper-journal", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            with open(memfd, "wb", closefd=False) as file:
                file.write(payload)
            fcntl.fcntl(memfd, fcntl.F_ADD_SEALS, _SEALS)
            # An empty datagram carrying exactly one descriptor: journald ignores
            # a datagram with both a payload and a descriptor.
            rights = struct.pack("i", memfd)
            sock.sendmsg([], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, rights)], 0, socket_path)
        finally:
            os.close(memfd)


_LEVEL_PRIORITY = {"debug": 7, "info": 6, "notice": 5, "warning": 4, "error": 3, "critical": 2}


class JournalRenderer:
    """structlog's last processor under systemd: each event becomes one journal entry.

    ``MESSAGE`` is the event's sentence, ``PRIORITY`` and ``MESSAGE_ID`` come
    from the event registry (:mod:`capkeeper.events`), ``SYSLOG_IDENTIFIER`` is
    ``capkeeper`` and every other field is sent as ``CAPKEEPER_<KEY>``. When the
    journal socket cannot take the entry, the sentence is written to
    ``fallback`` (stderr) with a ``<N>`` priority prefix instead, so nothing is
    lost. The event is then dropped from structlog's own output.
    """

    def __init__(self, fallback: TextIO, *, socket_path: str = JOURNAL_SOCKET) -> None:
        self._fallback = fallback
        self.socket_path = socket_path

    def fields(self, method: str, event_dict: dict[str, Any]) -> list[tuple[str, str]]:
        data = dict(event_dict)
        event = str(data.pop("event", ""))
        level = str(data.pop("level", method))
        data.pop("timestamp", None)
        exc = data.pop("exception", None)
        # Imported here, like socket: see _send_payload.
        from capkeeper.events import render_message, spec_for  # noqa: PLC0415

        spec = spec_for(event)
        priority = int(spec.priority) if spec else _LEVEL_PRIORITY.get(level, 6)
        message = render_message(event, data)
        if exc:
            message = f"{message}\n{exc}"
        out = [
            ("MESSAGE", message),
            ("PRIORITY", str(priority)),
            ("SYSLOG_IDENTIFIER", "capkeeper"),
            ("CAPKEEPER_EVENT", event),
        ]
        if spec:
            out.append(("MESSAGE_ID", spec.message_id))
        out += [(field_name(key), str(value)) for key, value in data.items()]
        return out

    def __call__(self, _logger: Any, method: str, event_dict: dict[str, Any]) -> str:
        fields = self.fields(method, event_dict)
        try:
            send(fields, socket_path=self.socket_path)
        except OSError:
            priority = fields[1][1]
            self._fallback.write(f"<{priority}>{fields[0][1]}\n")
            self._fallback.flush()
        # Imported here: this module is imported to tell whether stderr is the journal,
        # before anything is logged (see capkeeper.log); structlog is loaded by now.
        import structlog  # noqa: PLC0415

        raise structlog.DropEvent
