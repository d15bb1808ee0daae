"""Unit tests for capkeeper.capabilities, from the reference tables (sections 2.3 and 3.3).

Every row was observed with setcap/getcap from libcap 2.66 on a kernel whose
last capability is 40, so the tests pass ``last_cap=40`` and do not depend on
the machine they run on. Rows with another ``last_cap`` were observed with the
kernel's answer to ``PR_CAPBSET_READ`` faked lower for setcap and getcap.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from capkeeper.capabilities import (
    CAP_LAST_CAP,
    CAPABILITY_NAMES,
    CapSet,
    Revision,
    capability_name,
    capability_number,
    decode,
    decode_revision,
    encode,
    format_text,
    parse,
)
from capkeeper.errors import InvalidCapabilityData, InvalidCapabilityText
from capkeeper.kernel import cap_last_cap

ALL_EP = "01000002ffffffff00000000ff01000000000000"
EMPTY = "0000000200000000000000000000000000000000"
NET_RAW_EP = "0100000200200000000000000000000000000000"
NET_RAW_EIP = "0100000200200000002000000000000000000000"
EFFECTIVE_ONLY = "0100000200000000000000000000000000000000"
NET_RAW_EP_V3 = "01000003" + NET_RAW_EP[8:] + "e8030000"

# (setcap input, stored security.capability, getcap output)
REFERENCE_ROWS = [
    ("cap_net_raw+ep", NET_RAW_EP, "cap_net_raw=ep"),
    ("cap_net_raw+p", "0000000200200000000000000000000000000000", "cap_net_raw=p"),
    ("cap_net_raw+eip", NET_RAW_EIP, "cap_net_raw=eip"),
    ("cap_net_raw+i", "0000000200000000002000000000000000000000", "cap_net_raw=i"),
    ("cap_net_raw+ei", "0100000200000000002000000000000000000000", "cap_net_raw=ei"),
    ("cap_bpf+ep", "0100000200000000000000008000000000000000", "cap_bpf=ep"),
    (
        "cap_checkpoint_restore+ep",
        "0100000200000000000000000001000000000000",
        "cap_checkpoint_restore=ep",
    ),
    (
        "cap_net_bind_service,cap_net_raw=ep",
        "0100000200240000000000000000000000000000",
        "cap_net_bind_service,cap_net_raw=ep",
    ),
    ("all=ep", ALL_EP, "=ep"),
    ("all=p cap_chown-p", "00000002feffffff00000000ff01000000000000", "=p cap_chown-p"),
    ("all=eip", "01000002ffffffffffffffffff010000ff010000", "=eip"),
    ("=ep", ALL_EP, "=ep"),
    ("=", EMPTY, "="),
    ("all=", EMPTY, "="),
    ("all+ep", ALL_EP, "=ep"),
    ("all=ep cap_net_raw-ep", "01000002ffdfffff00000000ff01000000000000", "=ep cap_net_raw-ep"),
    (
        "all=eip cap_setfcap-i",
        "01000002ffffffffffffff7fff010000ff010000",
        "=eip cap_setfcap-i",
    ),
    (
        "all=p cap_chown,cap_kill-p 63+p",
        "00000002deffffff00000000ff01008000000000",
        "=p cap_chown,cap_kill-p 63+p",
    ),
    ("=ep 41,42-ep", ALL_EP, "=ep"),
    ("cap_chown=ep cap_chown-e", "0000000201000000000000000000000000000000", "cap_chown=p"),
    (
        "cap_chown=ep cap_kill=eip cap_net_raw=ei",
        "0100000221000000202000000000000000000000",
        "cap_kill=eip cap_net_raw+ei cap_chown+ep",
    ),
    (
        "cap_chown=p cap_kill=ip cap_net_raw=i",
        "0000000221000000202000000000000000000000",
        "cap_kill=ip cap_net_raw+i cap_chown+p",
    ),
    (
        "cap_setfcap,cap_net_raw=eip cap_sys_admin=ei",
        "0100000200200080002020800000000000000000",
        "cap_net_raw,cap_setfcap=eip cap_sys_admin+ei",
    ),
    ("CAP_NET_RAW+ep", NET_RAW_EP, "cap_net_raw=ep"),
    ("Cap_Net_Raw=ep", NET_RAW_EP, "cap_net_raw=ep"),
    ("ALL=ep", ALL_EP, "=ep"),
    ("13=ep", NET_RAW_EP, "cap_net_raw=ep"),
    ("0x0d=ep", NET_RAW_EP, "cap_net_raw=ep"),
    ("015=ep", NET_RAW_EP, "cap_net_raw=ep"),
    ("0=ep", "0100000201000000000000000000000000000000", "cap_chown=ep"),
    ("13,cap_chown=ep", "0100000201200000000000000000000000000000", "cap_chown,cap_net_raw=ep"),
    ("38=ep", "0100000200000000000000004000000000000000", "cap_perfmon=ep"),
    ("40=ep", "0100000200000000000000000001000000000000", "cap_checkpoint_restore=ep"),
    ("41=ep", "0100000200000000000000000002000000000000", "= 41+ep"),
    ("63=ep", "0100000200000000000000000000008000000000", "= 63+ep"),
    ("cap_net_raw+pe", NET_RAW_EP, "cap_net_raw=ep"),
    ("cap_net_raw=e", EFFECTIVE_ONLY, "="),
    ("cap_net_raw+e", EFFECTIVE_ONLY, "="),
    ("cap_net_raw=pe cap_chown=e", NET_RAW_EP, "cap_net_raw=ep"),
    ("cap_chown+p cap_chown+e", "0100000201000000000000000000000000000000", "cap_chown=ep"),
    ("cap_net_raw=ep cap_net_raw=p", "0000000200200000000000000000000000000000", "cap_net_raw=p"),
    ("cap_net_raw=ep cap_net_raw-p", EFFECTIVE_ONLY, "="),
    ("cap_net_raw,all=p", "00000002ffffffff00000000ff01000000000000", "=p"),
    ("cap_net_raw=+ep", NET_RAW_EP, "cap_net_raw=ep"),
    ("cap_net_raw=-ep", EMPTY, "="),
    ("cap_net_raw=", EMPTY, "="),
    ("cap_net_raw+ep cap_net_raw=", EMPTY, "="),
    ("all-ep", EMPTY, "="),
    ("all=ep all-ep", EMPTY, "="),
    ("=p cap_net_raw=-p", "00000002ffdfffff00000000ff01000000000000", "=p cap_net_raw-p"),
    ("cap_net_raw=pep", NET_RAW_EP, "cap_net_raw=ep"),
    ("cap_net_raw=e+p", NET_RAW_EP, "cap_net_raw=ep"),
    ("cap_net_raw=p+e", NET_RAW_EP, "cap_net_raw=ep"),
    ("cap_net_raw+ep+i", NET_RAW_EIP, "cap_net_raw=eip"),
    ("cap_net_raw=i cap_net_raw+ep", NET_RAW_EIP, "cap_net_raw=eip"),
    ("cap_net_raw+ep-p", EFFECTIVE_ONLY, "="),
    ("cap_net_raw+p-p+e", EFFECTIVE_ONLY, "="),
    ("cap_net_raw=ep-e", "0000000200200000000000000000000000000000", "cap_net_raw=p"),
    ("cap_net_raw=ip", "0000000200200000002000000000000000000000", "cap_net_raw=ip"),
    (" cap_net_raw=ep", NET_RAW_EP, "cap_net_raw=ep"),
    # observed while writing this module
    ("0X0D=ep", NET_RAW_EP, "cap_net_raw=ep"),
    ("cap_net_raw=ep\vcap_net_raw=ep", NET_RAW_EP, "cap_net_raw=ep"),
    ("60,all=i", "0000000200000000ffffffff00000000ff010000", "=i"),
    ("all,60=i", "0000000200000000ffffffff00000000ff010010", "=i 60+i"),
]


@pytest.mark.parametrize(("text", "stored", "shown"), REFERENCE_ROWS)
def test_reference_row(text: str, stored: str, shown: str) -> None:
    """parse gives the set setcap stored, and format_text prints what getcap printed."""
    caps = parse(text, last_cap=40)
    assert caps == decode(bytes.fromhex(stored))
    assert format_text(caps, last_cap=40) == shown
    assert format_text(decode(bytes.fromhex(stored)), last_cap=40) == shown


@pytest.mark.parametrize(("text", "stored", "shown"), REFERENCE_ROWS)
def test_reference_row_encodes_to_the_stored_bytes(text: str, stored: str, shown: str) -> None:
    """encode writes setcap's bytes, except the meaningless effective flag on an empty set."""
    caps = parse(text, last_cap=40)
    expected = EMPTY if caps.is_empty else stored
    assert encode(caps).hex() == expected


def test_v3_reference_row() -> None:
    """setcap -n 1000 cap_net_raw+ep stores a 24-byte v3 value with rootid 1000."""
    stored = bytes.fromhex(NET_RAW_EP_V3)
    caps = CapSet(permitted=1 << 13, effective=True, rootid=1000)
    assert decode(stored) == caps
    assert decode_revision(stored) is Revision.V3
    assert encode(caps) == stored
    assert encode(parse("cap_net_raw+ep", last_cap=40)) == bytes.fromhex(NET_RAW_EP)
    assert format_text(caps, last_cap=40) == "cap_net_raw=ep"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("cap_net_bind=+ep", "unknown capability 'cap_net_bind' (clause 1: 'cap_net_bind=+ep')"),
        ("cap_net_raw+EP", "unknown flag 'E' after '+' (flags are lower-case e, i, p)"),
        ("0d=ep", "expected '=', '+' or '-', found 'd'"),
        ("64=ep", "capability number 64 is out of range 0..63"),
        ("0x40=ep", "capability number 0x40 (= 64) is out of range 0..63"),
        ("-1=ep", "'-' needs a capability list before it"),
        ("=+ep", "'=+' needs a capability list before it"),
        ("+ep", "'+' needs a capability list before it"),
        ("cap_net_raw", "missing operator '=', '+' or '-' after the capability list"),
        (
            "cap_net_raw =ep",
            "missing operator '=', '+' or '-' after the capability list (clause 1: 'cap_net_raw')",
        ),
        ("cap_net_raw= ep", "unknown capability 'ep' (clause 2: 'ep')"),
        ("cap_net_raw=ep,", "unknown flag ',' after '='"),
        ("cap_net_raw,,cap_chown=ep", "expected a capability after ',', found ','"),
        ("cap_net_raw=ep,cap_chown=ep", "unknown flag ',' after '='"),
        ("cap_net_raw==ep", "unknown flag '=' after '='"),
        ("cap_net_raw+", "'+' needs at least one of the flags e, i, p"),
        ("cap_net_raw-", "'-' needs at least one of the flags e, i, p"),
        ("cap_net_raw+p+", "'+' needs at least one of the flags e, i, p"),
        ("cap_net_raw=+", "'=+' needs at least one of the flags e, i, p"),
        ("cap_net_raw=x", "unknown flag 'x' after '='"),
        ("cap_foo=ep", "unknown capability 'cap_foo'"),
        ("cap_chownx=ep", "unknown capability 'cap_chownx'"),
        ("cap_chown1=ep", "unknown capability 'cap_chown1'"),
        ("chown=ep", "unknown capability 'chown' (names need the 'cap_' prefix)"),
        ("=ep+i", "'+' after '=' needs a capability list before the '='"),
        ("!cap_chown=ep", "expected a capability or '=', found '!'"),
        ("cap_chown=ep cap_kill=ep\x1ccap_fowner=p", "unknown flag '\\x1c' after '='"),
        ("cap_chown=ep \u212aILL=ep", "expected a capability or '=', found '\u212a' (clause 2:"),
    ],
)
def test_refusal_names_the_clause(text: str, message: str) -> None:
    """Texts setcap refuses raise InvalidCapabilityText that points at the clause."""
    with pytest.raises(InvalidCapabilityText) as caught:
        parse(text, last_cap=40)
    full = str(caught.value)
    assert message in full
    clause = full[full.rindex(" (clause ") :]
    assert clause.startswith(" (clause ")
    assert clause.endswith("')")


NOTE = (
    "effective capabilities must be empty or exactly match the union of permitted and inheritable"
)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "cap_sys_time=eip cap_chown+p",
            f"cap_chown is p but not e, while other capabilities are effective; {NOTE} "
            "(clause 2: 'cap_chown+p')",
        ),
        (
            "all=ep cap_net_raw-e",
            f"cap_net_raw is p but not e, while other capabilities are effective; {NOTE} "
            "(clause 2: 'cap_net_raw-e')",
        ),
        (
            "cap_net_raw=p cap_chown=ep",
            f"cap_net_raw is p but not e, while other capabilities are effective; {NOTE} "
            "(clause 1: 'cap_net_raw=p')",
        ),
        (
            "cap_net_raw,cap_chown+ep cap_chown-e",
            f"cap_chown is p but not e, while other capabilities are effective; {NOTE} "
            "(clause 2: 'cap_chown-e')",
        ),
        (
            "cap_net_raw=ep\tcap_chown=ip",
            f"cap_chown is ip but not e, while other capabilities are effective; {NOTE} "
            "(clause 2: 'cap_chown=ip')",
        ),
        (
            "=e 41,63=i",
            f"41 is i but not e, while other capabilities are effective; {NOTE} "
            "(clause 2: '41,63=i')",
        ),
    ],
)
def test_partial_effective_set_is_refused_with_full_message(text: str, message: str) -> None:
    """A partly effective set is refused like setcap does, naming a capability and clause."""
    with pytest.raises(InvalidCapabilityText) as caught:
        parse(text, last_cap=40)
    assert str(caught.value) == message


@pytest.mark.parametrize("text", ["", " ", "\t\n"])
def test_empty_text_is_refused(text: str) -> None:
    """Blank text is refused (setcap would store an empty set); '=' is the explicit form."""
    with pytest.raises(InvalidCapabilityText) as caught:
        parse(text, last_cap=40)
    assert str(caught.value) == "empty capability text (write '=' for a file with no capabilities)"


@pytest.mark.parametrize(
    ("text", "last_cap", "stored", "shown"),
    [
        # setcap and getcap with the kernel's last capability faked down to 37
        ("cap_perfmon=ep", 37, "0100000200000000000000004000000000000000", "= cap_perfmon+ep"),
        ("all=ep", 37, "01000002ffffffff000000003f00000000000000", "=ep"),
        ("=p 39+i", 37, "00000002ffffffff000000003f00000080000000", "=p cap_bpf+i"),
        ("cap_bpf,all=p", 37, "00000002ffffffff000000003f00000000000000", "=p"),
        ("all,cap_bpf=p", 37, "00000002ffffffff00000000bf00000000000000", "=p cap_bpf+p"),
        # and down to 1: a tie between p and i goes to the lower combination, p
        ("0=p 1=i", 1, "0000000201000000020000000000000000000000", "=p cap_dac_override+i-p"),
    ],
)
def test_last_cap_other_than_40(text: str, last_cap: int, stored: str, shown: str) -> None:
    """'all' and the baseline follow last_cap; names above it still parse, as in Debian's libcap."""
    caps = parse(text, last_cap=last_cap)
    assert caps == decode(bytes.fromhex(stored))
    assert format_text(caps, last_cap=last_cap) == shown


def test_same_value_prints_differently_on_an_older_kernel() -> None:
    """A set made on a 5.9+ kernel names its newer capabilities with '-' there, not on 3.16."""
    caps = parse("all=ep", last_cap=37)
    assert format_text(caps, last_cap=40) == "=ep cap_perfmon,cap_bpf,cap_checkpoint_restore-ep"
    assert format_text(caps, last_cap=37) == "=ep"


@pytest.mark.parametrize(
    ("hex_value", "message"),
    [
        ("", "security.capability value is 0 bytes, too short for the header (value: empty)"),
        (
            "010000",
            "security.capability value is 3 bytes, too short for the header (value: 010000)",
        ),
        (
            "0100000100200000",
            "a v1 security.capability value must be 12 bytes, not 8 (value: 0100000100200000)",
        ),
        (
            "01000002002000000000000000000000",
            "a v2 security.capability value must be 20 bytes, not 16 "
            "(value: 01000002002000000000000000000000)",
        ),
        (
            NET_RAW_EP + "e8030000",
            "a v2 security.capability value must be 20 bytes, not 24 "
            f"(value: {NET_RAW_EP}e8030000)",
        ),
        (
            "01000003002000000000000000000000000000000000",
            "a v3 security.capability value must be 24 bytes, not 22 "
            "(value: 01000003002000000000000000000000000000000000)",
        ),
        (
            "0100000400200000000000000000000000000000",
            "unknown security.capability revision 4 "
            "(value: 0100000400200000000000000000000000000000)",
        ),
        (
            "0100000000200000000000000000000000000000",
            "unknown security.capability revision 0 "
            "(value: 0100000000200000000000000000000000000000)",
        ),
        (
            "0300000200200000000000000000000000000000",
            "unknown security.capability flags 0x000002 "
            "(value: 0300000200200000000000000000000000000000)",
        ),
        (
            "0001800200200000000000000000000000000000",
            "unknown security.capability flags 0x800100 "
            "(value: 0001800200200000000000000000000000000000)",
        ),
    ],
)
def test_decode_refuses_malformed_values(hex_value: str, message: str) -> None:
    """Wrong sizes, unknown revisions and flags raise InvalidCapabilityData showing the bytes."""
    data = bytes.fromhex(hex_value)
    with pytest.raises(InvalidCapabilityData) as caught:
        decode(data)
    assert str(caught.value) == message
    assert caught.value.data == data
    with pytest.raises(InvalidCapabilityData):
        decode_revision(data)


def test_decode_v1_value() -> None:
    """A legacy 12-byte v1 value decodes (caps 0-31 only) and reports revision 1."""
    data = bytes.fromhex("010000010020000000000000")
    assert decode(data) == CapSet(permitted=1 << 13, effective=True)
    assert decode_revision(data) is Revision.V1


def test_decode_revision_of_v2_and_v3() -> None:
    """decode_revision tells v2 from v3 even when the sets are equal."""
    assert decode_revision(bytes.fromhex(NET_RAW_EP)) is Revision.V2
    assert decode_revision(bytes.fromhex(NET_RAW_EP_V3)) is Revision.V3


def test_v3_with_rootid_zero_equals_v2() -> None:
    """Equality is by meaning: a v3 value with rootid 0 equals the same v2 value."""
    v2 = decode(bytes.fromhex(NET_RAW_EP))
    v3 = decode(bytes.fromhex(NET_RAW_EP_V3[:-8] + "00000000"))
    assert v2 == v3
    assert hash(v2) == hash(v3)
    assert v3 != decode(bytes.fromhex(NET_RAW_EP_V3))


def test_effective_flag_on_an_empty_set_is_irrelevant() -> None:
    """The effective flag of a set with no capabilities does not count for equality."""
    flagged = decode(bytes.fromhex(EFFECTIVE_ONLY))
    assert flagged == CapSet() == CapSet(effective=True)
    assert hash(flagged) == hash(CapSet())
    assert flagged.effective is False
    assert encode(flagged) == bytes.fromhex(EMPTY)


def test_effective_flag_counts_when_capabilities_are_set() -> None:
    """With capabilities present, the effective flag is part of the meaning."""
    assert CapSet(permitted=1) != CapSet(permitted=1, effective=True)
    assert CapSet(inheritable=1, effective=True).effective is True


def test_capabilities_and_is_empty() -> None:
    """capabilities() is permitted | inheritable as numbers; is_empty ignores the flag."""
    caps = CapSet(permitted=1 << 13 | 1, inheritable=1 << 63 | 1, effective=True)
    assert caps.capabilities() == frozenset({0, 13, 63})
    assert not caps.is_empty
    assert CapSet(effective=True).is_empty
    assert CapSet().capabilities() == frozenset()


def test_repr_shows_masks_in_hex() -> None:
    """The repr shows masks in hex so test failures are readable."""
    assert repr(CapSet(permitted=0x2000, effective=True)) == (
        "CapSet(permitted=0x2000, inheritable=0x0, effective=True, rootid=0)"
    )


@pytest.mark.parametrize(
    "fields",
    [
        {"permitted": 1 << 64},
        {"permitted": -1},
        {"inheritable": 1 << 64},
        {"rootid": 1 << 32},
        {"rootid": -1},
    ],
)
def test_capset_refuses_out_of_range_fields(fields: dict[str, int]) -> None:
    """Masks beyond 64 bits and rootids outside u32 are programming errors (ValueError)."""
    with pytest.raises(ValueError, match=r"outside|64 bits"):
        CapSet(**fields)  # type: ignore[arg-type]


def test_capability_names_and_numbers() -> None:
    """Names map to numbers case-insensitively and back; unnamed numbers print as digits."""
    assert len(CAPABILITY_NAMES) == CAP_LAST_CAP + 1
    assert capability_number("cap_net_raw") == 13
    assert capability_number("CAP_Checkpoint_Restore") == 40
    assert capability_name(13) == "cap_net_raw"
    assert capability_name(40) == "cap_checkpoint_restore"
    assert capability_name(41) == "41"
    assert capability_name(63) == "63"
    for number, name in enumerate(CAPABILITY_NAMES):
        assert capability_number(name) == number


@pytest.mark.parametrize("name", ["net_raw", "cap_foo", "cap_net_raw ", "13", "\u212aill", ""])
def test_capability_number_refuses_unknown_names(name: str) -> None:
    """Unknown names, missing prefixes, numbers and non-ASCII look-alikes are refused."""
    with pytest.raises(InvalidCapabilityText) as caught:
        capability_number(name)
    assert str(caught.value) == f"unknown capability {name!r}"


@pytest.mark.parametrize("number", [-1, 64])
def test_capability_name_refuses_numbers_outside_64_bits(number: int) -> None:
    """There is no capability below 0 or above 63."""
    with pytest.raises(ValueError, match=r"outside 0\.\.63"):
        capability_name(number)


@pytest.mark.parametrize("last_cap", [-1, 64])
def test_last_cap_must_be_a_capability_number(last_cap: int) -> None:
    """parse and format_text refuse a last_cap outside 0..63."""
    with pytest.raises(ValueError, match="last_cap"):
        parse("=", last_cap=last_cap)
    with pytest.raises(ValueError, match="last_cap"):
        format_text(CapSet(), last_cap=last_cap)


@pytest.mark.parametrize(
    ("content", "expected"),
    [("37\n", 37), ("40", 40), ("", CAP_LAST_CAP), ("forty\n", CAP_LAST_CAP), ("64\n", 40)],
)
def test_cap_last_cap_reads_the_file(tmp_path: Path, content: str, expected: int) -> None:
    """cap_last_cap reads the number and falls back to 40 when it makes no sense."""
    path = tmp_path / "cap_last_cap"
    path.write_text(content)
    assert cap_last_cap(str(path)) == expected


def test_cap_last_cap_falls_back_when_missing(tmp_path: Path) -> None:
    """Without the /proc file (kernels before 3.2), cap_last_cap assumes 40."""
    assert cap_last_cap(str(tmp_path / "missing")) == CAP_LAST_CAP


def test_defaults_use_the_running_kernel() -> None:
    """Without last_cap, parse and format_text use the running kernel's last capability."""
    last = cap_last_cap()
    everything = (1 << last + 1) - 1
    assert parse("=ep") == CapSet(permitted=everything, effective=True)
    assert format_text(CapSet(permitted=everything, effective=True)) == "=ep"


def test_replace_and_make_check_like_the_constructor() -> None:
    """A CapSet built by _replace or _make is checked and normalised as CapSet() is: an
    empty set drops its effective flag, a mask past 64 bits is refused."""
    emptied = CapSet(1, 0, True)._replace(permitted=0)
    assert emptied == CapSet(0, 0, True) == CapSet()
    assert emptied.effective is False
    assert CapSet._make([1, 0, True, 0]) == CapSet(1, 0, True)
    with pytest.raises(ValueError, match="64 bits"):
        CapSet._make([1 << 70, 0, False, 0])
    with pytest.raises(ValueError, match="rootid"):
        CapSet(1)._replace(rootid=-1)
