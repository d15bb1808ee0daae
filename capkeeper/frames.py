"""Messages between capkeeper and the processes it forks, over private pipes.

A message is plain data (tuples, lists, dicts, strings, numbers, bytes, None)
in :mod:`marshal` form, framed by its length. :mod:`marshal` builds only the
built-in types it stores (code objects among them, which it never runs: the
reader checks the type of everything it takes), and the pipes are made before
the fork and known to no one else.
"""

from __future__ import annotations

import marshal
import os
import select
import struct
from typing import Any

_FRAME = struct.Struct("<I")


def send(fd: int, message: Any) -> None:
    """Write ``message`` to ``fd`` as one frame (blocking until all of it is written)."""
    data = marshal.dumps(message)
    view = memoryview(_FRAME.pack(len(data)) + data)
    while view:
        view = view[os.write(fd, view) :]


def _read_exactly(fd: int, size: int) -> bytes:
    chunks = []
    while size:
        chunk = os.read(fd, min(size, 1 << 20))
        if not chunk:
            raise EOFError
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


class Garbled(ValueError):
    """A whole frame whose bytes are no marshal data (the stream is still in step)."""


def receive(fd: int) -> Any:
    """The next message on ``fd``; EOFError when the writer closed it first (mid-frame
    included), :class:`Garbled` when a whole frame does not unmarshal."""
    (size,) = _FRAME.unpack(_read_exactly(fd, _FRAME.size))
    return _unmarshal(_read_exactly(fd, size))


def _unmarshal(data: bytes) -> Any:
    """The message of one whole frame; :class:`Garbled` if its bytes do not unmarshal."""
    try:
        # The bytes come from our own forked process over a private pipe.
        return marshal.loads(data)  # noqa: S302
    except (EOFError, ValueError, TypeError) as exc:  # marshal's own EOFError: short data
        raise Garbled(f"{len(data)} bytes that do not unmarshal ({exc})") from None


class Reader:
    """:func:`receive` for one pipe, a buffer at a time: a burst of small frames (the
    start-up helper sends each restore at once) costs one ``read(2)``, not two a frame."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._data = b""
        self._at = 0  # where the next frame starts in _data

    def ready(self) -> bool:
        """Whether a whole frame is buffered already: :meth:`receive` will not read."""
        return self._end() is not None

    def wait(self, timeout: float) -> bool:
        """Whether :meth:`receive` has something to read, within ``timeout`` seconds: a
        buffered frame, or the pipe readable (more data, or its end)."""
        return self.ready() or bool(select.select([self.fd], [], [], timeout)[0])

    def _end(self) -> int | None:
        data, at = self._data, self._at
        if len(data) - at < _FRAME.size:
            return None
        (size,) = _FRAME.unpack_from(data, at)
        end = at + _FRAME.size + size
        return end if end <= len(data) else None

    def receive(self) -> Any:
        """The next message, as :func:`receive` gives it (reading, and blocking, only
        while no whole frame is buffered)."""
        while (end := self._end()) is None:
            chunk = os.read(self.fd, 1 << 20)
            if not chunk:
                raise EOFError  # the writer closed it, mid-frame or between frames
            self._data = self._data[self._at :] + chunk
            self._at = 0
        start, self._at = self._at + _FRAME.size, end
        return _unmarshal(self._data[start:end])
