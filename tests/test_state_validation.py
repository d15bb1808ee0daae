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
from capkeeper.state import _table

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
