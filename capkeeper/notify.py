"""sd_notify for the daemon: READY, RELOADING, STOPPING, STATUS and WATCHDOG.

Sent through ``sdnotify``'s public API: a ``sdnotify.SystemdNotifier(debug=True)``
per connection (``debug=True`` makes it raise instead of swallowing errors) and
its ``notify()``. A message that cannot be sent is logged as
``sd_notify_failed``, once per distinct error until a send succeeds again, and
never stops the daemon. Without ``$NOTIFY_SOCKET`` (not started by systemd)
every call is a no-op.

What this module adds around sdnotify 0.3.2, and why:

- The address is checked first: sdnotify hands any ``$NOTIFY_SOCKET`` to an
  ``AF_UNIX`` ``connect()``, so a ``vsock:`` address would be reported as a
  missing file; here it is reported as unsupported.
- Its socket is blocking, and it takes no timeout: a manager that stops
  reading would block the daemon in ``sendall()``. The notifier's public
  ``socket`` attribute is set non-blocking right after it connects, so a full
  receive queue fails the send (``EAGAIN``) and is logged instead.
- On a failed ``connect()`` its constructor drops its socket without closing
  it; CPython closes it at once (reference count) and warns ``ResourceWarning``:
  that one warning is silenced around the constructor (no descriptor leaks).
- It encodes the message as Latin-1: the UTF-8 bytes are handed to it as
  Latin-1 text, so a status naming any path arrives as UTF-8.
- ``ECONNREFUSED``/``ENOTCONN`` (the manager's socket was re-created): a new
  notifier is connected, once per send.

Facts (sd_notify(3)): one ``AF_UNIX`` datagram of newline-separated
``KEY=VALUE``; ``RELOADING=1`` must be followed by ``READY=1``; the watchdog
wants ``WATCHDOG=1`` at half of ``$WATCHDOG_USEC``, and only when
``$WATCHDOG_PID`` is unset or names this process.
"""

from __future__ import annotations

import errno
import os
import time
import warnings
from collections.abc import Mapping
from typing import Any

import sdnotify


def watchdog_interval(environ: Mapping[str, str], pid: int) -> float | None:
    """Seconds between ``WATCHDOG=1`` pings, or None when systemd wants none from us."""
    raw = environ.get("WATCHDOG_USEC", "")
    owner = environ.get("WATCHDOG_PID", "")
    if owner:
        try:
            if int(owner) != pid:
                return None
        except ValueError:
            return None
    try:
        usec = int(raw)
    except ValueError:
        return None
    if usec <= 0:
        return None
    return usec / 2 / 1_000_000


def _connect(address: str) -> sdnotify.SystemdNotifier:
    """A non-blocking sdnotify notifier connected to ``address`` (``$NOTIFY_SOCKET``)."""
    if not address.startswith(("/", "@")):
        raise OSError(errno.EAFNOSUPPORT, f"unsupported NOTIFY_SOCKET address {address!r}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)  # see the module docstring
        client = sdnotify.SystemdNotifier(debug=True)
    client.socket.setblocking(False)
    return client


def _status_line(text: str) -> str:
    return " ".join(text.split())  # STATUS= is one line


class Notifier:
    """Talks to the service manager named by ``$NOTIFY_SOCKET`` (read at creation)."""

    def __init__(self, logger: Any) -> None:
        self._logger = logger
        self._last_error: str | None = None
        self.watchdog_interval = watchdog_interval(os.environ, os.getpid())
        self.socket_path = os.environ.get("NOTIFY_SOCKET") or None
        self._client: sdnotify.SystemdNotifier | None = None
        if self.socket_path is None:
            return
        try:
            self._client = _connect(self.socket_path)
        except OSError as exc:
            self._failed("connect", exc)

    @property
    def enabled(self) -> bool:
        return self._client is not None

    def close(self) -> None:
        if self._client is not None:
            self._client.socket.close()
            self._client = None

    def send(self, *assignments: str) -> bool:
        """Send ``KEY=VALUE`` assignments in one datagram; False when not sent."""
        if self._client is None:
            return False
        payload = "\n".join(assignments)
        # sdnotify encodes with latin-1; hand it the UTF-8 bytes that way.
        data = payload.encode("utf-8").decode("latin-1")
        try:
            try:
                self._client.notify(data)
            except OSError as exc:
                if exc.errno not in (errno.ECONNREFUSED, errno.ENOTCONN):
                    raise
                # The manager's socket went away or was re-created: connect again, once
                # (a failure reports why the connect failed, the same at every retry).
                self._reconnect()
                self._client.notify(data)
        except Exception as exc:  # any failure is reported, none is fatal
            self._failed(payload.split("=", 1)[0], exc)
            return False
        if self._last_error is not None:
            self._logger.info("sd_notify_recovered", socket=self.socket_path)
            self._last_error = None
        return True

    def _reconnect(self) -> None:
        if self._client is None or self.socket_path is None:
            raise OSError(errno.ENOTCONN, "not connected")
        fresh = _connect(self.socket_path)
        self._client.socket.close()
        self._client = fresh

    def _failed(self, what: str, exc: BaseException) -> None:
        error = f"{exc.__class__.__name__}: {exc}"
        if error != self._last_error:
            self._logger.warning(
                "sd_notify_failed", socket=self.socket_path, message=what, error=error
            )
        self._last_error = error

    def ready(self, status: str | None = None) -> bool:
        return self.send("READY=1", *([f"STATUS={_status_line(status)}"] if status else []))

    def reloading(self) -> bool:
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.send("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def stopping(self, status: str | None = None) -> bool:
        return self.send("STOPPING=1", *([f"STATUS={_status_line(status)}"] if status else []))

    def status(self, text: str) -> bool:
        return self.send(f"STATUS={_status_line(text)}")

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")
