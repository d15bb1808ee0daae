"""How the one-shot commands print a result: a JSON line, or one escaped line for people."""

from __future__ import annotations

from typing import Any, TextIO

from capkeeper.errors import printable


def emit(out: TextIO, as_json: bool, record: dict[str, Any], human: str) -> None:
    """Write ``record`` as one JSON line, or ``human`` through :func:`printable`."""
    if as_json:
        import json  # noqa: PLC0415 - only --json needs it; apply in ExecStartPre= does not

        out.write(json.dumps(record) + "\n")
        return
    out.write(printable(human) + "\n")
