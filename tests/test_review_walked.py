"""Review of the walks remembered across batches of events (keeper._batch_pins).

A route change that lands after a batch of events was read, and before the entry's
check, raises its event only in the next batch: the full path walks at the check and
sees it; the remembered walk does not. Real daemon (in process), real inotify, real
files; the change is a real chmod, made in that window on purpose (right after the
daemon's read returns) instead of hoping a race lands there.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, MutableMapping
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from capkeeper.watcher import Watcher, WatchEvent
from tests.conftest import make_binary, setcap
from tests.test_daemon import caps_of, in_process, wait_caps, write_state

ATTACKER = 4242


def _wait_for(logs: list[MutableMapping[str, Any]], found: Callable[[Any], bool]) -> None:
    deadline = time.monotonic() + 10
    while not any(found(e) for e in logs):
        assert time.monotonic() < deadline, logs
        time.sleep(0.01)


def _change_after_read(
    monkeypatch: pytest.MonkeyPatch, trigger: Callable[[list[WatchEvent]], bool], change: Any
) -> list[bool]:
    """Make ``change()`` once, right after the daemon's read of a batch ``trigger`` accepts."""
    real = Watcher.read
    done: list[bool] = []

    def read(self: Watcher, relevant: Any = None) -> list[WatchEvent]:
        events = real(self, relevant)
        if not done and trigger(events):
            done.append(True)
            change()
        return events

    monkeypatch.setattr(Watcher, "read", read)
    return done


def test_ancestor_opened_to_a_group_after_the_read_gets_no_capabilities(
    tree: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A strip is read; before its check, the app directory is handed to the group of
    uid 4242 (0775, gid 4242). The full path walks at the check: route writable by
    the group, refused, nothing written. The remembered walk of an earlier batch still
    says 0755 and restores the capabilities; the next batch (the chmod's event)
    refuses, and a refusal changes nothing: the file keeps capabilities on a route the
    attacker can rename."""
    app = tree / "app"
    (app / "bin").mkdir(parents=True, mode=0o755)
    os.chmod(app, 0o755)
    tool = make_binary(app / "bin" / "tool")
    state = write_state(tree.parent / "state.toml", {tool: "cap_net_raw=+ep"})

    def stripped(events: list[WatchEvent]) -> bool:
        return any(e.name == "tool" for e in events) and caps_of(tool) is None

    def hand_over() -> None:
        os.chown(app, 0, ATTACKER)
        os.chmod(app, 0o775)

    with capture_logs() as logs, in_process(state, logs):
        wait_caps(tool, "cap_net_raw=+ep")  # startup restored it and walked the route
        time.sleep(0.3)  # its own IN_ATTRIB handled
        done = _change_after_read(monkeypatch, stripped, hand_over)
        setcap("-r", tool)
        _wait_for(logs, lambda e: e["event"] == "restore_refused" and e.get("path") == str(tool))
        time.sleep(0.3)
    assert done, "the strip was never read"
    restored = [e for e in logs if e["event"] == "capability_restored"]
    assert caps_of(tool) is None, (
        f"{tool} got capabilities on a route writable by gid {ATTACKER}: {restored}"
    )


def test_symlink_flip_after_the_read_writes_no_undeclared_file(
    tree: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``current`` flips from releases/v1 to releases/v2 right after a batch holding a
    strip of v1/tool was read. The full path walks at the check and restores v2/tool,
    the file the declared path names now; the remembered walk reopens releases/v1 (still
    there, same inode) and writes v1/tool, a file no longer declared."""
    app = tree / "app"
    for release in ("v1", "v2"):
        (app / "releases" / release).mkdir(parents=True, mode=0o755)
        make_binary(app / "releases" / release / "tool")
    os.chmod(app, 0o755)
    os.chmod(app / "releases", 0o755)
    os.symlink("releases/v1", app / "current")
    old, new = app / "releases" / "v1" / "tool", app / "releases" / "v2" / "tool"
    declared = app / "current" / "tool"
    state = write_state(tree.parent / "state.toml", {declared: "cap_net_raw=+ep"})

    def stripped(events: list[WatchEvent]) -> bool:
        return any(e.name == "tool" for e in events) and caps_of(old) is None

    def flip() -> None:
        os.symlink("releases/v2", app / "current.new")
        os.rename(app / "current.new", app / "current")

    with capture_logs() as logs, in_process(state, logs):
        wait_caps(old, "cap_net_raw=+ep")
        time.sleep(0.3)
        done = _change_after_read(monkeypatch, stripped, flip)
        setcap("-r", old)  # v1 is about to be retired: its copy loses its capabilities
        wait_caps(new, "cap_net_raw=+ep")
        time.sleep(0.3)
    assert done, "the strip was never read"
    assert caps_of(old) is None, f"{old} (no longer declared) was given capabilities"


def test_walks_kept_between_batches_are_bounded_by_weight(tree: Path) -> None:
    """A declared path through a directory of uid 4242 (a mistake the daemon refuses
    loudly) lets 4242 stretch its route: 39 symlinks of ``/usr/../`` x 100 are 4,000
    hops, about 0.33 MB (x 560: 22,000 hops, 5 MB). One batch held that only while it
    ran; the walks kept between batches keep it for good, for each of up to 1,024
    directories (counted, not weighed). Four such entries must not leave more than
    256 KiB allocated by walks once start-up is over."""
    import gc
    import shutil
    import subprocess
    import tempfile
    import tracemalloc

    from tests.conftest import require_tool

    setpriv = require_tool("setpriv")
    base = Path(tempfile.mkdtemp(prefix="review-walked-", dir="/tmp"))  # 4242 can reach it
    os.chmod(base, 0o755)
    att = base / "att"
    att.mkdir(mode=0o755)
    os.chown(att, ATTACKER, ATTACKER)
    # Each symlink climbs in and out of /usr (root's: no refusal for those hops) 100 times.
    maze = (
        'set -e; cd "$1"; mkdir real; cp /bin/true real/tool; r=/; '
        'for i in $(seq 100); do r="${r}usr/../"; done; '
        'for i in $(seq 0 37); do ln -s "${r}$1/s$((i + 1))" s$i; done; '
        'ln -s "${r}$1/real" s38; for k in 0 1 2 3; do ln -s s0 t$k; done'
    )
    subprocess.run(
        [
            setpriv,
            f"--reuid={ATTACKER}",
            f"--regid={ATTACKER}",
            "--clear-groups",
            "sh",
            "-c",
            maze,
            "sh",
            str(att),
        ],
        check=True,
    )
    entries = {att / f"t{k}" / "tool": "cap_net_raw=+ep" for k in range(4)}
    state = write_state(tree.parent / "state.toml", entries)

    tracemalloc.start()
    try:
        with capture_logs() as logs, in_process(state, logs):
            _wait_for(logs, lambda e: e["event"] == "rescan")
            time.sleep(0.5)  # start-up's batch is over: what it walked is garbage
            gc.collect()
            # A Hop is allocated in the frame that calls Hop(...): capkeeper/files.py.
            kept = sum(
                trace.size
                for trace in tracemalloc.take_snapshot()
                .filter_traces([tracemalloc.Filter(True, "*capkeeper/files.py")])
                .traces
            )
    finally:
        tracemalloc.stop()
        shutil.rmtree(base)
    assert kept < 256 << 10, f"{kept / 1e6:.1f} MB allocated by walks kept between batches"
