"""The declared state: which binary carries which file capabilities.

The state is the main TOML file (default ``/etc/capkeeper/state.toml``) plus
every ``state.d/*.toml`` beside it, read in name order. Each ``[[binary]]``
table declares one file. Everything is validated at this edge into frozen
:class:`Entry` values; every problem is collected and reported at once, each
naming its file and entry.
"""

from __future__ import annotations

import os
import posixpath
import pwd
import re
import stat
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from capkeeper.capabilities import CapSet, capability_name, format_text, kernel_last_cap, parse
from capkeeper.errors import CapkeeperError, StateError, UsageError, needs_escape, printable

DEFAULT_STATE = Path("/etc/capkeeper/state.toml")
_SHA256 = re.compile(r"[0-9a-f]{64}")


class _BinaryTable(BaseModel):
    """One ``[[binary]]`` table exactly as written in the file."""

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
        # normpath keeps a leading "//" (POSIX leaves it implementation-defined);
        # Linux treats it as "/", and so must duplicate detection.
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


@dataclass(frozen=True)
class Entry:
    """One declared binary, validated."""

    path: str
    caps: CapSet
    caps_text: str  # canonical, as getcap prints it
    owner: str = "root"
    owner_uid: int = 0
    sha256: str | None = None
    allow_inheritable: bool = False
    allow_interpreter: bool = False
    source: str = field(default="", compare=False)  # "state.d/web.toml: entry 3"


@dataclass(frozen=True)
class State:
    """The whole declared state, in declaration order."""

    entries: tuple[Entry, ...]
    files: tuple[Path, ...]

    def by_path(self) -> dict[str, Entry]:
        return {entry.path: entry for entry in self.entries}

    def select(self, paths: Sequence[str]) -> tuple[Entry, ...]:
        """The entries for ``paths`` (normalised); unknown paths are an error."""
        index = self.by_path()
        chosen: list[Entry] = []
        unknown: list[str] = []
        for raw in paths:
            key = posixpath.normpath(os.path.abspath(raw))
            if key in index:
                chosen.append(index[key])
            else:
                unknown.append(raw)
        if unknown:
            names = ", ".join(unknown)
            raise UsageError(
                f"not declared in the state: {names}",
                hint="add a [[binary]] table for it, or check the path",
            )
        return tuple(chosen)


_MAX_UID = 2**32 - 2  # (uid_t)-1 means "unchanged" to chown(2)


def _uid_of(owner: str) -> int:
    """The uid of a user name or number; KeyError when there is no such user."""
    if owner.isdigit():
        uid = int(owner)
        if uid > _MAX_UID:
            raise KeyError(owner)
        return uid
    try:
        return pwd.getpwnam(owner).pw_uid
    except ValueError:  # e.g. an embedded NUL
        raise KeyError(owner) from None


def state_files(main: Path) -> list[Path]:
    """The main file followed by ``state.d/*.toml`` beside it, in name order."""
    dropin = main.parent / "state.d"
    extra = sorted(p for p in dropin.glob("*.toml") if p.is_file()) if dropin.is_dir() else []
    return [main, *extra]


def _writable_by_others(path: Path) -> str | None:
    """Why someone besides root (or us) could change ``path``, or None.

    Whoever can edit the state can grant any capability, so the state files and
    the directories holding them get the same ownership rule as binaries.
    """
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    except OSError as exc:
        return f"cannot check: {exc.strerror}"
    if st.st_uid not in (0, os.geteuid()):
        return (
            f"owned by uid {st.st_uid}: whoever can edit the state can grant capabilities "
            f"(chown root {path})"
        )
    sticky_root_dir = stat.S_ISDIR(st.st_mode) and st.st_uid == 0 and st.st_mode & stat.S_ISVTX
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not sticky_root_dir:
        return (
            f"writable by group or others (mode {stat.S_IMODE(st.st_mode):04o}): whoever can "
            f"edit the state can grant capabilities (chmod go-w {path})"
        )
    return None


def _display(path: Path, main: Path) -> str:
    try:
        return str(path.relative_to(main.parent))
    except ValueError:
        return str(path)


def _loc(loc: tuple[int | str, ...]) -> str:
    return ".".join(str(part) for part in loc) or "entry"


def load_state(
    main: Path = DEFAULT_STATE,
    *,
    last_cap: int | None = None,
    uid_of: Callable[[str], int] = _uid_of,
) -> State:
    """Load and validate the state; raise :class:`StateError` listing every problem."""
    limit = kernel_last_cap() if last_cap is None else last_cap
    if not main.is_file():
        what = "not found" if not main.exists() else "not a regular file"
        raise StateError(
            [f"{main}: {what} (create it, or point --state / CAPKEEPER_STATE at another file)"]
        )
    problems: list[str] = []
    entries: list[Entry] = []
    seen: dict[str, str] = {}
    files = state_files(main)
    for path in dict.fromkeys([main.parent, main.parent / "state.d", *files]):
        problem = _writable_by_others(path)
        if problem:
            problems.append(f"{path if path == main.parent else _display(path, main)}: {problem}")
    for path in files:
        shown = _display(path, main)
        try:
            document = tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            problems.append(f"{shown}: invalid TOML: {exc}")
            continue
        except (OSError, UnicodeDecodeError) as exc:
            problems.append(f"{shown}: cannot read: {getattr(exc, 'strerror', None) or exc}")
            continue
        unknown = sorted(set(document) - {"binary"})
        if unknown:
            problems.append(
                f"{shown}: unknown top-level key{'s' if len(unknown) > 1 else ''} "
                + ", ".join(repr(k) for k in unknown)
                + " (only [[binary]] tables are allowed)"
            )
        tables = document.get("binary", [])
        if not isinstance(tables, list):
            problems.append(f"{shown}: 'binary' must be an array of tables ([[binary]])")
            continue
        for number, table in enumerate(tables, start=1):
            entry, errors = _entry(table, f"{shown}: entry {number}", limit, uid_of)
            problems.extend(errors)
            if entry is None:
                continue
            if entry.path in seen:
                problems.append(
                    f"{entry.source} ({entry.path}): path: already declared in {seen[entry.path]}"
                )
                continue
            seen[entry.path] = entry.source
            entries.append(entry)
    if problems:
        raise StateError(problems)
    return State(entries=tuple(entries), files=tuple(files))


def _entry(
    table: Any, where: str, last_cap: int, uid_of: Callable[[str], int]
) -> tuple[Entry | None, list[str]]:
    if not isinstance(table, dict):
        return None, [f"{where}: must be a table"]
    path = table.get("path")
    label = f"{where} ({printable(path)})" if isinstance(path, str) else where
    errors: list[str] = []
    raw: _BinaryTable | None = None
    try:
        raw = _BinaryTable.model_validate(table)
    except ValidationError as exc:
        for err in exc.errors():
            message = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                message = "unknown key"
            errors.append(f"{label}: {_loc(err['loc'])}: {message}")
    caps: CapSet | None = None
    text = table.get("caps")
    if isinstance(text, str):
        caps, problems = _caps(text, table.get("allow_inheritable") is True, last_cap)
        errors.extend(f"{label}: caps: {problem}" for problem in problems)
    uid = 0
    if raw is not None:
        try:
            uid = uid_of(raw.owner)
        except KeyError:
            errors.append(f"{label}: owner: no such user {raw.owner!r}")
    if errors or caps is None or raw is None:
        return None, errors
    entry = Entry(
        path=raw.path,
        caps=caps,
        caps_text=format_text(caps, last_cap=last_cap),
        owner=raw.owner,
        owner_uid=uid,
        sha256=raw.sha256,
        allow_inheritable=raw.allow_inheritable,
        allow_interpreter=raw.allow_interpreter,
        source=where,
    )
    return entry, []


def _caps(text: str, allow_inheritable: bool, last_cap: int) -> tuple[CapSet | None, list[str]]:
    """Parse a declared capability text and apply the state's own rules to it."""
    try:
        caps = parse(text, last_cap=last_cap)
    except CapkeeperError as exc:
        return None, [exc.message]
    problems = []
    beyond = sorted(n for n in caps.capabilities() if n > last_cap)
    if beyond:
        names = ", ".join(capability_name(n) for n in beyond)
        problems.append(f"{names} not known to this kernel (last capability is {last_cap})")
    if caps.inheritable and not allow_inheritable:
        problems.append("inheritable capabilities need allow_inheritable = true")
    return (None if problems else caps), problems
