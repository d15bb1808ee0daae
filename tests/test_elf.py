"""The ELF inspector on built bytes, broken bytes, arbitrary bytes and real binaries.

Every malformed input must end as :class:`ElfError` (``None`` from the
``inspect_*`` helpers), never as another exception, and every input must be
read within the budget: the tests count the bytes the parser asks for.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from capkeeper import elf
from capkeeper.elf import EIClass, EIData, ElfError, ElfType, inspect_bytes, parse
from capkeeper.files import inspect_fd
from capkeeper.interpreters import MARKER_SYMBOLS
from tests.elf_builder import DT_STRTAB, Built, build_elf

MARKERS = ("Py_BytesMain", "perl_parse", "_rtld_global", "absent_symbol")


class _Counting:
    """A ``read`` over bytes that records how much was asked for."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.asked = 0
        self.calls = 0

    def __call__(self, offset: int, size: int) -> bytes:
        self.calls += 1
        self.asked += size
        assert offset >= 0
        assert offset < elf.MAX_OFFSET, "an offset os.pread could not take"
        return self.data[offset : offset + size]


def _parse_bounded(data: bytes, symbols: tuple[str, ...] = MARKERS) -> elf.ElfFacts | None:
    """Parse ``data``; only ElfError may escape, and the reads stay within the budget.

    The CPU time bound is ~100 times the worst case seen in a one-minute mutation fuzz
    on a loaded machine: it catches a loop, not a slow machine.
    """
    read = _Counting(data)
    started = time.process_time()
    try:
        facts: elf.ElfFacts | None = parse(read, symbols)
    except ElfError:
        facts = None
    assert read.asked <= elf.MAX_READ_BYTES
    assert time.process_time() - started < 5.0
    return facts


@pytest.mark.parametrize(
    ("c64", "lsb"), [(True, True), (True, False), (False, True), (False, False)]
)
@pytest.mark.parametrize("hash", ["gnu", "sysv"])
def test_built_file_is_read_in_every_class_and_byte_order(c64: bool, lsb: bool, hash: str) -> None:
    """Program interpreter, needed libraries, SONAME and defined exports come back as built."""
    built = build_elf(
        c64=c64,
        lsb=lsb,
        needed=("libpython3.11.so.1.0", "libc.so.6"),
        soname="libdemo.so.1",
        exports=("Py_BytesMain", "other"),
        imports=("perl_parse",),
        hash=hash,
    )
    facts = inspect_bytes(built.data, MARKERS)
    assert facts == elf.ElfFacts(
        elf_class=EIClass.C64 if c64 else EIClass.C32,
        data=EIData.LSB if lsb else EIData.MSB,
        type=ElfType.DYN,
        machine=62 if c64 else 3,
        interp="/lib64/ld-linux-x86-64.so.2",
        dynamic=True,
        needed=("libpython3.11.so.1.0", "libc.so.6"),
        soname="libdemo.so.1",
        exports=frozenset({"Py_BytesMain"}),  # perl_parse is only imported (SHN_UNDEF)
    )


def test_static_file_has_no_dynamic_facts() -> None:
    """No PT_DYNAMIC: no interpreter, no libraries, no symbols, and nothing more is read."""
    built = build_elf(e_type=ElfType.EXEC, interp=None, dynamic=False, hash="none")
    facts = inspect_bytes(built.data, MARKERS)
    assert facts is not None
    assert (facts.type, facts.interp, facts.dynamic, facts.needed) == (2, None, False, ())


def test_file_without_hash_table_has_no_exports() -> None:
    """Symbols are only looked up through the loader's own hash tables."""
    built = build_elf(exports=("Py_BytesMain",), hash="none")
    facts = inspect_bytes(built.data, MARKERS)
    assert facts is not None
    assert facts.exports == frozenset()


def _broken() -> dict[str, Callable[[Built], bytes]]:
    """Ways to break a built file, each one a malformed field."""
    return {
        "bad magic": lambda b: b"\x7fELG" + b.data[4:],
        "unknown class": lambda b: b.data[:4] + b"\x03" + b.data[5:],
        "unknown byte order": lambda b: b.data[:5] + b"\x00" + b.data[6:],
        "65535 program headers": lambda b: b.patch(56, "H", 0xFFFF),
        "wrong program header size": lambda b: b.patch(54, "H", 48),
        "program headers past EOF": lambda b: b.patch(32, "Q", len(b.data) + 1),
        "program headers at 2**63": lambda b: b.patch(32, "Q", 1 << 63),
        "dynamic past EOF": lambda b: b.patch(b.phoff + 56 * 2 + 8, "Q", 1 << 40),
        "dynamic of 2**60 bytes": lambda b: b.patch(b.phoff + 56 * 2 + 32, "Q", 1 << 60),
        "interp past EOF": lambda b: b.patch(b.phoff + 56 + 8, "Q", len(b.data)),
        "strtab outside every segment": lambda b: b.patch(
            b.dynamic + 16 * 2, "QQ", DT_STRTAB, 1 << 40
        ),
        "needed name past DT_STRSZ": lambda b: b.patch(b.dynamic, "QQ", 1, 1 << 20),
        "huge GNU bucket count": lambda b: b.patch(b.hash, "I", 0xFFFFFFFF),
        "GNU bloom of 2**32 words": lambda b: b.patch(b.hash + 8, "I", 0xFFFFFFFF),
        "symbol name past EOF": lambda b: b.patch(b.symtab + 24, "I", 0x7FFFFFFF),
    }


@pytest.mark.parametrize("how", list(_broken()))
def test_malformed_field_is_not_recognised(how: str) -> None:
    """Each malformed field ends as ElfError (None from inspect_bytes), within the budget."""
    built = build_elf(exports=("Py_BytesMain",), soname="libx.so", needed=("libc.so.6",))
    data = _broken()[how](built)
    with pytest.raises(ElfError):
        parse(_Counting(data), ("Py_BytesMain",))
    assert _parse_bounded(data) is None
    assert inspect_bytes(data, MARKERS) is None


def test_error_shows_the_offending_value() -> None:
    """The domain error names the value that was wrong."""
    built = build_elf()
    with pytest.raises(ElfError, match=r"^65535 program headers \(at most 256 read\)$"):
        parse(_Counting(built.patch(56, "H", 0xFFFF)))
    with pytest.raises(ElfError, match=r"^bad magic b'MZ\\x90\\x00'$"):
        parse(_Counting(b"MZ\x90\x00" + bytes(60)))


def test_every_truncation_is_not_recognised_or_read_consistently() -> None:
    """Cut anywhere, a file parses to None or to facts, never to another exception."""
    built = build_elf(exports=("Py_BytesMain", "x"), needed=("libperl.so.5.36",), soname="l.so")
    for length in range(len(built.data) + 1):
        _parse_bounded(built.data[:length])


def test_gnu_hash_chain_without_end_is_bounded() -> None:
    """A GNU hash chain that never ends (no stop bit, zeros to the end) stops at MAX_CHAIN."""
    padding = 64 << 10
    built = build_elf(exports=("Py_BytesMain",), padding=padding)
    bucket = built.hash + 16 + 8  # one bloom word, then the one bucket
    chain = bucket + 4
    into_zeros = (len(built.data) - padding - chain) // 4 + 1  # symoffset is 1
    data = built.patch(bucket, "I", 1 + into_zeros)
    with pytest.raises(ElfError, match=r"^GNU hash chains longer than 4096 entries in all$"):
        parse(_Counting(data), ("Py_BytesMain",))


def test_chain_budget_is_shared_by_all_lookups() -> None:
    """Chains of 200 entries pass for 10 names but not for 28: the budget is per file."""
    padding = 64 << 10
    built = build_elf(exports=("a",), padding=padding)
    bloom, bucket = built.hash + 16, built.hash + 16 + 8
    chain = bucket + 4
    start = (len(built.data) - padding - chain) // 4 + 1  # the first all-zero chain entry
    built = dataclasses.replace(built, data=built.patch(bloom, "Q", (1 << 64) - 1))  # all pass
    built = dataclasses.replace(built, data=built.patch(bucket, "I", 1 + start))
    data = built.patch(chain + (start + 200) * 4, "I", 1)  # the stop bit, 200 entries on
    names = tuple(f"name{i}" for i in range(28))
    assert parse(_Counting(data), names[:10]).exports == frozenset()
    with pytest.raises(ElfError, match=r"^GNU hash chains longer than 4096 entries in all$"):
        parse(_Counting(data), names)


def test_sysv_hash_chain_loop_is_bounded() -> None:
    """A SysV hash chain that points at itself stops at MAX_CHAIN instead of spinning."""
    built = build_elf(exports=("a", "b"), hash="sysv")
    chain = built.hash + 8 + 4  # nbucket = 1
    data = built.patch(chain + 4 * 1, "I", 1)  # chain[1] = 1
    with pytest.raises(ElfError, match=r"^SysV hash chains longer than 4096 entries in all$"):
        parse(_Counting(data), ("Py_BytesMain",))


def test_unterminated_and_overlong_strings() -> None:
    """A string running into the end of the file, or past MAX_NAME, is an error."""
    with pytest.raises(ElfError, match="runs past the end of the file"):
        elf._Budget(_Counting(b"libc.so")).string(0)
    with pytest.raises(ElfError, match="longer than 255 bytes"):
        elf._Budget(_Counting(b"x" * 10_000 + b"\0")).string(0)
    assert elf._Budget(_Counting(b"x" * 255 + b"\0")).string(0) == b"x" * 255


def test_read_budget_caps_what_is_read() -> None:
    """Spread-out lookups that would read more than the budget raise instead."""
    budget = elf._Budget(lambda offset, size: bytes(size))
    for block in range(elf.MAX_READ_BYTES // 4096):
        budget.get(block * 4096, 1)
    budget.get(0, 4096)  # blocks already read cost nothing
    with pytest.raises(ElfError, match="read budget of 1048576 bytes exceeded"):
        budget.get(elf.MAX_READ_BYTES, 1)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=4096))
def test_arbitrary_bytes(data: bytes) -> None:
    """Arbitrary bytes, with or without the ELF magic, never escape ElfError."""
    _parse_bounded(data)
    _parse_bounded(b"\x7fELF" + data)


_VALID = build_elf(
    exports=("Py_BytesMain", "perl_parse"), soname="libx.so", needed=("a.so", "b.so")
).data
_VALID_SYSV = build_elf(exports=("_rtld_global",), hash="sysv", c64=False, lsb=False).data


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from([_VALID, _VALID_SYSV]),
    st.lists(
        st.tuples(st.integers(0, len(_VALID) - 1), st.binary(min_size=1, max_size=8)), max_size=8
    ),
)
def test_mutated_valid_file(base: bytes, edits: list[tuple[int, bytes]]) -> None:
    """A valid file with random fields overwritten parses or is not recognised, within budget."""
    data = bytearray(base)
    for offset, value in edits:
        data[offset : offset + len(value)] = value
    _parse_bounded(bytes(data))


@pytest.mark.parametrize(
    ("path", "interp", "exports"),
    [
        ("/usr/bin/python3.11", "/lib64/ld-linux-x86-64.so.2", {"Py_BytesMain", "Py_Main"}),
        ("/usr/bin/perl", "/lib64/ld-linux-x86-64.so.2", {"perl_parse", "perl_run"}),
        ("/lib64/ld-linux-x86-64.so.2", None, {"_rtld_global", "_rtld_global_ro", "_dl_argv"}),
        ("/bin/true", "/lib64/ld-linux-x86-64.so.2", set()),
    ],
)
def test_real_binaries(path: str, interp: str | None, exports: set[str]) -> None:
    """Real programs of this machine, read through a descriptor as the daemon does."""
    if not os.path.exists(path):
        pytest.skip(f"needs {path}")
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        facts = inspect_fd(fd, MARKER_SYMBOLS)
    finally:
        os.close(fd)
    assert facts is not None
    assert facts.interp == interp
    assert exports <= facts.exports
    assert facts.exports <= set(MARKER_SYMBOLS)
    if interp is None:
        assert facts.soname == "ld-linux-x86-64.so.2"
    else:
        assert "libc.so.6" in facts.needed


def test_whole_real_binary_reads_stay_small(tmp_path: Path) -> None:
    """Inspecting the 6 MiB python3.11 reads a few blocks, not the file."""
    data = Path("/usr/bin/python3.11").read_bytes()
    read = _Counting(data)
    parse(read, MARKER_SYMBOLS)
    assert read.asked <= 64 * 4096, read.asked


def test_pread_of_huge_offset_does_not_overflow(tmp_path: Path) -> None:
    """A program header offset near 2**63 is refused before os.pread could overflow."""
    path = tmp_path / "big"
    path.write_bytes(build_elf().patch(32, "Q", (1 << 63) - 4096))
    fd = os.open(path, os.O_RDONLY)
    try:
        assert inspect_fd(fd) is None
    finally:
        os.close(fd)
