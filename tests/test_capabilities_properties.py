"""Property tests for capkeeper.capabilities: round trips, and no stray exceptions."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from capkeeper.capabilities import (
    CAPABILITY_NAMES,
    CapSet,
    decode,
    decode_revision,
    encode,
    format_text,
    parse,
)
from capkeeper.errors import InvalidCapabilityData, InvalidCapabilityText

NAMED = (1 << len(CAPABILITY_NAMES)) - 1


def to_mask(bits: frozenset[int]) -> int:
    return sum(1 << bit for bit in bits)


few_bits = st.frozensets(st.integers(min_value=0, max_value=63), max_size=6)
masks = st.one_of(
    st.integers(min_value=0, max_value=(1 << 64) - 1),
    few_bits.map(to_mask),
    few_bits.map(lambda bits: NAMED & ~to_mask(bits)),
    st.sampled_from([0, NAMED, (1 << 64) - 1]),
)
capsets = st.builds(
    CapSet, permitted=masks, inheritable=masks, effective=st.booleans(), rootid=st.just(0)
)
last_caps = st.one_of(st.just(40), st.integers(min_value=0, max_value=63))

# Pieces of the grammar, so generated text reaches past the first character.
tokens = st.sampled_from(
    [
        *CAPABILITY_NAMES,
        "CAP_NET_RAW",
        "all",
        "ALL",
        "cap_",
        "13",
        "0x1f",
        "0X3F",
        "077",
        "08",
        "41",
        "63",
        "64",
        "=",
        "+",
        "-",
        ",",
        "e",
        "i",
        "p",
        "E",
        " ",
        "\t",
        "\x1c",
        "\x00",
        "\u212a",
    ]
)
grammar_texts = st.lists(tokens, max_size=12).map("".join)


@settings(max_examples=1000)
@given(caps=capsets, last_cap=last_caps)
def test_parse_reads_back_what_format_text_writes(caps: CapSet, last_cap: int) -> None:
    """parse(format_text(s)) == s for every set with rootid 0, whatever last_cap is."""
    assert parse(format_text(caps, last_cap=last_cap), last_cap=last_cap) == caps


@settings(max_examples=500)
@given(caps=capsets, rootid=st.integers(min_value=0, max_value=(1 << 32) - 1))
def test_decode_reads_back_what_encode_writes(caps: CapSet, rootid: int) -> None:
    """decode(encode(s)) == s, rootid included; the size follows the revision."""
    caps = CapSet(caps.permitted, caps.inheritable, caps.effective, rootid)
    data = encode(caps)
    assert decode(data) == caps
    assert len(data) == (20 if rootid == 0 else 24)


# Values with a plausible header, so decode gets past the first checks.
plausible_values = st.builds(
    lambda flags, revision, body: bytes([flags, 0, 0, revision]) + body,
    st.sampled_from([0, 1, 2, 3, 0x80]),
    st.integers(min_value=0, max_value=4),
    st.binary(max_size=24),
)


def decode_outcome(data: bytes) -> CapSet | InvalidCapabilityData:
    try:
        return decode(data)
    except InvalidCapabilityData as exc:
        return exc


def parse_outcome(text: str) -> CapSet | InvalidCapabilityText:
    try:
        return parse(text, last_cap=40)
    except InvalidCapabilityText as exc:
        return exc


@settings(max_examples=1000)
@given(data=st.one_of(st.binary(max_size=40), plausible_values))
def test_decode_raises_only_invalid_capability_data(data: bytes) -> None:
    """decode of any bytes returns a CapSet or raises InvalidCapabilityData, nothing else."""
    outcome = decode_outcome(data)
    if isinstance(outcome, CapSet):
        assert decode_revision(data) in {1, 2, 3}
        assert decode(encode(outcome)) == outcome
    else:
        assert outcome.data == data
        assert f"(value: {data.hex() or 'empty'})" in str(outcome)


@settings(max_examples=1000)
@given(text=st.one_of(st.text(max_size=40), grammar_texts))
def test_parse_raises_only_invalid_capability_text(text: str) -> None:
    """parse of any text returns a CapSet or raises InvalidCapabilityText naming a clause."""
    outcome = parse_outcome(text)
    if isinstance(outcome, CapSet):
        assert parse(format_text(outcome, last_cap=40), last_cap=40) == outcome
    else:
        assert "(clause " in str(outcome) or "empty capability text" in str(outcome)
