"""How the one-shot commands print a result: a JSON line, or one escaped line for people."""

from __future__ import annotations

import json
from typing import Any, TextIO

from capkeeper.errors import printable


def emit(out: TextIO, as_json: bool, record: dict[str, Any], human: str) -> None:
    """Write ``record`` as one JSON line, or ``human`` through :func:`printable`."""
    out.write((json.dumps(record) if as_json else printable(human)) + "\n")
