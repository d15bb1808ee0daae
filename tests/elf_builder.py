"""Build small, well-formed ELF files in memory, to parse and then to break on purpose.

One ``PT_LOAD`` maps the whole file at address 0, so a virtual address equals
its file offset; :class:`Built` tells where each part landed.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

from capkeeper.elf import gnu_hash

PT_LOAD, PT_DYNAMIC, PT_INTERP = 1, 2, 3
DT_NEEDED, DT_HASH, DT_STRTAB, DT_SYMTAB, DT_STRSZ, DT_SYMENT, DT_SONAME = 1, 4, 5, 6, 10, 11, 14
DT_GNU_HASH = 0x6FFFFEF5


@dataclass(frozen=True)
class Built:
    data: bytes
    phoff: int
    strtab: int
    symtab: int
    hash: int  # the hash table in use (0: none)
    dynamic: int
    c64: bool
    lsb: bool

    @property
    def order(self) -> str:
        return "<" if self.lsb else ">"

    def patch(self, offset: int, fmt: str, *values: int) -> bytes:
        """The file with ``values`` packed at ``offset``."""
        data = bytearray(self.data)
        struct.pack_into(self.order + fmt, data, offset, *values)
        return bytes(data)


def build_elf(
    *,
    c64: bool = True,
    lsb: bool = True,
    e_type: int = 3,
    interp: str | None = "/lib64/ld-linux-x86-64.so.2",
    needed: Sequence[str] = ("libc.so.6",),
    soname: str | None = None,
    exports: Sequence[str] = (),
    imports: Sequence[str] = (),
    hash: str = "gnu",
    dynamic: bool = True,
    padding: int = 0,
) -> Built:
    """An ELF file with the given program interpreter, dynamic entries and symbols."""
    order = "<" if lsb else ">"
    word = "Q" if c64 else "I"
    wsize = 8 if c64 else 4
    ehsize, phsize = (64, 56) if c64 else (52, 32)
    phnum = 1 + (interp is not None) + dynamic
    phoff = ehsize
    cursor = phoff + phnum * phsize

    def align(n: int) -> int:
        return (n + 7) & ~7

    interp_at = cursor
    interp_bytes = interp.encode() + b"\0" if interp is not None else b""
    cursor = align(cursor + len(interp_bytes))

    strtab = bytearray(b"\0")

    def add(name: str) -> int:
        strtab.extend(name.encode() + b"\0")
        return len(strtab) - len(name.encode()) - 1

    needed_at = [add(n) for n in needed]
    soname_at = add(soname) if soname is not None else None
    names = [*imports, *exports]
    name_at = [add(n) for n in names]
    strtab_at = cursor
    cursor = align(cursor + len(strtab))

    syment = 24 if c64 else 16
    symtab_at = cursor
    symbols = bytearray(syment)  # STN_UNDEF
    for index, offset in enumerate(name_at):
        shndx = 0 if index < len(imports) else 1
        if c64:
            symbols += struct.pack(order + "IBBHQQ", offset, 0x12, 0, shndx, 0x1000, 0)
        else:
            symbols += struct.pack(order + "IIIBBH", offset, 0x1000, 0, 0x12, 0, shndx)
    cursor = align(cursor + len(symbols))

    hash_at = cursor
    table = b""
    if hash == "gnu":
        bits = wsize * 8
        symoffset = 1 + len(imports)
        bloom = 0
        chain = []
        for position, name in enumerate(exports):
            h = gnu_hash(name.encode())
            bloom |= 1 << (h % bits) | 1 << ((h >> 6) % bits)
            last = position == len(exports) - 1
            chain.append((h & ~1) | last)
        bucket = symoffset if exports else 0
        table = struct.pack(order + "4I", 1, symoffset, 1, 6) + struct.pack(order + word, bloom)
        table += struct.pack(order + "I", bucket) + struct.pack(order + f"{len(chain)}I", *chain)
    elif hash == "sysv":
        count = 1 + len(names)
        links = [0] + [i + 1 if i + 1 < count else 0 for i in range(1, count)]
        table = struct.pack(order + "2I", 1, count) + struct.pack(order + "I", 1 if names else 0)
        table += struct.pack(order + f"{count}I", *links)
    cursor = align(cursor + len(table))

    tags: list[tuple[int, int]] = [(DT_NEEDED, n) for n in needed_at]
    if soname_at is not None:
        tags.append((DT_SONAME, soname_at))
    tags += [(DT_STRTAB, strtab_at), (DT_STRSZ, len(strtab)), (DT_SYMTAB, symtab_at)]
    tags.append((DT_SYMENT, syment))
    if hash == "gnu":
        tags.append((DT_GNU_HASH, hash_at))
    elif hash == "sysv":
        tags.append((DT_HASH, hash_at))
    tags.append((0, 0))
    dynamic_at = cursor
    dyn = b"".join(struct.pack(order + word * 2, t, v) for t, v in tags) if dynamic else b""
    cursor += len(dyn)
    total = cursor + padding

    def phdr(p_type: int, offset: int, size: int) -> bytes:
        if c64:
            return struct.pack(order + "IIQQQQQQ", p_type, 5, offset, offset, offset, size, size, 8)
        return struct.pack(order + "IIIIIIII", p_type, offset, offset, offset, size, size, 5, 8)

    headers = phdr(PT_LOAD, 0, total)
    if interp is not None:
        headers += phdr(PT_INTERP, interp_at, len(interp_bytes))
    if dynamic:
        headers += phdr(PT_DYNAMIC, dynamic_at, len(dyn))
    ident = b"\x7fELF" + bytes([2 if c64 else 1, 1 if lsb else 2, 1]) + bytes(9)
    if c64:
        header = struct.pack(
            order + "HHIQQQIHHHHHH", e_type, 62, 1, 0x1000, phoff, 0, 0, ehsize, phsize, phnum,
            64, 0, 0,
        )  # fmt: skip
    else:
        header = struct.pack(
            order + "HHIIIIIHHHHHH", e_type, 3, 1, 0x1000, phoff, 0, 0, ehsize, phsize, phnum,
            40, 0, 0,
        )  # fmt: skip
    data = bytearray(total)
    data[0 : ehsize + len(headers)] = ident + header + headers
    data[interp_at : interp_at + len(interp_bytes)] = interp_bytes
    data[strtab_at : strtab_at + len(strtab)] = strtab
    data[symtab_at : symtab_at + len(symbols)] = symbols
    data[hash_at : hash_at + len(table)] = table
    data[dynamic_at : dynamic_at + len(dyn)] = dyn
    return Built(
        bytes(data),
        phoff,
        strtab_at,
        symtab_at,
        hash_at if table else 0,
        dynamic_at,
        c64,
        lsb,
    )
