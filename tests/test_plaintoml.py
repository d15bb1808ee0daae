"""The plain-form reader (capkeeper.plaintoml) against tomllib, the oracle.

For any document: either the plain reader declines (None) and tomllib decides, or
both give the same document, value types and key order included. And a state in
the plain form is read by the plain reader, with the same entries and problems as
tomllib's reading of it.
"""

from __future__ import annotations

import importlib.util
import sys
import tempfile
import tomllib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from capkeeper import state as state_module
from capkeeper.errors import StateError
from capkeeper.plaintoml import read_plain
from capkeeper.state import load_state

REPO = Path(__file__).resolve().parent.parent

# Characters where TOML draws its lines: quotes, escapes, comment and table marks,
# every kind of control and line character, non-ASCII, a byte-order mark.
_TRICKY = [*"a/ \t\"\\'#[]=.é\u202e\x00\x01\x7f\x85\r\n\ufeff", "\u2028", '"""', "'''"]
_TEXT = st.lists(st.one_of(st.sampled_from(_TRICKY), st.characters(codec="utf-8")), max_size=8).map(
    "".join
)
_WS = st.sampled_from(["", " ", "\t", "  ", " \t "])
_HEADER = st.sampled_from(
    [
        "[[binary]]",
        "[[ binary ]]",
        "[[binary ]]",
        "[binary]",
        "[[binary.x]]",
        "[[other]]",
        "[[binary]",
        '[["binary"]]',
        "[[Binary]]",
    ]
)
_KEY = st.one_of(
    st.sampled_from(
        [
            *("path", "caps", "owner", "sha256", "allow_inheritable", "a-b_9", "1", "", "x y"),
            *('"path"', "'path'", "a.b", "ü", "path.x", "binary"),
        ]
    ),
    _TEXT,
)
_VALUE = st.one_of(
    _TEXT.map(lambda text: f'"{text}"'),
    _TEXT.map(lambda text: f"'{text}'"),
    _TEXT.map(lambda text: f'"""{text}"""'),
    st.just('"""\n[[binary]]\npath = "/x"\n"""'),
    st.sampled_from(["true", "false", "True", "1", "1.5", "[true]", "{a = 1}", "1979-05-27", ""]),
)
_COMMENT = st.one_of(st.just(""), _TEXT.map(lambda text: "#" + text))
_EOL = st.sampled_from(["\n", "\r\n", "\r", ""])


@st.composite
def _line(draw: st.DrawFn) -> str:
    body = draw(
        st.one_of(
            st.just(""),
            _HEADER,
            st.builds(lambda k, a, b, v: f"{k}{a}={b}{v}", _KEY, _WS, _WS, _VALUE),
        )
    )
    return draw(_WS) + body + draw(_WS) + draw(_COMMENT) + draw(_EOL)


_DOCUMENT = st.lists(_line(), max_size=12).map("".join)

# The plain form only: what read_plain must read itself.
_PLAIN_TEXT = st.text(
    st.characters(codec="utf-8", exclude_characters='"\\', exclude_categories=("Cc", "Cs")),
    max_size=12,
)
_PLAIN_COMMENT = st.one_of(
    st.just(""),
    st.text(st.characters(codec="utf-8", exclude_categories=("Cc", "Cs")), max_size=10).map(
        lambda text: "#" + text
    ),
)
_PLAIN_EOL = st.sampled_from(["\n", "\r\n"])
_PLAIN_KEYS = st.sampled_from(["path", "caps", "owner", "sha256", "allow_inheritable", "x-1_Y"])


@st.composite
def _plain_document(draw: st.DrawFn) -> str:
    lines = [
        draw(_WS) + draw(_PLAIN_COMMENT) + draw(_PLAIN_EOL) for _ in range(draw(st.integers(0, 2)))
    ]
    for _ in range(draw(st.integers(0, 4))):
        lines.append(draw(_WS) + "[[binary]]" + draw(_WS) + draw(_PLAIN_COMMENT) + draw(_PLAIN_EOL))
        for key in draw(st.lists(_PLAIN_KEYS, unique=True, max_size=4)):
            value = draw(
                st.one_of(_PLAIN_TEXT.map(lambda t: f'"{t}"'), st.sampled_from(["true", "false"]))
            )
            lines.append(
                draw(_WS)
                + key
                + draw(_WS)
                + "="
                + draw(_WS)
                + value
                + draw(_WS)
                + draw(_PLAIN_COMMENT)
                + draw(_PLAIN_EOL)
            )
    text = "".join(lines)
    if draw(st.booleans()):  # the last line without its line end
        text = text.removesuffix("\n").removesuffix("\r")
    return text


def _oracle(text: str) -> str | None:
    """tomllib's document, as its repr (types and key order count), or None if invalid."""
    try:
        return repr(tomllib.loads(text))
    except tomllib.TOMLDecodeError:
        return None


@given(_DOCUMENT)
def test_the_plain_reader_reads_what_tomllib_reads_or_declines(text: str) -> None:
    plain = read_plain(text)
    if plain is not None:
        assert repr(plain) == _oracle(text)


@given(_plain_document())
def test_a_plain_document_is_read_by_the_plain_reader(text: str) -> None:
    plain = read_plain(text)
    assert plain is not None
    assert repr(plain) == _oracle(text)


@pytest.mark.parametrize(
    "text",
    [
        "path = '/x'\n",  # a key before any table
        '[[binary]]\npath = "/a"\npath = "/b"\n',  # a key twice: tomllib's own error
        '[[ binary ]]\npath = "/a"\n',  # valid TOML, but not the plain form
        '[[binary]]\rpath = "/a"\n',  # a lone carriage return
        '[[binary]]\ncaps = """\n[[binary]]\npath = "/x"\n"""\n',  # a header in a string
        '[[binary]]\npath = "/a\\tb"\n',  # an escape
        "\ufeff[[binary]]\n",  # a byte-order mark
        '[[binary]]\npath = "/a"  # \x01\n',  # a control character in a comment
        "[[binary]]\nallow_inheritable = True\n",
        '[[binary]]\npath.x = "/a"\n',  # a dotted key: a table in the table
        '[[binary]]\n"path" = "/a"\n',  # a quoted key
    ],
)
def test_what_is_not_plain_is_left_to_tomllib(text: str) -> None:
    assert read_plain(text) is None


_CONTROLS = [chr(code) for code in (*range(0x20), 0x7F) if chr(code) != "\t"]


@pytest.mark.parametrize("control", _CONTROLS, ids=[f"{ord(c):#04x}" for c in _CONTROLS])
def test_a_control_character_tomllib_refuses_is_refused(control: str) -> None:
    """Each control character but the tab, in a string and in a comment: tomllib
    refuses the document, and the plain reader does not read it."""
    texts = [f'[[binary]]\npath = "/a{control}b"\n']
    if control not in "\r\n":  # there they end the comment's line
        texts += [f'[[binary]]\npath = "/a"  # {control}\n', f"# {control}\n[[binary]]\n"]
    for text in texts:
        assert _oracle(text) is None
        assert read_plain(text) is None


def test_the_tab_is_read_in_a_string_and_a_comment() -> None:
    text = '[[binary]]\t# \t\npath = "/a\tb"\n'
    assert read_plain(text) == tomllib.loads(text) == {"binary": [{"path": "/a\tb"}]}


def test_the_bundled_and_benchmark_states_are_plain(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    example = (REPO / "examples" / "state.toml").read_text()
    assert read_plain(example) == tomllib.loads(example)
    spec = importlib.util.spec_from_file_location("benchlib", REPO / "bench" / "benchlib.py")
    assert spec is not None
    assert spec.loader is not None
    benchlib = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "benchlib", benchlib)
    spec.loader.exec_module(benchlib)
    state = tmp_path / "state.toml"
    benchlib.write_state(state, [Path(f"/srv/bin/tool{n}") for n in range(50)])
    text = state.read_text()
    assert read_plain(text) is not None
    assert read_plain(text) == tomllib.loads(text)


def _uid_of(owner: str) -> int:
    if owner == "root":
        return 0
    if owner == "app":
        return 1000
    raise KeyError(owner)


def _loaded(main: Path) -> tuple[Any, ...] | list[str]:
    try:
        state = load_state(main, last_cap=40, uid_of=_uid_of)
    except StateError as exc:
        return exc.problems
    return tuple((entry, entry.source) for entry in state.entries)


def test_a_state_loads_the_same_through_either_reader(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Valid entries and every problem (wrong type, unknown key, bad caps, a path twice,
    no such owner) come out the same whichever reader read the file."""
    tmp_path.chmod(0o755)
    good = tmp_path / "good.toml"
    good.write_text(
        "# plain\n"
        + "".join(
            f'[[binary]]\npath = "/srv/bin/t{n}"\ncaps = "cap_net_bind_service=+ep"\n'
            for n in range(20)
        )
        + '[[binary]]\r\npath = "/srv/bin/u"\t# crlf\r\n'
        + 'caps = "cap_net_raw+ep"\r\nowner = "app"\r\n'
    )
    bad = tmp_path / "bad.toml"
    bad.write_text(
        '[[binary]]\npath = "relative"\ncaps = "cap_bogus+ep"\n'
        '[[binary]]\npath = "/srv/bin/a"\ncaps = "cap_net_raw+ep"\nmode = "0755"\n'
        '[[binary]]\npath = "/srv/bin/a"\ncaps = "cap_net_raw+ep"\n'
        '[[binary]]\npath = "/srv/bin/a"\ncaps = "cap_net_raw+ep"\nallow_inheritable = "yes"\n'
        '[[binary]]\npath = "/srv/bin/b"\ncaps = "cap_net_raw+ep"\nowner = "nobody-here"\n'
        "[[binary]]\n"
    )
    calls: list[str] = []

    def spying(text: str) -> dict[str, Any] | None:
        result = read_plain(text)
        calls.append("plain" if result is not None else "tomllib")
        return result

    for main in (good, bad):
        main.chmod(0o644)
        calls.clear()
        monkeypatch.setattr(state_module, "read_plain", spying)
        plain = _loaded(main)
        assert calls == ["plain"]
        monkeypatch.setattr(state_module, "read_plain", lambda text: None)
        assert _loaded(main) == plain
    problems = _loaded(bad)
    assert isinstance(problems, list)
    assert any("owner: no such user 'nobody-here'" in problem for problem in problems)
    assert len(_loaded(good)) == 21


# From the adversarial review of this reader (its branch wip/review16, a064fb2).
_STATE_KEYS = st.sampled_from(
    ["path", "caps", "sha256", "owner", "allow_inheritable", "allow_interpreter", "mode", "x"]
)


_STATE_VALUES = st.sampled_from(
    [
        *('"/srv/bin/a"', '"/srv/bin/b"', '"relative"', '"cap_net_raw+ep"', '"cap_bogus+ep"'),
        *('"cap_net_raw+i"', '"app"', '"nobody-here"', '"' + "a" * 64 + '"', "true", "false"),
    ]
)


@st.composite
def _generated_state(draw: st.DrawFn) -> str:
    lines = []
    for _ in range(draw(st.integers(0, 4))):
        lines.append(draw(st.sampled_from(["[[binary]]", "[[binary]] # h", "\t[[binary]]\t"])))
        for key in draw(st.lists(_STATE_KEYS, unique=True, max_size=5)):
            lines.append(f"{key} = {draw(_STATE_VALUES)}" + draw(st.sampled_from(["", " #c"])))
    return draw(st.sampled_from(["\n", "\r\n"])).join(lines)


@settings(max_examples=300)
@given(text=_generated_state())
def test_a_generated_generated_state_loads_the_same_through_either_reader(text: str) -> None:
    """Entries, sources and problems (text and order) through read_plain and tomllib."""
    with tempfile.TemporaryDirectory() as name:
        directory = Path(name)
        directory.chmod(0o755)
        main = directory / "state.toml"
        main.write_text(text, newline="")
        main.chmod(0o644)
        results: list[Any] = []
        for reader in (read_plain, lambda _text: None):
            with pytest.MonkeyPatch.context() as patch:
                patch.setattr(state_module, "read_plain", reader)
                try:
                    loaded: Any = state_module.load_state(main, last_cap=40, uid_of=_uid_of)
                    results.append(tuple((entry, entry.source) for entry in loaded.entries))
                except StateError as exc:
                    results.append(exc.problems)
        assert read_plain(text) is not None
        assert results[0] == results[1]
