"""``elf.ParseMemo``: remembered facts are exactly what a fresh :func:`elf.parse` says.

The memo recognises content by the blocks the parser read. Every test compares it
with a fresh parse of the same bytes: real programs and libraries of this machine,
built files, truncations, random edits of a real program's blocks (the memo holding
the original and every earlier mutant), and ``files`` observing real files on disk.
"""

from __future__ import annotations

import glob
import os
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from capkeeper import elf, files
from capkeeper.elf import ElfError, ParseMemo, parse
from capkeeper.files import inspect_fd
from capkeeper.interpreters import MARKER_SYMBOLS
from capkeeper.model import Kind
from tests.elf_builder import build_elf


class _Reads:
    """``read`` over bytes, recording every block asked for."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.asked: list[tuple[int, int]] = []

    def __call__(self, offset: int, size: int) -> bytes:
        self.asked.append((offset, size))
        return self.data[offset : offset + size]


def _fresh(data: bytes, symbols: tuple[str, ...] = MARKER_SYMBOLS) -> elf.ElfFacts | str:
    """The facts of a fresh parse, or its error message."""
    try:
        return parse(_Reads(data), symbols)
    except ElfError as exc:
        return f"error: {exc}"


def _memo(memo: ParseMemo, data: bytes) -> elf.ElfFacts | str:
    try:
        return memo.parse(_Reads(data))
    except ElfError as exc:
        return f"error: {exc}"


def _real_elf_files() -> list[Path]:
    found = [Path(p) for p in ("/usr/bin/python3.11", "/usr/bin/perl", "/bin/true", "/bin/sh")]
    found += [Path(p) for p in sorted(glob.glob("/usr/bin/*"))[:150]]
    found += [Path(p) for p in sorted(glob.glob("/usr/lib/x86_64-linux-gnu/lib*.so*"))[:60]]
    return [p for p in dict.fromkeys(found) if p.is_file() and not p.is_symlink()]


_REAL = _real_elf_files()
_PYTHON = Path("/usr/bin/python3.11").read_bytes()
_TRUE = Path("/bin/true").read_bytes()


def test_real_files_learnt_then_replayed_answer_as_a_fresh_parse() -> None:
    """Every real program and library (and script) of a sample of this machine: the
    first look (learnt) and the second (replayed) give a fresh parse's facts or error."""
    assert len(_REAL) > 100
    memo = ParseMemo(MARKER_SYMBOLS)
    contents = [p.read_bytes() for p in _REAL]
    for data in contents:
        assert _memo(memo, data) == _fresh(data)
    for data in contents:
        assert _memo(memo, data) == _fresh(data)


def test_a_replay_reads_only_the_blocks_the_parser_read() -> None:
    """Recognising a copy reads what the parser read, no more, and never parses."""
    memo = ParseMemo(MARKER_SYMBOLS)
    first = _Reads(_PYTHON)
    memo.parse(first)
    again = _Reads(_PYTHON)
    assert memo.parse(again) == parse(_Reads(_PYTHON), MARKER_SYMBOLS)
    assert again.asked == first.asked
    assert len(again.asked) > 3  # python3.11: the header, the dynamic section, the symbols


@pytest.mark.parametrize("cut", [0, 1, 15, 63, 64, 200, 4095, 4096, 4097, 8191, 12288, 30000])
def test_truncations_end_as_a_fresh_parse(cut: int) -> None:
    """A copy of a known program cut short: its error (or facts), not the whole one's."""
    memo = ParseMemo(MARKER_SYMBOLS)
    memo.parse(_Reads(_PYTHON))
    memo.parse(_Reads(_TRUE))
    for data in (_PYTHON[:cut], _TRUE[:cut]):
        assert _memo(memo, data) == _fresh(data)
        assert _memo(memo, data) == _fresh(data)


def test_another_interpreter_in_the_same_blocks_is_not_taken_for_the_known_one() -> None:
    """A built file that differs from a known one in one byte of its interpreter path or
    of a needed library's name has its own facts."""
    memo = ParseMemo(MARKER_SYMBOLS)
    base = build_elf(needed=("libc.so.6",), interp="/lib64/ld-linux-x86-64.so.2")
    other_interp = build_elf(needed=("libc.so.6",), interp="/lib64/ld-linux-x86-64.so.3")
    python = build_elf(needed=("libpython3.so",), exports=("Py_BytesMain",))
    for data in (base.data, other_interp.data, python.data, base.data, python.data):
        facts = _memo(memo, data)
        assert facts == _fresh(data)
    assert _memo(memo, other_interp.data) != _memo(memo, base.data)


_SHARED = ParseMemo(MARKER_SYMBOLS)
_SHARED.parse(_Reads(_PYTHON))
_SHARED.parse(_Reads(_TRUE))
# The blocks python3.11's parse reads: edits there change what the parser sees.
_probe = _Reads(_PYTHON)
parse(_probe, MARKER_SYMBOLS)
_PYTHON_BLOCKS = sorted({offset for offset, _ in _probe.asked})


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(["python", "true"]),
    st.lists(
        st.tuples(
            st.sampled_from(_PYTHON_BLOCKS),
            st.integers(0, 4095),
            st.binary(min_size=1, max_size=8),
        ),
        min_size=1,
        max_size=6,
    ),
)
def test_edited_copies_answer_as_a_fresh_parse(
    which: str, edits: list[tuple[int, int, bytes]]
) -> None:
    """A real program with a few bytes overwritten in the blocks its parse reads: the
    memo, which holds the original and every earlier mutant, says what a fresh parse
    of the mutant says, the first time and the second."""
    data = bytearray(_PYTHON if which == "python" else _TRUE)
    for block, at, value in edits:
        offset = min(block + at, len(data) - 1)
        data[offset : offset + len(value)] = value
    mutant = bytes(data)
    assert _memo(_SHARED, mutant) == _fresh(mutant)
    assert _memo(_SHARED, mutant) == _fresh(mutant)


def test_the_blocks_kept_stay_within_the_weight() -> None:
    """Whoever writes an observed file makes a new branch at each write: the memo keeps
    at most its weight of blocks, then starts afresh, and still answers right."""
    limit = 64 << 10
    memo = ParseMemo(MARKER_SYMBOLS, weight=limit)
    for number in range(300):
        data = bytearray(_PYTHON[: 1 << 16])
        data[600 + number % 3000] ^= 0xFF  # in the program headers or what follows
        mutant = bytes(data) + _PYTHON[1 << 16 :]
        assert _memo(memo, mutant) == _fresh(mutant)
        assert memo._weight <= limit


def test_a_parse_heavier_than_the_weight_is_not_kept() -> None:
    memo = ParseMemo(MARKER_SYMBOLS, weight=4096)
    assert _memo(memo, _PYTHON) == _fresh(_PYTHON)
    assert memo._weight == 0
    assert _memo(memo, _PYTHON) == _fresh(_PYTHON)


def test_observed_copies_on_disk_have_a_fresh_parse_s_facts(tmp_path: Path) -> None:
    """Through files: copies of true, of python3.11 and of perl written over one another
    in place (one inode, mtime and ctime moving) and as new files; each observation's
    facts are those inspect_fd parses afresh from the same descriptor."""
    sources = [Path("/bin/true"), Path("/usr/bin/python3.11"), Path("/usr/bin/perl")]
    target = tmp_path / "tool"
    for round_ in range(30):
        source = sources[round_ % len(sources)]
        if round_ % 2:
            shutil.copyfile(source, target)  # in place
        else:
            fresh = tmp_path / f"new{round_}"
            shutil.copyfile(source, fresh)
            fresh.replace(target)  # a new inode
        observed = files.observe(str(target))
        fd = os.open(target, os.O_RDONLY | os.O_CLOEXEC)
        try:
            assert observed.elf == inspect_fd(fd, MARKER_SYMBOLS)
        finally:
            os.close(fd)
        assert observed.elf is not None
        assert ("Py_BytesMain" in observed.elf.exports) == (source.name == "python3.11")


def test_an_observation_reads_the_first_block_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first block read to tell ELF from a script is the one the ELF inspection
    starts from: an ELF file no cache knows is read at offset 0 once, and its facts are
    those of a fresh parse. Files shorter than a block and scripts are read once too."""
    small = tmp_path / "small"
    small.write_bytes(Path("/bin/true").read_bytes()[:100])  # ELF magic, then cut short
    script = tmp_path / "script"
    script.write_bytes(b"#!/bin/sh " + b"x" * 300 + b"\necho\n")
    reads: list[tuple[int, int]] = []
    real = os.pread

    def counting(fd: int, size: int, offset: int) -> bytes:
        reads.append((offset, size))
        return real(fd, size, offset)

    for source in ("/bin/true", "/usr/bin/python3.11", str(small), str(script)):
        target = tmp_path / f"copy-{Path(source).name}"
        shutil.copyfile(source, target)  # a new inode: no cache knows it
        reads.clear()
        with monkeypatch.context() as patch:
            patch.setattr(os, "pread", counting)
            observed = files.observe(str(target))
        assert [offset for offset, _ in reads].count(0) == 1, (source, reads)
        fd = os.open(target, os.O_RDONLY | os.O_CLOEXEC)
        try:
            assert observed.elf == inspect_fd(fd, MARKER_SYMBOLS)
        finally:
            os.close(fd)
    assert observed.kind is Kind.SCRIPT
    assert observed.interpreter == "/bin/sh " + "x" * 246  # the first 256 bytes, as before


def test_a_known_elf_rewritten_as_a_script_is_read_as_one(tmp_path: Path) -> None:
    """The ELF cache's key says "ELF" without reading the file again: a known binary
    rewritten in place as a script of the same size, its mtime set back, moves the key
    (ctime) and is read as the script it is, as a process with no cache reads it."""
    target = tmp_path / "tool"
    shutil.copyfile("/bin/true", target)
    assert files.observe(str(target)).kind is Kind.ELF
    before = target.stat()
    script = b"#!/bin/sh\nexit 0\n"
    target.write_bytes(script + b"#" * (before.st_size - len(script)))
    os.utime(target, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = target.stat()
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    seen = files.observe(str(target))
    assert seen.kind is Kind.SCRIPT
    assert seen.elf is None
    assert seen.interpreter == "/bin/sh"


def test_a_miss_reads_no_block_twice() -> None:
    """A copy that differs from a known program in its last block read: the blocks read
    on the way down the memo serve the parse; each block is read once, and the facts
    are a fresh parse's."""
    memo = ParseMemo(MARKER_SYMBOLS)
    memo.parse(_Reads(_PYTHON))
    last = _PYTHON_BLOCKS[-1]
    data = bytearray(_PYTHON)
    data[last + 100] ^= 0xFF
    mutant = _Reads(bytes(data))
    try:
        found: elf.ElfFacts | str = memo.parse(mutant)
    except ElfError as exc:
        found = f"error: {exc}"
    assert found == _fresh(bytes(data))
    offsets = [offset for offset, _ in mutant.asked]
    assert len(offsets) == len(set(offsets)), offsets
    assert len(offsets) > 1
