"""The [[binary]] table check without pydantic says exactly what the pydantic model said.

``REFERENCE`` is the model state.py validated with until pydantic left the one-shot
path (kept here as the oracle): for any table TOML can produce, the problems, their
order and their wording, and the accepted values, are the same.
"""

from __future__ import annotations

import datetime
import posixpath
import re
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from capkeeper.errors import needs_escape
from capkeeper.state import _caps, _checked_entry, _entry, _plain_entry, _table

_SHA256 = re.compile(r"[0-9a-f]{64}")


class REFERENCE(BaseModel):
    """state._BinaryTable as it was, a strict pydantic model."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    path: str
    caps: str
    sha256: str | None = None
    owner: str = "root"
    allow_inheritable: bool = False
    allow_interpreter: bool = False

    @field_validator("path")
    @classmethod
    def _absolute(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError(f"must be an absolute path, got {value!r}")
        if needs_escape(value):
            raise ValueError("must not contain control or format characters")
        normal = "/" + posixpath.normpath(value).lstrip("/")
        if normal == "/":
            raise ValueError("must name a file, not /")
        return normal

    @field_validator("sha256")
    @classmethod
    def _hex_digest(cls, value: str | None) -> str | None:
        if value is not None and not _SHA256.fullmatch(value.lower()):
            raise ValueError("must be 64 hexadecimal digits")
        return value.lower() if value is not None else None


def _reference(table: dict[str, Any]) -> tuple[dict[str, Any] | None, list[tuple[str, str]]]:
    """What the old state.py made of a table: the values, or its (key, message) list."""
    try:
        return REFERENCE.model_validate(table).model_dump(), []
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            message = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                message = "unknown key"
            problems.append((".".join(str(part) for part in err["loc"]) or "entry", message))
        return None, problems


_PATHS = st.sampled_from(
    ["/usr/bin/x", "//usr/./bin/../x/", "relative", "/", "//", "/a\nb", "/\u202e", "", "/\x00"]
)
_DIGESTS = st.sampled_from(["ab" * 32, "AB" * 32, "xyz", "", "ab" * 31, "0" * 64 + "\n"])
_ANY = st.one_of(
    st.text(max_size=8),
    st.integers(),
    st.floats(allow_nan=False),
    st.booleans(),
    st.just(datetime.date(2026, 1, 1)),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
_VALUES = {
    "path": st.one_of(_PATHS, _ANY),
    "caps": st.one_of(st.just("cap_chown=p"), _ANY),
    "sha256": st.one_of(_DIGESTS, _ANY),
    "owner": st.one_of(st.just("nobody"), _ANY),
    "allow_inheritable": _ANY,
    "allow_interpreter": _ANY,
}
_KEYS = st.sampled_from([*_VALUES, "colour", "evil\nkey", "Path", "\u202e"])


@st.composite
def _tables(draw: st.DrawFn) -> dict[str, Any]:
    keys = draw(st.lists(_KEYS, unique=True, max_size=8))
    return {key: draw(_VALUES.get(key, _ANY)) for key in keys}


@settings(max_examples=500)
@given(_tables())
def test_same_verdict_as_the_pydantic_model(table: dict[str, Any]) -> None:
    """Same values when accepted; same problems, order and wording when not."""
    expected_values, expected_problems = _reference(table)
    raw, problems = _table(table)
    assert problems == expected_problems
    if expected_values is None:
        assert raw is None
    else:
        assert raw is not None
        assert {name: getattr(raw, name) for name in expected_values} == expected_values


def test_every_kind_of_problem_at_once() -> None:
    """A fixed table with one problem of each kind, in the reference's order."""
    table = {"zz": 1, "sha256": "x", "allow_interpreter": 1, "owner": True, "path": "rel"}
    assert _table(table) == (None, _reference(table)[1])
    assert _table(table)[1] == [
        ("path", "must be an absolute path, got 'rel'"),
        ("caps", "Field required"),
        ("sha256", "must be 64 hexadecimal digits"),
        ("owner", "Input should be a valid string"),
        ("allow_interpreter", "Input should be a valid boolean"),
        ("zz", "unknown key"),
    ]


# -- the plain-table fast path of state._entry ----------------------------------------------

# Paths around the normal form: "//", "/.", ".." and a trailing "/" are frequent, as are
# characters that are not printable.
_PATH_TEXT = st.one_of(
    st.lists(st.sampled_from(["a", "b", "/", "//", "/.", "/..", "."]), max_size=6).map("".join),
    st.text(alphabet="/.a \t\u00a0\u202e\n", max_size=6),
).map(lambda s: "/" + s)
_CAPS_TEXT = st.sampled_from(
    ["cap_chown=p", "cap_net_bind_service+ep", "cap_chown+i", "cap_bogus=p", "", "all=ep"]
)
_PLAIN_VALUES = {
    **_VALUES,
    "path": st.one_of(_PATH_TEXT, _PATHS, _ANY),
    "caps": st.one_of(_CAPS_TEXT, _ANY),
}


@st.composite
def _plain_tables(draw: st.DrawFn) -> Any:
    """Tables near the fast path's edge: mostly a path and caps, sometimes another key,
    sometimes not a table at all."""
    if draw(st.integers(0, 19)) == 0:
        return draw(_ANY)
    if draw(st.booleans()):  # the fast path's own form, in both orders
        table = {"path": draw(_PATH_TEXT), "caps": draw(_CAPS_TEXT)}
        if draw(st.integers(0, 3)) == 0:  # and one key more
            key = draw(_KEYS.filter(lambda key: key not in table))
            table[key] = draw(_VALUES.get(key, _ANY))
        return table if draw(st.booleans()) else dict(reversed(table.items()))
    keys = ["path", "caps", *draw(st.lists(_KEYS, unique=True, max_size=2))]
    keys = draw(st.permutations(list(dict.fromkeys(keys))))
    keys = keys[: draw(st.integers(1, len(keys)))]
    return {key: draw(_PLAIN_VALUES.get(key, _ANY)) for key in keys}


def _uid_of(owner: str) -> int:
    if owner == "root":
        return 0
    raise KeyError(owner)


def _no_root(owner: str) -> int:
    raise KeyError(owner)


@settings(max_examples=1500)
@given(_plain_tables(), st.sampled_from([_uid_of, _no_root]))
def test_plain_entry_is_the_checked_entry(table: Any, uid_of: Any) -> None:
    """Whatever the fast path accepts, the full check accepts as the very same entry
    (source included); whatever it declines, the full check judges alone."""
    last_cap = 40
    fast = _plain_entry(table, "s.toml: entry 3", last_cap, uid_of, _caps)
    checked, problems = _checked_entry(table, "s.toml: entry 3", last_cap, uid_of, _caps)
    assert _entry(table, "s.toml: entry 3", last_cap, uid_of, _caps) == (checked, problems)
    if fast is not None:
        assert problems == []
        assert checked is not None
        assert tuple(fast) == tuple(checked)


def test_plain_entry_takes_the_usual_table() -> None:
    """The fast path is not dead: the usual table of a path and caps takes it."""
    table = {"path": "/srv/app/bin/server", "caps": "cap_net_bind_service+ep"}
    fast = _plain_entry(table, "state.toml: entry 1", 40, _uid_of, _caps)
    checked = _checked_entry(table, "state.toml: entry 1", 40, _uid_of, _caps)[0]
    assert fast is not None
    assert checked is not None
    assert tuple(fast) == tuple(checked)
    for declined in (
        {"path": "/srv//bin/server", "caps": "cap_net_raw+ep"},
        {"path": "/srv/./bin/server", "caps": "cap_net_raw+ep"},
        {"path": "/srv/bin/", "caps": "cap_net_raw+ep"},
        {"path": "/srv/bin/a\u202eb", "caps": "cap_net_raw+ep"},
        {"path": "/srv/bin/x", "caps": "cap_net_raw+ep", "owner": "root"},
        {"path": "/srv/bin/x", "caps": "cap_bogus+ep"},
    ):
        assert _plain_entry(declined, "w", 40, _uid_of, _caps) is None
