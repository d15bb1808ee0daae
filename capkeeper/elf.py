"""Just enough of an ELF file to tell what kind of program it is.

Reads the ELF header, the program headers (``PT_INTERP``, ``PT_DYNAMIC``,
``PT_LOAD``), the dynamic section (``DT_NEEDED``, ``DT_SONAME``) and looks up a
few exported dynamic symbols through the file's own hash table
(``DT_GNU_HASH``, else ``DT_HASH``), the way the dynamic loader finds them.
Section headers are never read: they are optional at run time (``sstrip``
removes them) and say nothing the loader uses.

Parsing is pure: :func:`parse` takes a ``read(offset, size)`` callable, so it
runs the same on built bytes (:func:`inspect_bytes`) and on an open descriptor
(:func:`capkeeper.files.inspect_fd`, ``os.pread``). Every read goes through a budget of 4 KiB
blocks (at most 1 MiB per file), every count and loop is capped, and anything malformed raises the
one domain error :class:`ElfError`, which the ``inspect_*`` helpers turn into
``None``: "not recognised".

Spec: the System V ABI, "Object Files" and "Program Loading and Dynamic
Linking" (https://refspecs.linuxfoundation.org/elf/gabi4+/contents.html); the
GNU hash table as documented in
https://sourceware.org/legacy-ml/binutils/2006-10/msg00377.html.
"""

from __future__ import annotations

import enum
import functools
import itertools
import struct
from collections.abc import Callable, Collection
from typing import NamedTuple

from capkeeper.errors import ElfError

__all__ = [
    "EIClass",
    "EIData",
    "ElfError",
    "ElfFacts",
    "ElfType",
    "ParseMemo",
    "facts_weight",
    "inspect_bytes",
    "parse",
]

Read = Callable[[int, int], bytes]
"""``read(offset, size)``: up to ``size`` bytes at ``offset`` (fewer at end of file)."""

MAX_READ_BYTES = 1 << 20  # a whole inspection never reads more than this, in 4 KiB blocks
MAX_OFFSET = 1 << 47  # no file is this large; os.pread would overflow at 2**63
MAX_PROGRAM_HEADERS = 256  # real programs have ~15; PN_XNUM (0xffff) is refused
MAX_DYNAMIC_ENTRIES = 1024  # real programs have ~40
MAX_NEEDED = 128
MAX_NAME = 255  # longer library names and interpreter paths are not recognised
MAX_CHAIN = 4096  # hash chain entries visited by all lookups of one file together
MAX_BUCKETS = 1 << 20
MAX_BLOOM_WORDS = 1 << 16
BLOCK = 4096
"""The size of every read :func:`parse` asks of its ``read``, at a multiple of it."""


class EIClass(enum.IntEnum):
    C32 = 1
    C64 = 2


class EIData(enum.IntEnum):
    LSB = 1
    MSB = 2


class ElfType(enum.IntEnum):
    REL = 1
    EXEC = 2
    DYN = 3
    CORE = 4


class _PT(enum.IntEnum):
    LOAD = 1
    DYNAMIC = 2
    INTERP = 3


class _DT(enum.IntEnum):
    NULL = 0
    NEEDED = 1
    HASH = 4
    STRTAB = 5
    SYMTAB = 6
    STRSZ = 10
    SYMENT = 11
    SONAME = 14
    GNU_HASH = 0x6FFFFEF5


_CLASSES = {int(c): c for c in EIClass}
_ORDERS = {int(d): d for d in EIData}
# Plain ints for the loops over every program header and dynamic entry: comparing
# with an IntEnum member costs a class attribute lookup each time.
_PT_LOAD, _PT_DYNAMIC, _PT_INTERP = int(_PT.LOAD), int(_PT.DYNAMIC), int(_PT.INTERP)
_DT_NULL, _DT_NEEDED = int(_DT.NULL), int(_DT.NEEDED)


class ElfFacts(NamedTuple):
    """What an ELF file says about itself."""

    elf_class: EIClass
    data: EIData
    type: int  # an ElfType value, or whatever else the file says
    machine: int
    interp: str | None  # PT_INTERP path; None: no PT_INTERP
    dynamic: bool  # has PT_DYNAMIC
    needed: tuple[str, ...] = ()
    soname: str | None = None
    exports: frozenset[str] = frozenset()  # the looked-up names it defines

    @property
    def is_shared_object(self) -> bool:
        return self.type == ElfType.DYN


def facts_weight(facts: ElfFacts) -> int:
    """About the bytes ``facts`` holds: its names, and a str object's overhead for each.
    The file's author chooses the names: 128 DT_NEEDED names of 255 bytes weigh 40 kB."""
    names = (facts.interp or "", facts.soname or "", *facts.needed, *facts.exports)
    return 256 + sum(len(name) + 64 for name in names)


class _Budget:
    """Reads through ``read`` in 4 KiB blocks (each read once), counting every byte."""

    def __init__(self, read: Read) -> None:
        self._read = read
        self._blocks: dict[int, bytes] = {}
        self.bytes = 0

    def _block(self, index: int) -> bytes:
        block = self._blocks.get(index)
        if block is None:
            self.bytes += BLOCK
            if self.bytes > MAX_READ_BYTES:
                raise ElfError(f"read budget of {MAX_READ_BYTES} bytes exceeded")
            if index * BLOCK >= MAX_OFFSET:
                raise ElfError(f"offset {index * BLOCK:#x} beyond any file")
            block = self._read(index * BLOCK, BLOCK)
            self._blocks[index] = block
        return block

    def get(self, offset: int, size: int) -> bytes:
        """Exactly ``size`` bytes at ``offset``, or :class:`ElfError`."""
        if offset < 0 or size < 0 or size > MAX_READ_BYTES:
            raise ElfError(f"read of {size} bytes at offset {offset} out of range")
        if size == 0:
            return b""
        first, start = divmod(offset, BLOCK)
        if start + size <= BLOCK:  # within one block: the common case
            part = (self._blocks.get(first) or self._block(first))[start : start + size]
            if len(part) < size:
                raise ElfError(f"{size} bytes at offset {offset} run past the end of the file")
            return part
        parts = []
        last = (offset + size - 1) // BLOCK
        for index in range(first, last + 1):
            block = self._block(index)
            start = offset - index * BLOCK if index == first else 0
            end = offset + size - index * BLOCK if index == last else BLOCK
            part = block[start:end]
            parts.append(part)
            if len(part) < end - start:
                raise ElfError(f"{size} bytes at offset {offset} run past the end of the file")
        return b"".join(parts)

    def unpack(self, fmt: str, offset: int) -> tuple[int, ...]:
        """``struct.unpack`` of ``fmt`` (a full format, byte order first) over exactly
        its size at ``offset``: :meth:`get` without the copy when it fits one block."""
        size = struct.calcsize(fmt)
        first, start = divmod(offset, BLOCK)
        if offset >= 0 and start + size <= BLOCK:
            block = self._blocks.get(first) or self._block(first)
            if start + size <= len(block):
                return struct.unpack_from(fmt, block, start)
        return struct.unpack(fmt, self.get(offset, size))

    def string(self, offset: int) -> bytes:
        """The NUL-terminated string at ``offset`` (at most :data:`MAX_NAME` bytes)."""
        if offset < 0:
            raise ElfError(f"string offset {offset} out of range")
        found = b""
        while len(found) <= MAX_NAME:
            index, start = divmod(offset + len(found), BLOCK)
            chunk = self._block(index)[start:]
            if not chunk:
                raise ElfError(f"string at offset {offset} runs past the end of the file")
            end = chunk.find(b"\0")
            if end >= 0:
                found += chunk[:end]
                break
            found += chunk
        if len(found) > MAX_NAME:
            raise ElfError(f"string at offset {offset} is longer than {MAX_NAME} bytes")
        return found


class _Layout(NamedTuple):
    """The struct formats of one ELF class and byte order.

    A NamedTuple, not a dataclass: creating a dataclass costs ~1 ms of every run.
    """

    order: str
    c64: bool

    def unpack(self, fmt: str, data: bytes, offset: int = 0) -> tuple[int, ...]:
        return struct.unpack_from(self.order + fmt, data, offset)

    def at(self, src: _Budget, fmt: str, offset: int) -> tuple[int, ...]:
        """``fmt`` in this byte order read from ``src`` at ``offset`` (exactly its size)."""
        return src.unpack(self.order + fmt, offset)

    @property
    def word(self) -> str:  # Elf_Addr / Elf_Off / Elf_Xword / d_tag
        return "Q" if self.c64 else "I"


def _text(data: bytes) -> str:
    # Names are bytes to the kernel and the loader; undecodable ones keep their bytes.
    return data.decode("utf-8", "surrogateescape")


def gnu_hash(name: bytes) -> int:
    """The GNU symbol hash (Bernstein's, modulo 2**32)."""
    h = 5381
    for byte in name:
        h = (h * 33 + byte) & 0xFFFFFFFF
    return h


def sysv_hash(name: bytes) -> int:
    """The System V ABI's ``elf_hash``."""
    h = 0
    for byte in name:
        h = ((h << 4) + byte) & 0xFFFFFFFF
        g = h & 0xF0000000
        if g:
            h ^= g >> 24
        h &= ~g & 0xFFFFFFFF
    return h


class _Key(NamedTuple):
    name: str
    key: bytes
    gnu: int
    sysv: int


@functools.lru_cache(maxsize=16)
def _keys(names: tuple[str, ...]) -> tuple[_Key, ...]:
    """``names`` with their encodings and both hashes, computed once per set of names."""
    encoded = [name.encode() for name in names]
    return tuple(_Key(n, k, gnu_hash(k), sysv_hash(k)) for n, k in zip(names, encoded, strict=True))


_BLOOM_MEMO_WORDS = 1024  # libc.so.6 has 256; 64 remembered filters keep at most ~3 MB


@functools.lru_cache(maxsize=64)
def _bloom_passing(
    keys: tuple[_Key, ...], bits: int, size: int, shift: int, bloom: tuple[int, ...]
) -> tuple[_Key, ...]:
    """The ``keys`` a GNU Bloom filter of ``size`` words of ``bits`` does not rule out:
    for each, two bits of one word must be set. Remembered by value (copies of one
    binary share their filter)."""
    return tuple(
        k
        for k in keys
        if bloom[(k.gnu // bits) % size] >> (k.gnu % bits) & 1
        and bloom[(k.gnu // bits) % size] >> ((k.gnu >> shift) % bits) & 1
    )


class _Dynamic:
    """The dynamic section of one file and lookups through it."""

    def __init__(
        self,
        src: _Budget,
        lay: _Layout,
        loads: list[tuple[int, int, int]],
        tags: list[tuple[int, int]],
    ) -> None:
        self.src = src
        self.lay = lay
        self.loads = loads  # (vaddr, filesz, offset) of each PT_LOAD
        self.tags = tags
        self._first = dict(reversed(tags))  # the first entry of each tag wins
        self._steps = 0

    def _step(self, kind: str) -> None:
        self._steps += 1
        if self._steps > MAX_CHAIN:
            raise ElfError(f"{kind} hash chains longer than {MAX_CHAIN} entries in all")

    def first(self, tag: _DT) -> int | None:
        return self._first.get(tag)

    def offset(self, vaddr: int, what: str) -> int:
        """The file offset of virtual address ``vaddr`` (through the PT_LOAD segments)."""
        for start, size, offset in self.loads:
            if start <= vaddr < start + size:
                return offset + vaddr - start
        raise ElfError(f"{what} address {vaddr:#x} is in no loaded segment")

    def string(self, strtab: int, index: int) -> str:
        strsz = self.first(_DT.STRSZ)
        if strsz is not None and index >= strsz:
            raise ElfError(f"string index {index} beyond DT_STRSZ {strsz}")
        return _text(self.src.string(strtab + index))

    def defines(self, names: Collection[str]) -> frozenset[str]:
        """Which of ``names`` the file's dynamic symbol table defines."""
        strtab_addr, symtab_addr = self.first(_DT.STRTAB), self.first(_DT.SYMTAB)
        if not names or strtab_addr is None or symtab_addr is None:
            return frozenset()
        strtab = self.offset(strtab_addr, "DT_STRTAB")
        symtab = self.offset(symtab_addr, "DT_SYMTAB")
        syment = 24 if self.lay.c64 else 16
        if self.first(_DT.SYMENT) not in (None, syment):
            raise ElfError(f"DT_SYMENT {self.first(_DT.SYMENT)} is not {syment}")
        keys = _keys(tuple(names))
        gnu, sysv = self.first(_DT.GNU_HASH), self.first(_DT.HASH)
        if gnu is not None:
            candidates = self._gnu_candidates(self.offset(gnu, "DT_GNU_HASH"), keys)
        elif sysv is not None:
            candidates = self._sysv_candidates(self.offset(sysv, "DT_HASH"), keys)
        else:
            return frozenset()
        found: set[str] = set()
        for name, key, index in candidates:
            if name in found:
                continue
            at = symtab + index * syment
            if self.lay.c64:
                st_name, _, _, shndx, _, _ = self.lay.at(self.src, "IBBHQQ", at)
            else:
                st_name, _, _, _, _, shndx = self.lay.at(self.src, "IIIBBH", at)
            # SHN_UNDEF (0): an import, not a definition.
            if shndx != 0 and self.src.string(strtab + st_name) == key:
                found.add(name)
        return frozenset(found)

    def _array(self, offset: int, count: int, size: int) -> tuple[int, ...]:
        """``count`` unsigned integers of ``size`` bytes at ``offset``."""
        code = "Q" if size == 8 else "I"
        return self.lay.unpack(f"{count}{code}", self.src.get(offset, count * size))

    def _gnu_candidates(self, table: int, keys: tuple[_Key, ...]) -> list[tuple[str, bytes, int]]:
        """``(name, key, symbol index)`` of every symbol the GNU hash table offers for ``keys``."""
        nbuckets, symoffset, bloom_size, shift = self.lay.at(self.src, "4I", table)
        if not 0 < nbuckets <= MAX_BUCKETS or not 0 < bloom_size <= MAX_BLOOM_WORDS:
            raise ElfError(f"GNU hash table of {nbuckets} buckets, {bloom_size} bloom words")
        bits = 64 if self.lay.c64 else 32
        bloom = self._array(table + 16, bloom_size, bits // 8)
        buckets_at = table + 16 + bloom_size * bits // 8
        chain_at = buckets_at + nbuckets * 4
        # The Bloom filter answers "certainly absent" for most names without the buckets.
        # Remembered only for a filter of a real binary's size: the file's content picks
        # the key, and a hostile file's 65,536 words would be kept (~3 MB) in each slot.
        passing = (
            _bloom_passing(keys, bits, bloom_size, shift, bloom)
            if bloom_size <= _BLOOM_MEMO_WORDS
            else _bloom_passing.__wrapped__(keys, bits, bloom_size, shift, bloom)
        )
        found: list[tuple[str, bytes, int]] = []
        if not passing:
            return found
        buckets = self._array(buckets_at, nbuckets, 4)
        for k in passing:
            index = buckets[k.gnu % nbuckets]
            if index < symoffset:
                continue
            while True:
                self._step("GNU")
                (value,) = self.lay.at(self.src, "I", chain_at + (index - symoffset) * 4)
                if value | 1 == k.gnu | 1:
                    found.append((k.name, k.key, index))
                if value & 1:
                    break
                index += 1
        return found

    def _sysv_candidates(self, table: int, keys: tuple[_Key, ...]) -> list[tuple[str, bytes, int]]:
        """``(name, key, symbol index)`` of every symbol the SysV hash table offers for ``keys``."""
        nbucket, nchain = self.lay.at(self.src, "2I", table)
        if not 0 < nbucket <= MAX_BUCKETS:
            raise ElfError(f"hash table of {nbucket} buckets")
        buckets = self._array(table + 8, nbucket, 4)
        chain_at = table + 8 + nbucket * 4
        found: list[tuple[str, bytes, int]] = []
        for k in keys:
            index = buckets[k.sysv % nbucket]
            while True:
                self._step("SysV")
                if index == 0:  # STN_UNDEF ends the chain
                    break
                if index >= nchain:
                    raise ElfError(f"hash chain index {index} beyond nchain {nchain}")
                found.append((k.name, k.key, index))
                (index,) = self.lay.at(self.src, "I", chain_at + index * 4)
        return found


def parse(read: Read, symbols: Collection[str] = ()) -> ElfFacts:
    """The facts of the ELF file read by ``read``; ``symbols``: names to look up.

    Raises :class:`ElfError` for anything that is not a well-formed ELF file
    within the limits of this module.
    """
    src = _Budget(read)
    ident = src.get(0, 16)
    if ident[:4] != b"\x7fELF":
        raise ElfError(f"bad magic {ident[:4]!r}")
    elf_class, data = _CLASSES.get(ident[4]), _ORDERS.get(ident[5])
    if elf_class is None or data is None:
        raise ElfError(f"unknown class {ident[4]} or byte order {ident[5]}")
    lay = _Layout("<" if data is EIData.LSB else ">", elf_class is EIClass.C64)
    if lay.c64:
        e_type, machine, _, _, phoff, _, _, _, phentsize, phnum = lay.at(src, "HHIQQQIHHH6x", 16)
        # p_type, p_offset, p_vaddr, p_filesz of Elf64_Phdr (p_flags after p_type)
        phformat, phsize = "I4xQQ8xQ16x", 56
    else:
        e_type, machine, _, _, phoff, _, _, _, phentsize, phnum = lay.at(src, "HHIIIIIHHH6x", 16)
        # p_type, p_offset, p_vaddr, p_filesz of Elf32_Phdr (p_flags after p_filesz)
        phformat, phsize = "III4xI12x", 32
    if phnum > MAX_PROGRAM_HEADERS:
        raise ElfError(f"{phnum} program headers (at most {MAX_PROGRAM_HEADERS} read)")
    if phnum and phentsize != phsize:
        raise ElfError(f"program header size {phentsize}, expected {phsize}")
    table = src.get(phoff, phnum * phsize)
    loads: list[tuple[int, int, int]] = []
    interp: str | None = None
    dynamic: tuple[int, int] | None = None
    for p_type, p_offset, p_vaddr, p_filesz in struct.iter_unpack(lay.order + phformat, table):
        if p_type == _PT_LOAD:
            loads.append((p_vaddr, p_filesz, p_offset))
        elif p_type == _PT_INTERP and interp is None:
            raw = src.get(p_offset, min(p_filesz, MAX_NAME + 1))
            interp = _text(raw.split(b"\0", 1)[0])
        elif p_type == _PT_DYNAMIC and dynamic is None:
            dynamic = (p_offset, p_filesz)
    if dynamic is None:
        return ElfFacts(elf_class, data, e_type, machine, interp, False)
    entry_size = 16 if lay.c64 else 8
    count = min(dynamic[1] // entry_size, MAX_DYNAMIC_ENTRIES)
    raw = src.get(dynamic[0], count * entry_size)
    words = struct.unpack(f"{lay.order}{2 * count}{lay.word}", raw)
    keys = words[0::2]
    end = keys.index(_DT_NULL) if _DT_NULL in keys else count  # DT_NULL ends the section
    tags = list(zip(keys[:end], words[1 : 2 * end : 2], strict=True))
    dyn = _Dynamic(src, lay, loads, tags)
    strtab_addr = dyn.first(_DT.STRTAB)
    needed: list[str] = []
    soname = None
    if strtab_addr is not None:
        strtab = dyn.offset(strtab_addr, "DT_STRTAB")
        wanted = itertools.islice((v for t, v in tags if t == _DT_NEEDED), MAX_NEEDED)
        needed = [dyn.string(strtab, v) for v in wanted]
        so = dyn.first(_DT.SONAME)
        soname = dyn.string(strtab, so) if so is not None else None
    return ElfFacts(
        elf_class,
        data,
        e_type,
        machine,
        interp,
        True,
        tuple(needed),
        soname,
        dyn.defines(symbols),
    )


def inspect_bytes(data: bytes, symbols: Collection[str] = ()) -> ElfFacts | None:
    """:func:`parse` over ``data``; ``None`` when it is not a readable ELF file."""

    def read(offset: int, size: int) -> bytes:
        return data[offset : offset + size]

    try:
        return parse(read, symbols)
    except ElfError:
        return None


# -- the facts of content already parsed ---------------------------------------------------


class _Ask(NamedTuple):
    """A step of :class:`ParseMemo`: the block :func:`parse` reads next, and what follows
    each content of it seen so far (the next step, or the end of the parse)."""

    offset: int
    then: dict[bytes, _Ask | _End]


class _End(NamedTuple):
    """How a parse ended: its facts, or the message of the :class:`ElfError` it raised."""

    facts: ElfFacts | None
    error: str


_MEMO_WEIGHT = 2 << 20  # the most of the blocks read that a ParseMemo keeps, in bytes
_MEMO_BLOCKS = 16  # a parse that read more is not kept (python3.11: 10; a crafted one: 256)
_MEMO_STEP = 200  # about the bytes of bookkeeping of one step, beyond its block


class ParseMemo:
    """:func:`parse` that remembers what it answered for the blocks it read.

    :func:`parse` is a function of what ``read`` returns and nothing else: the
    first block it reads is always the same, and which block it reads next
    depends only on the bytes it has read so far. So the blocks it read, in
    order, are a complete key: when ``read`` returns the same bytes for the same
    blocks again, the parse would read the same blocks again and come to the
    same end. The memo is a tree of those reads: :meth:`parse` reads the block
    each step asks for and follows the branch of its exact bytes (a dict keyed by
    the bytes: equal means equal, no digest); where no branch matches, it parses
    for real and adds the branch. Copies of one binary (a new inode for every
    deploy, a ctime moved by anyone's ``setxattr``) are then recognised from
    their few blocks (2 or 3 for most programs) without parsing.

    The blocks kept and their facts (:func:`facts_weight`) weigh at most ``weight``
    bytes: past it, the memo starts afresh. Whoever can write a file that is
    observed can make each write a new branch, up to that bound and no further.
    A parse that read more than :data:`_MEMO_BLOCKS` blocks is not kept at all:
    real programs need a few, and a crafted hash table of 65,536 words would fill
    the memo at each write.
    """

    def __init__(self, symbols: Collection[str], weight: int = _MEMO_WEIGHT) -> None:
        self._symbols = tuple(symbols)
        self._max_weight = weight
        self._weight = 0
        self._root: _Ask | None = None

    def parse(self, read: Read) -> ElfFacts:
        """:func:`parse` of ``read`` with this memo's symbols (raises :class:`ElfError`
        the same way)."""
        step: _Ask | _End | None = self._root
        looked: dict[int, bytes] = {}  # the blocks read on the way, for a parse on a miss
        while isinstance(step, _Ask):
            data = looked[step.offset] = read(step.offset, BLOCK)
            step = step.then.get(data)
        if step is None:
            return self._learn(read, looked)
        if step.facts is None:
            raise ElfError(step.error)
        return step.facts

    def _learn(self, read: Read, looked: dict[int, bytes]) -> ElfFacts:
        """Parse, reading no block ``looked`` holds again, and keep the blocks read."""
        seen: list[tuple[int, bytes]] = []

        def recorded(offset: int, size: int) -> bytes:
            data = looked.pop(offset) if size == BLOCK and offset in looked else read(offset, size)
            seen.append((offset, data))
            return data

        try:
            facts = parse(recorded, self._symbols)
        except ElfError as exc:
            self._add(seen, _End(None, str(exc)))
            raise
        self._add(seen, _End(facts, ""))
        return facts

    def _add(self, seen: list[tuple[int, bytes]], end: _End) -> None:
        if not seen or len(seen) > _MEMO_BLOCKS:
            return
        weight = sum(len(data) + _MEMO_STEP for _, data in seen)
        if end.facts is not None:
            weight += facts_weight(end.facts)
        if self._weight + weight > self._max_weight:
            self._root, self._weight = None, 0
            if weight > self._max_weight:
                return
        if self._root is None:
            self._root = _Ask(seen[0][0], {})
        step = self._root
        for number, (offset, data) in enumerate(seen):
            if step.offset != offset:  # cannot happen: parse reads the same way each time
                return
            last = number == len(seen) - 1
            known = step.then.get(data)
            if last:
                if known is None:
                    step.then[data] = end
                    self._weight += weight
                return
            if not isinstance(known, _Ask):
                if known is not None:  # cannot happen either: the same bytes, another end
                    return
                known = step.then[data] = _Ask(seen[number + 1][0], {})
            step = known
