"""File capabilities: names, libcap's text form, and the ``security.capability`` codec.

Everything here is pure data in, data out. The running kernel's highest
capability number is read by :func:`capkeeper.kernel.cap_last_cap` and passed in
as ``last_cap``; without it, :data:`CAP_LAST_CAP` (the table's own) is assumed.

* :func:`parse` turns libcap text (``cap_net_raw+ep``) into the :class:`CapSet`
  that ``setcap`` (libcap 2.66) would store, and refuses what ``setcap`` refuses.
* :func:`format_text` renders a :class:`CapSet` byte for byte as ``getcap`` prints it.
* :func:`encode` / :func:`decode` convert between :class:`CapSet` and the raw
  xattr value (``struct vfs_cap_data`` / ``vfs_ns_cap_data`` in the kernel's
  ``include/uapi/linux/capability.h``).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from enum import IntEnum
from functools import lru_cache
from typing import Any, NamedTuple, Self

from capkeeper.errors import InvalidCapabilityData, InvalidCapabilityText

__all__ = [
    "CAPABILITY_NAMES",
    "CAP_LAST_CAP",
    "CapSet",
    "Revision",
    "capability_name",
    "capability_number",
    "decode",
    "decode_revision",
    "encode",
    "format_text",
    "parse",
]

CAP_LAST_CAP: int = 40
"""The highest capability number this module has a name for (Linux 5.9+)."""

CAPABILITY_NAMES: tuple[str, ...] = (
    "cap_chown",
    "cap_dac_override",
    "cap_dac_read_search",
    "cap_fowner",
    "cap_fsetid",
    "cap_kill",
    "cap_setgid",
    "cap_setuid",
    "cap_setpcap",
    "cap_linux_immutable",
    "cap_net_bind_service",
    "cap_net_broadcast",
    "cap_net_admin",
    "cap_net_raw",
    "cap_ipc_lock",
    "cap_ipc_owner",
    "cap_sys_module",
    "cap_sys_rawio",
    "cap_sys_chroot",
    "cap_sys_ptrace",
    "cap_sys_pacct",
    "cap_sys_admin",
    "cap_sys_boot",
    "cap_sys_nice",
    "cap_sys_resource",
    "cap_sys_time",
    "cap_sys_tty_config",
    "cap_mknod",
    "cap_lease",
    "cap_audit_write",
    "cap_audit_control",
    "cap_setfcap",
    "cap_mac_override",
    "cap_mac_admin",
    "cap_syslog",
    "cap_wake_alarm",
    "cap_block_suspend",
    "cap_audit_read",
    "cap_perfmon",
    "cap_bpf",
    "cap_checkpoint_restore",
)
"""Capability names as libcap spells them; the index is the capability number."""

_MAX_BITS = 64  # __CAP_MAXBITS: two 32-bit words in v2/v3 values
_MASK64 = (1 << _MAX_BITS) - 1
_NUMBER_BY_NAME = {name: number for number, name in enumerate(CAPABILITY_NAMES)}


def capability_number(name: str) -> int:
    """Return the number of a capability name such as ``cap_net_raw`` (any case).

    Raises :class:`InvalidCapabilityText` for anything that is not a known name;
    the ``cap_`` prefix is required, as in libcap.
    """
    number = _NUMBER_BY_NAME.get(name.lower()) if name.isascii() else None
    if number is None:
        raise InvalidCapabilityText(f"unknown capability {name!r}")
    return number


def capability_name(number: int) -> str:
    """Return libcap's name for a capability number, or the number as text (41..63)."""
    if not 0 <= number < _MAX_BITS:
        raise ValueError(f"capability number {number} is outside 0..{_MAX_BITS - 1}")
    return CAPABILITY_NAMES[number] if number < len(CAPABILITY_NAMES) else str(number)


def _resolve_last_cap(last_cap: int | None) -> int:
    if last_cap is None:
        return CAP_LAST_CAP
    if not 0 <= last_cap < _MAX_BITS:
        raise ValueError(f"last_cap {last_cap} is outside 0..{_MAX_BITS - 1}")
    return last_cap


class Revision(IntEnum):
    """The revision in the top byte of ``magic_etc``."""

    V1 = 1
    V2 = 2
    V3 = 3


class _CapFields(NamedTuple):
    permitted: int = 0
    inheritable: int = 0
    effective: bool = False
    rootid: int = 0


class CapSet(_CapFields):
    """The capabilities of one file, as the kernel stores them.

    ``permitted`` and ``inheritable`` are 64-bit masks (bit n is capability n);
    ``effective`` is the single on-disk effective flag; ``rootid`` is the v3
    namespace root uid, 0 for a v2 value. Instances compare by meaning: the
    effective flag is dropped when no capability is set, since it then grants
    nothing.
    """

    __slots__ = ()

    def __new__(
        cls, permitted: int = 0, inheritable: int = 0, effective: bool = False, rootid: int = 0
    ) -> CapSet:
        for field, value in (("permitted", permitted), ("inheritable", inheritable)):
            if not 0 <= value <= _MASK64:
                raise ValueError(f"{field} mask {value:#x} does not fit in 64 bits")
        if not 0 <= rootid < 1 << 32:
            raise ValueError(f"rootid {rootid} is outside 0..2**32-1")
        effective = bool(effective) and bool(permitted | inheritable)
        return super().__new__(cls, permitted, inheritable, effective, rootid)

    # A NamedTuple's own _make and _replace build the tuple directly: these check.
    @classmethod
    def _make(cls, iterable: Iterable[Any]) -> Self:  # type: ignore[override]  # typeshed: generic
        return cls(*iterable)

    def _replace(self, **changes: Any) -> CapSet:
        return CapSet(**{**self._asdict(), **changes})

    def __repr__(self) -> str:
        return (
            f"CapSet(permitted={self.permitted:#x}, inheritable={self.inheritable:#x}, "
            f"effective={self.effective}, rootid={self.rootid})"
        )

    def capabilities(self) -> frozenset[int]:
        """The capability numbers in the permitted or inheritable set."""
        mask = self.permitted | self.inheritable
        return frozenset(n for n in range(_MAX_BITS) if mask >> n & 1)

    @property
    def is_empty(self) -> bool:
        """True when neither permitted nor inheritable holds any capability."""
        return not (self.permitted | self.inheritable)


# --- the binary codec --------------------------------------------------------

_REVISION_SHIFT = 24  # VFS_CAP_REVISION_SHIFT
_FLAGS_MASK = 0x00FFFFFF  # VFS_CAP_FLAGS_MASK
_FLAG_EFFECTIVE = 0x000001  # VFS_CAP_FLAGS_EFFECTIVE
_SIZES = {Revision.V1: 12, Revision.V2: 20, Revision.V3: 24}  # XATTR_CAPS_SZ_{1,2,3}
_HEADER = struct.Struct("<I")
_V1 = struct.Struct("<3I")
_V2 = struct.Struct("<5I")
_V3 = struct.Struct("<6I")


def _check(data: bytes) -> tuple[Revision, int]:
    """Validate a raw value; return its revision and ``magic_etc``."""
    if len(data) < _HEADER.size:
        raise InvalidCapabilityData(
            f"security.capability value is {len(data)} bytes, too short for the header",
            data,
        )
    (magic,) = _HEADER.unpack_from(data)
    try:
        revision = Revision(magic >> _REVISION_SHIFT)
    except ValueError:
        raise InvalidCapabilityData(
            f"unknown security.capability revision {magic >> _REVISION_SHIFT}", data
        ) from None
    if len(data) != _SIZES[revision]:
        raise InvalidCapabilityData(
            f"a {revision.name.lower()} security.capability value must be "
            f"{_SIZES[revision]} bytes, not {len(data)}",
            data,
        )
    unknown = magic & _FLAGS_MASK & ~_FLAG_EFFECTIVE
    if unknown:
        raise InvalidCapabilityData(
            f"unknown security.capability flags {unknown:#08x}",
            data,
        )
    return revision, magic


def decode_revision(data: bytes) -> Revision:
    """Return the revision of a valid raw value; same validation as :func:`decode`."""
    return _check(data)[0]


def decode(data: bytes) -> CapSet:
    """Decode a raw ``security.capability`` value (v1, v2 or v3).

    Raises :class:`InvalidCapabilityData`, showing the bytes, for a value of the
    wrong size for its revision, an unknown revision or unknown flag bits.
    """
    revision, magic = _check(data)
    effective = bool(magic & _FLAG_EFFECTIVE)
    if revision is Revision.V1:
        _, permitted, inheritable = _V1.unpack(data)
        return CapSet(permitted, inheritable, effective)
    if revision is Revision.V2:
        _, p_low, i_low, p_high, i_high = _V2.unpack(data)
        rootid = 0
    else:
        _, p_low, i_low, p_high, i_high, rootid = _V3.unpack(data)
    return CapSet(p_high << 32 | p_low, i_high << 32 | i_low, effective, rootid)


def encode(caps: CapSet) -> bytes:
    """Encode as the kernel expects: v2 (20 bytes), or v3 (24 bytes) with a non-zero rootid."""
    flags = _FLAG_EFFECTIVE if caps.effective else 0
    words = (
        caps.permitted & 0xFFFFFFFF,
        caps.inheritable & 0xFFFFFFFF,
        caps.permitted >> 32,
        caps.inheritable >> 32,
    )
    if caps.rootid == 0:
        return _V2.pack(Revision.V2 << _REVISION_SHIFT | flags, *words)
    return _V3.pack(Revision.V3 << _REVISION_SHIFT | flags, *words, caps.rootid)


# --- libcap's text form -------------------------------------------------------

# libcap's per-capability flag bits (LIBCAP_EFF, LIBCAP_PER, LIBCAP_INH); the
# canonical text orders clauses by this 3-bit number.
_E, _P, _I = 1, 2, 4
_FLAG_BITS = {"e": _E, "i": _I, "p": _P}

# C-locale ctype classes: libcap uses isspace/isalnum/isdigit, not Unicode.
_SPACE = frozenset(" \t\n\v\f\r")
_DIGITS = frozenset("0123456789")
_ALPHA = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
_WORD = _ALPHA | _DIGITS | {"_"}
_OCTAL = frozenset("01234567")
_HEX = _DIGITS | frozenset("abcdefABCDEF")


def _letters(flags: int) -> str:
    return "".join(letter for letter, bit in (("e", _E), ("i", _I), ("p", _P)) if flags & bit)


def _split_clauses(text: str) -> list[str]:
    clauses: list[str] = []
    current: list[str] = []
    for char in text:
        if char in _SPACE:
            if current:
                clauses.append("".join(current))
                current = []
        else:
            current.append(char)
    if current:
        clauses.append("".join(current))
    return clauses


def _strtoul(clause: str, pos: int) -> tuple[int, int]:
    """Parse an unsigned number the way ``strtoul(s, &end, 0)`` does; ``clause[pos]`` is a digit."""
    if clause.startswith(("0x", "0X"), pos) and pos + 2 < len(clause) and clause[pos + 2] in _HEX:
        base, start, allowed = 16, pos + 2, _HEX
    elif clause[pos] == "0":
        base, start, allowed = 8, pos, _OCTAL
    else:
        base, start, allowed = 10, pos, _DIGITS
    end = start
    while end < len(clause) and clause[end] in allowed:
        end += 1
    return int(clause[start:end], base), end


class _Clause:
    """Parses one whitespace-free clause; raises with the clause named in the message."""

    def __init__(self, clause: str, index: int, all_mask: int) -> None:
        self.text = clause
        self.index = index
        self.all_mask = all_mask

    def error(self, what: str) -> InvalidCapabilityText:
        return InvalidCapabilityText(f"{what} (clause {self.index}: {self.text!r})")

    def describe(self, pos: int) -> str:
        return f"{self.text[pos]!r}" if pos < len(self.text) else "the end of the clause"

    def capability(self, pos: int) -> tuple[int, int]:
        """Read one capability name or number at ``pos``; return (its bit, next position)."""
        text = self.text
        if text[pos] in _DIGITS:
            number, end = _strtoul(text, pos)
            if number >= _MAX_BITS:
                literal = text[pos:end]
                value = "" if literal == str(number) else f" (= {number})"
                raise self.error(
                    f"capability number {literal}{value} is out of range 0..{_MAX_BITS - 1}"
                )
            return 1 << number, end
        end = pos
        while end < len(text) and text[end] in _WORD:
            end += 1
        word = text[pos:end]
        lowered = word.lower()
        # Debian's libcap is built with its gperf name table, which knows every
        # name regardless of the running kernel (cap_perfmon was accepted with
        # the kernel's last capability faked down to 37).
        named = _NUMBER_BY_NAME.get(lowered)
        if named is None:
            hint = " (names need the 'cap_' prefix)" if "cap_" + lowered in _NUMBER_BY_NAME else ""
            while end < len(text) and text[end] not in ",=+-":
                end += 1
            raise self.error(f"unknown capability {text[pos:end]!r}{hint}")
        return 1 << named, end

    def parse(self) -> tuple[int, list[tuple[str, int]]]:
        """Return the capability mask and the actions as (operator, flags) pairs."""
        text = self.text
        pos = 0
        mask = 0
        listed = text[0] in _WORD
        if listed:
            while True:
                if text[pos : pos + 3].lower() == "all" and (
                    pos + 3 >= len(text) or text[pos + 3] not in _WORD
                ):
                    # libcap's forceall() assigns the list rather than adding to
                    # it: "60,all" drops 60 while "all,60" keeps it.
                    mask = self.all_mask
                    pos += 3
                else:
                    bit, pos = self.capability(pos)
                    mask |= bit
                if pos >= len(text) or text[pos] != ",":
                    break
                pos += 1
                if pos >= len(text) or text[pos] not in _WORD:
                    raise self.error(f"expected a capability after ',', found {self.describe(pos)}")
        elif text[0] in "+-":
            raise self.error(f"'{text[0]}' needs a capability list before it")
        else:
            mask = self.all_mask

        if pos >= len(text):
            raise self.error("missing operator '=', '+' or '-' after the capability list")
        op = text[pos]
        pos += 1
        if op not in "=+-":
            expected = "'=', '+' or '-'" if listed else "a capability or '='"
            raise self.error(f"expected {expected}, found {op!r}")
        if op == "=" and pos < len(text) and text[pos] in "+-":
            if not listed:
                raise self.error(f"'={text[pos]}' needs a capability list before it")
            op += text[pos]
            pos += 1

        actions: list[tuple[str, int]] = []
        while True:
            flags = 0
            start = pos
            while pos < len(text) and text[pos] not in "+-":
                letter = text[pos]
                if letter not in _FLAG_BITS:
                    raise self.error(
                        f"unknown flag {letter!r} after '{op}' (flags are lower-case e, i, p)"
                    )
                flags |= _FLAG_BITS[letter]
                pos += 1
            if pos == start and op != "=":
                raise self.error(f"'{op}' needs at least one of the flags e, i, p")
            actions.append((op, flags))
            if pos >= len(text):
                return mask, actions
            if not listed:
                raise self.error(f"'{text[pos]}' after '=' needs a capability list before the '='")
            op = text[pos]
            pos += 1


def _act(value: int, mask: int, op: str, selected: bool) -> int:
    """Apply one action to one of the e, i, p masks; ``selected`` if its flag was given."""
    if op[0] == "=":  # "=", "=+" and "=-" first clear e, i and p
        value &= ~mask
    if not selected:
        return value
    return value & ~mask if op[-1] == "-" else value | mask


def parse(text: str, *, last_cap: int | None = None) -> CapSet:
    """Parse libcap capability text into the file capabilities ``setcap`` would store.

    Accepts exactly what ``setcap`` (libcap 2.66) accepts: whitespace-separated
    clauses of ``[caplist] op flags [op flags]...`` applied left to right, where
    a capability is a case-insensitive ``cap_`` name, ``all``, or a number below
    64 (decimal, ``0x`` hex or leading-0 octal); ``all`` and a list-less ``=``
    mean capabilities 0..``last_cap`` (default: the running kernel's). Like
    ``setcap`` it refuses an effective set that is neither empty nor exactly
    permitted plus inheritable, and drops effective bits outside that union.

    Unlike ``setcap``, empty or all-whitespace text is refused rather than
    stored as "no capabilities": write ``=`` for that.

    Raises :class:`InvalidCapabilityText` naming the offending clause.
    """
    # A state declares the same few texts thousands of times: parse each once.
    return _parse(text, _resolve_last_cap(last_cap))


@lru_cache(maxsize=256)
def _parse(text: str, last_cap: int) -> CapSet:
    all_mask = (1 << last_cap + 1) - 1
    clauses = _split_clauses(text)
    if not clauses:
        raise InvalidCapabilityText(
            "empty capability text (write '=' for a file with no capabilities)"
        )
    held = {_E: 0, _P: 0, _I: 0}
    # The clause that last named each capability, for error messages.
    named_by = [0] * _MAX_BITS
    for index, clause_text in enumerate(clauses, start=1):
        mask, actions = _Clause(clause_text, index, all_mask).parse()
        for op, flags in actions:
            held = {bit: _act(value, mask, op, bool(flags & bit)) for bit, value in held.items()}
        for number in range(_MAX_BITS):
            if mask >> number & 1:
                named_by[number] = index
    effective, permitted, inheritable = held[_E], held[_P], held[_I]

    # libcap's _fcaps_save: a non-empty effective set must cover permitted and
    # inheritable, since on disk effective is one flag; extra effective bits drop.
    missing = (permitted | inheritable) & ~effective
    if effective and missing:
        number = (missing & -missing).bit_length() - 1
        letters = _letters(_P * (permitted >> number & 1) | _I * (inheritable >> number & 1))
        raise InvalidCapabilityText(
            f"{capability_name(number)} is {letters} but not e, while other capabilities are "
            "effective; effective capabilities must be empty or exactly match the union "
            "of permitted and inheritable "
            f"(clause {named_by[number]}: {clauses[named_by[number] - 1]!r})"
        )
    return CapSet(permitted, inheritable, effective != 0)


def format_text(caps: CapSet, *, last_cap: int | None = None) -> str:
    """Render ``caps`` exactly as ``getcap`` (libcap 2.66) prints it after the path.

    The output opens with ``=`` and the flag combination most capabilities in
    0..``last_cap`` share (default: the running kernel's last capability), then
    one ``+``/``-`` clause per other combination; capabilities above
    ``last_cap`` come last as ``+`` clauses. The rootid is not shown.
    """
    # Every verdict describes what it found: the same few values, thousands of times.
    return _format_text(caps, _resolve_last_cap(last_cap) + 1)


@lru_cache(maxsize=256)
def _format_text(caps: CapSet, limit: int) -> str:
    effective = (caps.permitted | caps.inheritable) if caps.effective else 0
    states = [
        _E * (effective >> n & 1)
        | _P * (caps.permitted >> n & 1)
        | _I * (caps.inheritable >> n & 1)
        for n in range(_MAX_BITS)
    ]
    counts = [0] * 8
    for state in states[:limit]:
        counts[state] += 1
    # The most common combination; max() keeps the first, i.e. lowest, on ties.
    baseline = max(range(8), key=counts.__getitem__)

    parts = ["=" + _letters(baseline)]
    for state in range(7, -1, -1):
        if state == baseline or not counts[state]:
            continue
        names = ",".join(capability_name(n) for n in range(limit) if states[n] == state)
        raised, lowered = _letters(state & ~baseline), _letters(baseline & ~state)
        if raised:
            # cap_to_text shortens "= a+ep b+i" to "a=ep b+i" when nothing is the baseline.
            if parts == ["="]:
                parts = []
                names += "=" + raised
            else:
                names += "+" + raised
        if lowered:
            names += "-" + lowered
        parts.append(names)
    for state in range(7, 0, -1):
        high = [capability_name(n) for n in range(limit, _MAX_BITS) if states[n] == state]
        if high:
            parts.append(",".join(high) + "+" + _letters(state))
    return " ".join(parts)
