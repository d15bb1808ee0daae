"""Review of issue 11's speed-ups: what a memo of the trust rule may keep.

The route memo (:func:`capkeeper.trust.route_refusals`) remembers verdicts by the
route's hops. A route through a directory an attacker owns is whatever the attacker
makes it: up to 40 symlinks of 4095 bytes, tens of thousands of hops, and a new one
at every check. Remembering those verdicts lets the attacker fill the daemon's memory.
"""

from __future__ import annotations

import gc
import os
import subprocess
import tracemalloc
from pathlib import Path

from capkeeper import files
from capkeeper.capabilities import format_text, parse
from capkeeper.kernel import cap_last_cap
from capkeeper.model import Entry
from capkeeper.trust import assess
from tests.test_attacks import ATTACKER, SYSTEM_PYTHON, attacker_dir, setpriv

__all__ = ["attacker_dir"]  # the fixture, imported for pytest

LAST_CAP = cap_last_cap()
_PAD = "d/../" * 250  # 250 directory hops a symlink, 10,000 for the route
_ROUTES = 6


def _as_attacker(home: Path, code: str) -> None:
    subprocess.run([*setpriv(), SYSTEM_PYTHON, "-I", "-c", code], cwd=home, check=True)


def test_refused_routes_an_attacker_varies_are_not_remembered(attacker_dir: Path) -> None:
    """Attack: the attacker owns a directory on a declared path and makes its route 40
    long symlinks, retargeting the last one before each check.
    Runs as: attacker 4242 makes and changes the symlinks; the checks run as root.
    Never: memory kept after the checks grows with the number of routes they met."""
    home = attacker_dir
    _as_attacker(
        home,
        "import os\n"
        "os.mkdir('d'); open('bin', 'w').close()\n"
        f"for i in range(39): os.symlink({_PAD!r} + 'l%d' % (i + 1), 'l%d' % i)\n"
        f"os.symlink({_PAD!r} + 'bin', 'l39')\n",
    )
    declared = str(home / "l0")
    caps = parse("cap_net_raw=ep", last_cap=LAST_CAP)
    entry = Entry(path=declared, caps=caps, caps_text=format_text(caps, last_cap=LAST_CAP))

    def judge() -> int:
        observation = files.observe(declared)
        refusals = assess(entry, observation, last_cap=LAST_CAP)
        assert refusals, "a route through the attacker's directory must be refused"
        return len(observation.hops)

    assert judge() > 10_000
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for attempt in range(1, _ROUTES + 1):
            _as_attacker(
                home,
                f"import os; os.symlink({'./' * attempt!r} + {_PAD!r} + 'bin', 'l39.new');"
                " os.rename('l39.new', 'l39')",
            )
            judge()
        gc.collect()
        kept = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    # One verdict on such a route is ~4.5 MB; remembering all would keep ~27 MB.
    assert kept < 2_000_000, f"{kept} bytes kept after {_ROUTES} refused routes"
    assert os.lstat(home / "l39").st_uid == ATTACKER


_CRAFT_ELF = r"""
import random, struct, sys
# A 64-bit shared object whose GNU hash table has the largest Bloom filter the parser
# reads (65,536 words), random each time: its dynamic table names DT_STRTAB, DT_SYMTAB
# and DT_GNU_HASH, so looking up the marker symbols reads the filter.
rng = random.Random(int(sys.argv[2]))
words = 1 << 16
dyn_off, str_off, sym_off, hash_off = 176, 240, 256, 304
table = struct.pack("<4I", 1, 1, words, 0)
table += b"".join(struct.pack("<Q", rng.getrandbits(64)) for _ in range(words))
table += struct.pack("<2I", 1, 1)
end = hash_off + len(table)
ident = b"\x7fELF" + bytes([2, 1, 1]) + bytes(9)
ehdr = ident + struct.pack("<HHIQQQIHHHHHH", 3, 62, 1, 0, 64, 0, 0, 64, 56, 2, 0, 0, 0)
load = struct.pack("<IIQQQQQQ", 1, 5, 0, 0, 0, end, end, 0x1000)
dynamic = struct.pack("<IIQQQQQQ", 2, 6, dyn_off, dyn_off, dyn_off, 64, 64, 8)
tags = struct.pack("<8Q", 5, str_off, 6, sym_off, 0x6FFFFEF5, hash_off, 0, 0)
strtab = b"\0Py_Main\0".ljust(16, b"\0")
with open(sys.argv[1], "wb") as out:
    out.write(ehdr + load + dynamic + tags + strtab + bytes(48) + table)
"""


def test_hostile_bloom_filters_are_not_remembered(attacker_dir: Path) -> None:
    """Attack: the attacker rewrites a declared file it can write (in its own directory)
    with an ELF whose GNU hash Bloom filter is 65,536 random words, before each check.
    Runs as: attacker 4242 writes the file; the checks run as root.
    Never: memory kept after the checks grows with the filters they read."""
    target = attacker_dir / "tool"

    def judge(seed: int) -> None:
        crafted = [*setpriv(), SYSTEM_PYTHON, "-I", "-c", _CRAFT_ELF, str(target), str(seed)]
        subprocess.run(crafted, check=True)
        assert files.observe(str(target)).elf is not None

    judge(0)
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for seed in range(1, 9):
            judge(seed)
        gc.collect()
        kept = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    # A filter of 65,536 words is ~2.9 MB as a tuple of ints; remembering 8 is ~23 MB.
    assert kept < 4_000_000, f"{kept} bytes kept after 8 hostile Bloom filters"


_CRAFT_NEEDED = r"""
import struct, sys
def craft(seed):
    n = 128  # DT_NEEDED names of 255 bytes, each file its own
    names = b"".join((b"%03d" % i + b"%06d" % seed).ljust(255, b"x") + b"\0" for i in range(n))
    strtab = b"\0" + names
    dyn_off = 176
    tags = [(1, 1 + 256 * i) for i in range(n)] + [(5, 0), (10, len(strtab)), (0, 0)]
    str_off = dyn_off + 16 * len(tags)
    tags[n] = (5, str_off)
    dyn = b"".join(struct.pack("<QQ", t, v) for t, v in tags)
    end = str_off + len(strtab)
    ehdr = b"\x7fELF" + bytes([2, 1, 1]) + bytes(9) + struct.pack(
        "<HHIQQQIHHHHHH", 3, 62, 1, 0, 64, 0, 0, 64, 56, 2, 0, 0, 0)
    ph = struct.pack("<IIQQQQQQ", 1, 5, 0, 0, 0, end, end, 0x1000) + struct.pack(
        "<IIQQQQQQ", 2, 6, dyn_off, dyn_off, dyn_off, len(dyn), len(dyn), 8)
    return ehdr + ph + dyn + strtab
for seed in range(int(sys.argv[1])):
    with open("tool%04d" % seed, "wb") as out:
        out.write(craft(seed))
"""
_NEEDED_FILES = 800


def test_elf_facts_of_hostile_names_stay_bounded(attacker_dir: Path) -> None:
    """Attack: the attacker writes ELF files whose DT_NEEDED names are 128 of 255 bytes
    (about 40 kB of facts each), each with other names: what every rewrite of one
    declared file it can write gives the daemon, which remembers the facts of each.
    Runs as: attacker 4242 writes the files; the checks run as root.
    Never: the facts kept grow past the cache's weight bound (16 MiB)."""
    _as_attacker(attacker_dir, _CRAFT_NEEDED.replace("sys.argv[1]", str(_NEEDED_FILES)))
    tools = sorted(attacker_dir.glob("tool*"))
    assert len(tools) == _NEEDED_FILES
    first = files.observe(str(tools[0])).elf
    assert first is not None
    assert len(first.needed) == 128
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for tool in tools[1:]:
            assert files.observe(str(tool)).elf is not None
        gc.collect()
        kept = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    # Without the bound: ~40 kB a file, ~32 MB for 800.
    assert kept < 20_000_000, f"{kept} bytes kept after {_NEEDED_FILES} hostile ELF files"
