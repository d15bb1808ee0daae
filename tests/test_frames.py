"""Framed marshal messages over real pipes: ``receive`` and the buffered ``Reader``."""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from capkeeper.frames import _FRAME, Garbled, Reader, receive, send

MESSAGES = [("records", [(9, ("restored", "x"))]), ("end", None), b"\x00" * 70000, 7, "é"]


@pytest.fixture
def pipe() -> Iterator[tuple[int, int]]:
    read_end, write_end = os.pipe()
    yield read_end, write_end
    for fd in (read_end, write_end):
        with contextlib.suppress(OSError):  # a test closed it already
            os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _written(messages: list[Any], read: Callable[[int], Any]) -> list[Any]:
    """``messages`` sent by a writer thread over a fresh pipe, as ``read`` reads them."""
    read_end, write_end = os.pipe()
    try:

        def write() -> None:
            for message in messages:
                send(write_end, message)

        writer = threading.Thread(target=write)
        writer.start()
        got = [read(read_end) for _ in messages]
        writer.join()
        return got
    finally:
        os.close(read_end)
        os.close(write_end)


def test_the_reader_gives_what_receive_gives_in_order() -> None:
    """Frames larger than a pipe's buffer among small ones, written while they are read:
    the same messages, in order, as receive() reads them (each reader on its own pipe:
    the Reader reads ahead of the frame it returns)."""
    messages = MESSAGES * 3
    reader: Reader | None = None

    def buffered(fd: int) -> Any:
        nonlocal reader
        reader = reader or Reader(fd)
        return reader.receive()

    assert _written(messages, buffered) == _written(messages, receive) == messages


def test_a_burst_of_frames_is_one_read(pipe: tuple[int, int]) -> None:
    read_end, write_end = pipe
    for number in range(100):
        send(write_end, ("records", [(number, "in-sync")]))
    reader = Reader(read_end)
    assert not reader.ready()  # nothing read yet
    assert reader.receive() == ("records", [(0, "in-sync")])
    os.close(write_end)
    # Every other frame came with the first read: none needs the (now closed) pipe.
    for number in range(1, 100):
        assert reader.ready()
        assert reader.receive() == ("records", [(number, "in-sync")])
    assert not reader.ready()
    with pytest.raises(EOFError):
        reader.receive()


def test_a_frame_split_across_writes_waits_for_its_rest(pipe: tuple[int, int]) -> None:
    read_end, write_end = pipe
    data = _FRAME.pack(5) + b"\xe9" + (5).to_bytes(4, "little")  # marshal of int 5 is 5 bytes
    first, rest = data[:3], data[3:]
    _write_all(write_end, first)
    reader = Reader(read_end)
    timer = threading.Timer(0.2, _write_all, (write_end, rest))
    timer.start()
    assert reader.receive() == 5
    timer.join()


def test_the_end_of_the_pipe_mid_frame_is_eof(pipe: tuple[int, int]) -> None:
    read_end, write_end = pipe
    send(write_end, "whole")
    _write_all(write_end, _FRAME.pack(100) + b"short")
    os.close(write_end)
    reader = Reader(read_end)
    assert reader.receive() == "whole"
    assert not reader.ready()
    with pytest.raises(EOFError):
        reader.receive()


def test_a_garbled_frame_leaves_the_stream_in_step(pipe: tuple[int, int]) -> None:
    read_end, write_end = pipe
    _write_all(write_end, _FRAME.pack(3) + b"\xff\xff\xff")  # no marshal type 0xff
    send(write_end, "after")
    reader = Reader(read_end)
    with pytest.raises(Garbled, match="3 bytes that do not unmarshal"):
        reader.receive()
    assert reader.receive() == "after"
