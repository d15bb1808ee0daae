"""Frozen data shared by every layer: a declared entry and what was observed on a file.

Pure: no module here does I/O. :mod:`capkeeper.state` builds :class:`Entry` values from
the state files; :mod:`capkeeper.files` builds :class:`Hop` and :class:`Observation`
values from one open descriptor; the pure core (:mod:`capkeeper.trust`,
:mod:`capkeeper.reconcile`, :mod:`capkeeper.schedule`) only reads them.

They are NamedTuples, like the other value classes of the modules a start or a
one-shot imports, not dataclasses: a dataclass is built by compiling generated
code, about 1.5 ms each when the module is imported (27 of them were 40 ms of
every start), and a tuple is constructed in C, once per check for an
:class:`Observation`.
"""

from __future__ import annotations

from enum import StrEnum
from typing import NamedTuple

from capkeeper.capabilities import CapSet
from capkeeper.elf import ElfFacts

__all__ = ["Entry", "Hop", "Kind", "Observation"]


class Kind(StrEnum):
    """What the first bytes of a regular file say it is."""

    ELF = "elf"
    SCRIPT = "script"
    OTHER = "other"
    NOT_REGULAR = "not a regular file"


class Hop(NamedTuple):
    """One directory or symlink crossed on the way to the file."""

    path: str
    uid: int
    mode: int
    is_symlink: bool = False
    target: str = ""  # symlink text


class Observation(NamedTuple):
    """Facts about a declared file, all taken from one open descriptor."""

    path: str  # as declared
    resolved: str  # the path actually opened, symlinks resolved
    hops: tuple[Hop, ...]  # "/" first, the final file's directory last, symlinks in between
    uid: int
    gid: int
    mode: int
    dev: int
    ino: int
    kind: Kind
    interpreter: str  # for scripts: the #! line
    caps: CapSet | None  # None: no security.capability
    caps_problem: str | None  # present but unreadable (legacy v1, foreign v3, malformed)
    sha256: str | None  # computed only when asked
    nlink: int = 1
    size: int = 0
    mtime_ns: int = 0  # with size: content identity (ctime also moves with our own setxattr)
    xattr_supported: bool = True  # False: the file system has no extended attributes
    elf: ElfFacts | None = None  # for ELF files whose headers could be read


class Entry(NamedTuple):
    """One declared binary, validated. Where it was declared (``source``) is left out
    of comparisons: two entries are equal when they declare the same."""

    path: str
    caps: CapSet
    caps_text: str  # canonical, as getcap prints it
    owner: str = "root"
    owner_uid: int = 0
    sha256: str | None = None
    allow_inheritable: bool = False
    allow_interpreter: bool = False
    source: str = ""  # "state.d/web.toml: entry 3"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Entry):
            return NotImplemented
        return self[:_COMPARED] == other[:_COMPARED]

    def __ne__(self, other: object) -> bool:
        if not isinstance(other, Entry):
            return NotImplemented
        return self[:_COMPARED] != other[:_COMPARED]

    def __hash__(self) -> int:
        return hash(self[:_COMPARED])


_COMPARED = len(Entry.__match_args__) - 1  # every field but source, the last
