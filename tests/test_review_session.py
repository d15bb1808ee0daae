"""Second review of the walks remembered across batches (keeper._batch_pins, files.Walks).

Real daemon (in process), real inotify, real symlinks made by a real unprivileged uid.
"""

from __future__ import annotations

import gc
import os
import shutil
import struct
import subprocess
import tempfile
import time
import tracemalloc
from collections.abc import Callable, MutableMapping
from pathlib import Path
from typing import Any

from structlog.testing import capture_logs

from capkeeper.elf import _MEMO_WEIGHT, ParseMemo
from capkeeper.interpreters import MARKER_SYMBOLS
from tests.conftest import require_tool
from tests.test_daemon import in_process, write_state

ATTACKER = 4242


def _wait_for(logs: list[MutableMapping[str, Any]], found: Callable[[Any], bool]) -> None:
    deadline = time.monotonic() + 10
    while not any(found(e) for e in logs):
        assert time.monotonic() < deadline, logs
        time.sleep(0.01)


def test_walks_kept_between_batches_are_bounded_by_weight_not_hops(tree: Path) -> None:
    """791d387 bounds the remembered routes by hops (64 a route, 8,192 in all), not by
    what the hops weigh. A hop keeps its symlink's target, and uid 4242 chooses targets
    up to 4,095 bytes: ``./`` repeated adds no hop. 38 symlinks of ~4 kB each are a
    route of 44 hops (remembered), ~160 kB; four declared paths through 4242's
    directory keep ~650 kB after start-up (the 8,192-hop budget: ~33 MB). The bar is
    the one of tests/test_review_walked.py: four such entries, at most 256 KiB."""
    setpriv = require_tool("setpriv")
    base = Path(tempfile.mkdtemp(prefix="review13-walked-", dir="/tmp"))  # 4242 can reach it
    os.chmod(base, 0o755)
    att = base / "att"
    att.mkdir(mode=0o755)
    os.chown(att, ATTACKER, ATTACKER)
    # s0 -> ././.../s1 -> ... -> s37 -> ././.../real: 38 symlinks of 4,062 bytes; t0..t3 -> s0.
    maze = (
        'set -e; cd "$1"; mkdir real; cp /bin/true real/tool; p=""; '
        'for i in $(seq 2030); do p="${p}./"; done; '
        'for i in $(seq 0 36); do ln -s "${p}s$((i + 1))" s$i; done; '
        'ln -s "${p}real" s37; for k in 0 1 2 3; do ln -s s0 t$k; done'
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
    assert len(os.readlink(att / "s0")) > 4000
    entries = {att / f"t{k}" / "tool": "cap_net_raw=+ep" for k in range(4)}
    state = write_state(tree.parent / "state.toml", entries)

    tracemalloc.start()
    try:
        with capture_logs() as logs, in_process(state, logs) as daemon:
            _wait_for(logs, lambda e: e["event"] == "rescan")
            time.sleep(0.5)  # start-up's batch is over: what it walked is garbage
            gc.collect()
            remembered = len(getattr(daemon._keeper, "_walked", ()))
            kept = sum(
                trace.size
                for trace in tracemalloc.take_snapshot()
                .filter_traces(
                    [
                        tracemalloc.Filter(True, "*capkeeper/files.py"),
                        tracemalloc.Filter(True, "*capkeeper/paths.py"),
                    ]
                )
                .traces
            )
    finally:
        tracemalloc.stop()
        shutil.rmtree(base)
    assert kept < 256 << 10, (
        f"{kept / 1e3:.0f} kB allocated by walks kept between batches "
        f"({remembered} routes remembered)"
    )


def _elf_of_long_names(serial: int) -> bytes:
    """A 4 KiB ELF (x86_64, ET_DYN) whose 128 DT_NEEDED all name one 255-byte string;
    ``serial`` (8 bytes of padding) makes each copy another content. parse reads one
    block of it and returns 128 distinct str objects of 255 bytes."""
    dyn_off, str_off, count = 176, 2304, 128
    header = b"\x7fELF" + bytes([2, 1, 1, 0]) + bytes(8)
    header += struct.pack("<HHIQQQIHHHHHH", 3, 62, 1, 0, 64, 0, 0, 64, 56, 2, 64, 0, 0)
    entries = [(1, 0)] * count + [(5, str_off), (10, 256), (0, 0)]
    dynamic = b"".join(struct.pack("<qQ", tag, value) for tag, value in entries)
    load = struct.pack("<IIQQQQQQ", 1, 5, 0, 0, 0, 4096, 4096, 4096)
    size = len(dynamic)
    dyn = struct.pack("<IIQQQQQQ", 2, 6, dyn_off, dyn_off, dyn_off, size, size, 8)
    body = bytearray(4096)
    body[0:64] = header
    body[64:176] = load + dyn
    body[dyn_off : dyn_off + size] = dynamic
    body[str_off : str_off + 256] = b"l" * 255 + b"\0"
    body[4000:4008] = struct.pack("<Q", serial)
    return bytes(body)


def test_parse_memo_keeps_no_more_than_its_weight(tmp_path: Path) -> None:
    """ParseMemo bounds the blocks it keeps (2 MiB), not the facts it keeps for them.
    One 4 KiB block written by whoever can write an observed file parses to 128
    names of 255 bytes (~40 kB of str objects): 480 such writes stay under the
    blocks' bound and keep ~20 MB. What a ParseMemo keeps must stay within twice
    its weight (bookkeeping included)."""
    memo = ParseMemo(MARKER_SYMBOLS)
    path = tmp_path / "lib.so"
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        for serial in range(480):
            path.write_bytes(_elf_of_long_names(serial))
            fd = os.open(path, os.O_RDONLY)
            try:
                facts = memo.parse(lambda offset, size: os.pread(fd, size, offset))  # noqa: B023
            finally:
                os.close(fd)
            assert len(facts.needed) == 128
        del facts
        gc.collect()
        grown = sum(
            stat.size_diff for stat in tracemalloc.take_snapshot().compare_to(before, "filename")
        )
    finally:
        tracemalloc.stop()
    assert grown < 2 * _MEMO_WEIGHT, (
        f"a ParseMemo of weight {_MEMO_WEIGHT >> 20} MiB keeps {grown / 1e6:.1f} MB"
    )
