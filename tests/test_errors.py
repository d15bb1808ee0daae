"""errors.printable: the one escape for untrusted names, and the errors' own text."""

from __future__ import annotations

import unicodedata

import pytest
from hypothesis import given
from hypothesis import strategies as st

from capkeeper.errors import CapkeeperError, needs_escape, printable

UNDECODABLE = b"caf\xff\xfe".decode("utf-8", "surrogateescape")


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        # Printable text, ASCII or not, is shown as it is.
        ("/usr/bin/ping", "/usr/bin/ping"),
        ("/opt/café/bin/ü", "/opt/café/bin/ü"),
        ("/srv/漢字/tool", "/srv/漢字/tool"),
        ("/opt/a\u00a0b", "/opt/a\u00a0b"),  # no-break space
        ("/opt/a\u3000b", "/opt/a\u3000b"),  # ideographic space
        ("/opt/e\u0301", "/opt/e\u0301"),  # combining accent
        ("/opt/a\\nb", "/opt/a\\nb"),  # a backslash alone escapes nothing
        ("", ""),
        # C0 controls, DEL and C1 controls.
        ("evil\nfake", "evil\\nfake"),
        ("a\rb\tc", "a\\rb\\tc"),
        ("a\x00b", "a\\x00b"),
        ("\x1b[2J", "\\x1b[2J"),
        ("a\x7fb", "a\\x7fb"),
        ("a\x85b", "a\\x85b"),  # NEL
        ("a\x9bb", "a\\x9bb"),  # CSI
        # Line and paragraph separators.
        ("a\u2028b\u2029c", "a\\u2028b\\u2029c"),
        # Format characters: bidi overrides and isolates, zero-width, BOM, tags.
        ("/opt/\u202egnp.exe", "/opt/\\u202egnp.exe"),
        ("a\u2066b\u2069", "a\\u2066b\\u2069"),
        ("a\u200bb\u200d", "a\\u200bb\\u200d"),
        ("\ufeffa", "\\ufeffa"),
        ("a\U000e0041", "a\\U000e0041"),
        # Undecodable bytes (surrogateescape) as the bytes they were.
        (UNDECODABLE, "caf\\xff\\xfe"),
        ("a\ud800", "a\\ud800"),  # a surrogate that stands for no byte
        # Once anything is escaped, backslashes are doubled; the rest is kept.
        ("a\\n\nb", "a\\\\n\\nb"),
        ("é\n", "é\\n"),
        ("a\u00a0\n", "a\u00a0\\n"),
    ],
)
def test_printable_escapes_exactly_what_forges_or_hides(text: str, shown: str) -> None:
    """Controls, separators, format characters and undecodable bytes are escaped; nothing else."""
    assert printable(text) == shown
    assert needs_escape(text) is (shown != text)


@given(st.text(alphabet=st.characters(codec=None)))
def test_printable_is_one_safe_line_and_idempotent(text: str) -> None:
    """Any text prints as one line with no control or format character, and escaping twice
    changes nothing."""
    shown = printable(text)
    assert len(shown.splitlines()) <= 1
    assert not any(unicodedata.category(ch) in {"Cc", "Cf", "Cs", "Zl", "Zp"} for ch in shown)
    assert printable(shown) == shown
    assert not needs_escape(shown)


@given(st.text(alphabet=st.characters(exclude_categories=("Cc", "Cf", "Cs", "Zl", "Zp"))))
def test_printable_keeps_text_without_hidden_characters(text: str) -> None:
    """Text with no character of the escaped categories is returned unchanged."""
    assert printable(text) == text


def test_error_text_carries_context_and_hint() -> None:
    """An error reads 'context: message (hint: …)'."""
    error = CapkeeperError("cannot read", context="/x", hint="run as root")
    assert str(error) == "/x: cannot read (hint: run as root)"
