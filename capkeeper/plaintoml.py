"""A fast reader for the plain form of a state file, exactly as ``tomllib`` reads it.

``tomllib`` is pure Python: a state of 10,000 ``[[binary]]`` tables (880 KB) takes it
0.18 s, a fifth of a daemon's whole start-up. Nearly every state is written in one
plain form, and in that form TOML leaves nothing to interpret:

- blank lines and ``#`` comments;
- ``[[binary]]`` headers;
- ``key = "text"`` and ``key = true``/``false``, with a bare key and a basic string
  without escapes;
- spaces and tabs around these, ``\\n`` or ``\\r\\n`` line ends.

:func:`read_plain` reads a document of only such lines with two regular expressions
(about 30 ms for those 10,000 tables) into the very dict ``tomllib.loads`` returns.
Anything else, valid TOML or not, is None, and the caller parses the document with
``tomllib``: any other construct, a key outside a table, a key twice in one table, a
character TOML does not allow where it is. So ``tomllib`` alone decides every
document that is not plain, and writes every error message;
``tests/test_plaintoml.py`` holds the two readers to the same result on generated
documents.
"""

from __future__ import annotations

import re
from typing import Any

# Each character class is tomllib's own: a basic string refuses ", \ and the ASCII
# control characters but the tab; a comment refuses those control characters.
_STRING = r'"[^"\\\x00-\x08\x0a-\x1f\x7f]*+"'
_COMMENT = r"#[^\x00-\x08\x0a-\x1f\x7f]*+"
_KEY = r"[A-Za-z0-9_-]++"
_HEADER = r"\[\[binary\]\]"
_LINE = (
    rf"[ \t]*+(?:(?:{_HEADER}|{_KEY}[ \t]*+=[ \t]*+(?:{_STRING}|true|false))[ \t]*+)?"
    rf"(?:{_COMMENT})?+"
)
# Possessive everywhere: a line that is not plain fails at once, with no backtracking.
_DOCUMENT = re.compile(rf"(?:{_LINE}\r?\n)*+{_LINE}")
# Once the whole document is known plain, each line that says something, in order.
_STATEMENT = re.compile(
    rf'^[ \t]*+(?:({_HEADER})|({_KEY})[ \t]*+=[ \t]*+(?:"([^"\n]*+)"|(true|false)))', re.MULTILINE
)


def read_plain(text: str) -> dict[str, Any] | None:
    """``tomllib.loads(text)`` for a document in the plain form; None for any other."""
    if _DOCUMENT.fullmatch(text) is None:
        return None
    tables: list[dict[str, Any]] = []
    table: dict[str, Any] | None = None
    for header, key, string, boolean in _STATEMENT.findall(text):
        if header:
            table = {}
            tables.append(table)
        elif table is None or key in table:
            return None  # a top-level key, or a key twice: tomllib words the problem
        else:
            table[key] = boolean == "true" if boolean else string
    return {"binary": tables} if tables else {}
