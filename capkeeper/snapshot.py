"""The status file as ``capkeeper status`` reads it back: validated into a :class:`Snapshot`.

Anything but what the daemon writes (:mod:`capkeeper.status`) is "not a
capkeeper status file", on one line. Kept apart from the daemon's side so the
daemon never imports pydantic (about 7 MB and a slower start).
"""

from __future__ import annotations

import json
import math
import time
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from capkeeper.errors import StatusFileError, printable

if TYPE_CHECKING:
    from _typeshed import StrPath


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise StatusFileError(f"{text} is not a finite number")
    return value


def _no_constant(name: str) -> float:
    raise StatusFileError(f"{name} is not a number JSON allows")


def read_status(path: StrPath) -> dict[str, Any]:
    """The JSON object in the status file at ``path``.

    Raises :class:`OSError` when it cannot be read (``FileNotFoundError`` when
    absent) and :class:`StatusFileError` when it is not JSON without
    NaN/Infinity, or too deeply nested to be one of ours.
    """
    with open(path, errors="surrogateescape") as file:
        text = file.read()
    try:
        data = json.loads(text, parse_float=_finite, parse_constant=_no_constant)
    except StatusFileError:
        raise
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, > 4300 digits, nesting
        raise StatusFileError(f"not JSON ({exc})") from None
    if not isinstance(data, dict):
        raise StatusFileError(f"a JSON {type(data).__name__}, not an object")
    return data


# What the daemon can write: counters of a 64-bit process, a Linux pid
# (PID_MAX_LIMIT is 2**22), unix times between 1970 and the year 9999, which
# time.localtime() can convert on every 64-bit platform.
_Count = Annotated[int, Field(ge=0, lt=2**63)]
_Pid = Annotated[int, Field(ge=1, le=2**22)]
_Time = Annotated[float, Field(ge=0, lt=253402300800, allow_inf_nan=False)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True, strict=True)


class DriftSnapshot(_Model):
    """The last restore the daemon made."""

    path: str
    found: str
    expected: str
    cause: str
    time: _Time


class EntrySnapshot(_Model):
    """What the daemon knows about one declared binary."""

    path: str
    expected: str
    status: str
    reason: str = ""
    restores: _Count = 0
    last_drift: _Time | None = None


class Snapshot(_Model):
    """A status file, validated: only what the daemon writes is accepted."""

    pid: _Pid
    started: _Time
    written: _Time
    state_files: list[str]
    entries: list[EntrySnapshot]
    watches: _Count
    restores: _Count
    refusals: _Count
    failures: _Count
    rescans: _Count
    overflows: _Count
    reloads: _Count
    rejected_reloads: _Count
    last_drift: DriftSnapshot | None = None
    last_error: str | None = None

    @property
    def healthy(self) -> bool:
        """Whether every entry is in sync (or not looked at yet)."""
        return all(e.status in ("in-sync", "unknown") for e in self.entries)


def _where(loc: tuple[int | str, ...]) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "the document"


def parse_status(data: dict[str, Any]) -> Snapshot:
    """``data`` as a :class:`Snapshot`; :class:`StatusFileError` names the first bad field."""
    try:
        return Snapshot.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_input=False)
        first = errors[0]
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        message = first["msg"].removeprefix("Value error, ").lower()
        raise StatusFileError(f"{_where(first['loc'])}: {message}{more}") from None


def _when(stamp: float | None) -> str:
    if stamp is None:
        return "never"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(stamp))


def render(snapshot: Snapshot) -> str:
    """The status snapshot as text for people; untrusted names escaped."""
    data = snapshot
    lines = [
        f"capkeeper daemon pid {data.pid}, up since {_when(data.started)}, "
        f"status written {_when(data.written)}",
        f"state: {', '.join(data.state_files) or '-'}; {len(data.entries)} declared, "
        f"{data.watches} inotify watches",
        f"restores {data.restores}, refusals {data.refusals}, failures {data.failures}, "
        f"rescans {data.rescans}, overflows {data.overflows}, reloads {data.reloads} "
        f"({data.rejected_reloads} rejected)",
    ]
    drift = data.last_drift
    if drift is not None:
        lines.append(
            f"last drift: {drift.path} at {_when(drift.time)}: found {drift.found}, "
            f"expected {drift.expected} (cause: {drift.cause})"
        )
    if data.last_error:
        lines.append(f"last error: {data.last_error}")
    lines.append("")
    for entry in data.entries:
        detail = entry.reason or entry.expected
        lines.append(
            f"{entry.status:<9} {entry.path}  {detail}  "
            f"(restores {entry.restores}, last drift {_when(entry.last_drift)})"
        )
    return "".join(printable(line) + "\n" for line in lines)
