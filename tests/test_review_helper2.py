"""Adversarial review, second pass, of the start-up helper after its fixes (issue 11).

Each test states what must hold and fails on the code as reviewed (34364f2). Real
files, real capabilities, a real fork; fault injection only where the OS will not
produce the fault on demand (a helper bug in one message, a process SIGKILL does not
end at once because it is stuck in the kernel).
"""

from __future__ import annotations

import marshal
import os
import signal
import struct
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import structlog
from structlog.testing import capture_logs

import capkeeper.frames
import capkeeper.helper as helper_module
import capkeeper.keeper as keeper_module
from capkeeper.daemon import Daemon
from capkeeper.helper import Helper
from capkeeper.settings import Settings
from tests.conftest import make_binary, setcap
from tests.test_daemon import write_state
from tests.test_review_helper import DECLARED, _silent_restores, _slow


def _first_message_bad(monkeypatch: pytest.MonkeyPatch, frame: Any) -> None:
    """In the helper only, its first message is replaced by ``frame(message)``'s bytes
    (one helper bug, one message); every later message is sent as it is."""
    real = capkeeper.frames.send
    me = os.getpid()
    sent = [0]

    def send(fd: int, message: Any) -> None:
        if os.getpid() != me and sent[0] == 0:
            sent[0] += 1
            data = frame(message)
            view = memoryview(struct.pack("<I", len(data)) + data)
            while view:
                view = view[os.write(fd, view) :]
            return
        real(fd, message)

    monkeypatch.setattr(helper_module, "send", send)


def test_a_message_that_does_not_unmarshal_leaves_no_two_writers(
    tree: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The helper's first message (the restore of the last entry) is framed right but its
    marshal data is short, so marshal.loads raises EOFError inside a whole frame. The
    helper is alive: the daemon must not take it for gone and check the helper's
    entries while it still writes them (fixed by reading on past that message, whose
    entries are then the daemon's, and killing the helper only on a real EOF or a
    stop). As reviewed, _next() takes
    that EOFError for the helper's exit ("it exited before its last entry was sent"):
    no SIGKILL, and claim()'s failure shortcut no longer moves the daemon's mark. The
    helper goes on down through the daemon's entries (it still sees the old mark) while
    the daemon goes up through the helper's: both write the same files, and each file
    the other restored first is found "in sync", a restore with no alert."""
    monkeypatch.setattr(keeper_module, "helper_worth", lambda entries: True)
    _slow(monkeypatch, daemon=0.03, helper=0.005)
    _first_message_bad(monkeypatch, lambda message: marshal.dumps(message)[:-3])
    paths = [make_binary(tree / f"b{n:02}") for n in range(48)]
    # In sync between the daemon's half and the bad message: the helper sends nothing
    # about them before it is done (they go in chunks), so nothing else is in the pipe.
    for path in paths[24:47]:
        setcap(DECLARED, path)
    state = write_state(tree.parent / "state.toml", dict.fromkeys(paths, DECLARED))
    # The outcome that did not read, and the one restore in flight when it is killed.
    silent = _silent_restores(state, paths, [*paths[:24], paths[47]])
    assert len(silent) <= 2, f"{len(silent)} restores without an alert: {silent[:3]}..."


def test_well_formed_messages_after_one_bad_message_are_still_read(
    tree: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The helper's first message reads as a message but not as records (a helper bug in
    one message; the frame around it is whole, so the stream is still in step). Every
    message it sent after that one is well formed and already in the pipe when the
    daemon reads the bad one: the restores they tell of happened, and must be alerted.
    As reviewed, _next() sets _done on the bad message: the rest of the pipe is never
    read, and the daemon then finds those files "in sync", silently."""
    monkeypatch.setattr(keeper_module, "helper_worth", lambda entries: True)
    # The daemon's first check is slow: the helper restores and sends a dozen first.
    real = keeper_module.Keeper._check_entry
    me = os.getpid()
    first = [True]

    def check_entry(self: Any, *args: Any, **kwargs: Any) -> Any:
        if os.getpid() == me and first[0]:
            first[0] = False
            time.sleep(0.5)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(keeper_module.Keeper, "_check_entry", check_entry)
    _slow(monkeypatch, daemon=0.02, helper=0.0)
    _first_message_bad(monkeypatch, lambda message: marshal.dumps(("records", "not a list")))
    paths = [make_binary(tree / f"b{n:02}") for n in range(48)]  # all stripped
    state = write_state(tree.parent / "state.toml", dict.fromkeys(paths, DECLARED))
    silent = _silent_restores(state, paths, paths)
    # The restore whose message did not read, and the one in flight when it is killed.
    assert len(silent) <= 2, f"{len(silent)} restores without an alert: {silent[:3]}..."


def test_a_stop_does_not_hang_on_a_helper_stuck_in_the_kernel(
    tree: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stop during start-up while the helper is stuck in the kernel (a hung NFS or FUSE
    mount: SIGKILL stays pending until the system call returns, which may be never).
    Helper.rest() plans for it ("killed, yet not gone") and stops reading after
    _LAST_WORDS; the daemon must then stop within its stop timeout. The OS will not
    make a process unkillable on demand: the SIGKILLs the daemon sends its helper are
    turned into SIGSTOP, a process that neither runs nor exits, as one in D state. As
    reviewed, close() then blocks in waitpid(pid, 0) for as long as the helper stays
    stuck: the daemon hangs on stop (and systemd SIGKILLs it after TimeoutStopSec)."""
    monkeypatch.setattr(keeper_module, "helper_worth", lambda entries: True)
    _slow(monkeypatch, daemon=0.05, helper=0.05)
    forked: list[int] = []
    real_fork = Helper.fork.__func__  # type: ignore[attr-defined]

    def fork(cls: type[Helper], *args: Any) -> Helper | None:
        helper: Helper | None = real_fork(cls, *args)
        if helper is not None:
            forked.append(helper.pid)
        return helper

    monkeypatch.setattr(Helper, "fork", classmethod(fork))
    real_kill = os.kill

    def kill(pid: int, sig: int) -> None:
        real_kill(pid, signal.SIGSTOP if pid in forked and sig == signal.SIGKILL else sig)

    monkeypatch.setattr(os, "kill", kill)  # the os module the helper module calls
    paths = [make_binary(tree / f"b{n:02}") for n in range(48)]
    state = write_state(tree.parent / "state.toml", dict.fromkeys(paths, DECLARED))
    settings = Settings(state=state, status_file=tree.parent / "status.json", rescan_interval=3600)
    with capture_logs():
        process = Daemon(settings, logger=structlog.get_logger(), install_signals=False)
        thread = threading.Thread(target=process.run)
        thread.start()
        try:
            deadline = time.monotonic() + 20
            while not forked:
                assert time.monotonic() < deadline, "no helper was forked"
                time.sleep(0.01)
            time.sleep(0.2)
            process.request_stop()
            thread.join(15)  # _LAST_WORDS (2 s) and the checks under way, generously
            hung = thread.is_alive()
        finally:
            for pid in forked:  # the hung mount comes back
                real_kill(pid, signal.SIGKILL)
            thread.join(20)
    assert not thread.is_alive()
    assert not hung, "the daemon hangs on stop while its helper is stuck in the kernel"
