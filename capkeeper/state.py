"""The declared state: which binary carries which file capabilities.

The state is the main TOML file (default ``/etc/capkeeper/state.toml``) plus
every ``state.d/*.toml`` beside it, read in name order. Each ``[[binary]]``
table declares one file. Everything is validated at this edge into frozen
:class:`Entry` values; every problem is collected and reported at once, each
naming its file and entry.

The tables are checked by hand from one table of keys (:data:`TABLE_KEYS`), not
by pydantic: the check is six exact-type tests and two rules, and importing
pydantic would cost every ``ExecStartPre=`` apply three bare interpreter starts.
The messages are pydantic's, word for word (a test keeps the old model as the
oracle).

A state in the plain form every example and generated state uses is read by
:func:`capkeeper.plaintoml.read_plain`, any other by ``tomllib``: the same document,
at a sixth of the cost.

The daemon also keeps the validated entries in a cache (:mod:`capkeeper.cache`), as
trusted as the state files and keyed by all of them: with 10,000 entries, parsing
and validating cost half a second of every start.
"""

from __future__ import annotations

import errno
import functools
import os
import posixpath
import pwd
import re
import stat
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

from capkeeper.capabilities import CapSet, format_text, parse
from capkeeper.errors import (
    CapkeeperError,
    FileAccessError,
    StateError,
    StateNotFound,
    UsageError,
    needs_escape,
    printable,
)
from capkeeper.files import REPLACED, open_declared, read_at_most
from capkeeper.kernel import cap_last_cap
from capkeeper.model import Entry, Hop
from capkeeper.plaintoml import read_plain
from capkeeper.trust import declaration_refusals, file_refusals, route_refusals

if TYPE_CHECKING:
    from _typeshed import StrPath

    from capkeeper.cache import Cache

DEFAULT_STATE = "/etc/capkeeper/state.toml"
MAX_STATE_BYTES = 16 << 20
"""The most a state file may hold: far beyond any real state (a [[binary]] table is
about 100 bytes), small enough that reading and parsing one stays cheap."""
_SHA256 = re.compile(r"[0-9a-f]{64}")
_UID = re.compile(r"[0-9]+")  # ASCII only: str.isdigit() also accepts "²" and "١٢"


class _BinaryTable(NamedTuple):
    """One ``[[binary]]`` table exactly as written in the file, once :func:`_table` accepts it.

    A NamedTuple, not a dataclass: creating a dataclass costs ~1 ms of every run.
    """

    path: str
    caps: str
    sha256: str | None = None
    owner: str = "root"
    allow_inheritable: bool = False
    allow_interpreter: bool = False


def _absolute(value: str) -> str:
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


def _hex_digest(value: str) -> str:
    if not _SHA256.fullmatch(value.lower()):
        raise ValueError("must be 64 hexadecimal digits")
    return value.lower()


# Each key of a [[binary]] table: its type, whether it must be present, and the rule
# that normalises it (ValueError: the message). TOML gives exact types, so a value
# of another type (1 for true, 7 for a string) is refused, never converted.
TABLE_KEYS: dict[str, tuple[type, bool, Callable[[Any], Any] | None]] = {
    "path": (str, True, _absolute),
    "caps": (str, True, None),
    "sha256": (str, False, _hex_digest),
    "owner": (str, False, None),
    "allow_inheritable": (bool, False, None),
    "allow_interpreter": (bool, False, None),
}
_TYPE_NAMES = {str: "string", bool: "boolean"}


def _table(table: dict[str, Any]) -> tuple[_BinaryTable | None, list[tuple[str, str]]]:
    """Validate one ``[[binary]]`` table: the table, or every ``(key, problem)`` in it.

    Problems come in the order of :data:`TABLE_KEYS`, then unknown keys in the
    order written. The wording is the one pydantic used for this model when it
    validated the state (``Field required``, ``Input should be a valid
    string``): importing pydantic costs a one-shot ``apply`` three times a bare
    interpreter start, and these few exact-type checks are all it did here.
    """
    values: dict[str, Any] = {}
    problems: list[tuple[str, str]] = []
    for key, (kind, required, rule) in TABLE_KEYS.items():
        if key not in table:
            if required:
                problems.append((key, "Field required"))
            continue
        value = table[key]
        if type(value) is not kind:
            problems.append((key, f"Input should be a valid {_TYPE_NAMES[kind]}"))
            continue
        try:
            values[key] = value if rule is None else rule(value)
        except ValueError as exc:
            problems.append((key, str(exc)))
    problems += [(key, "unknown key") for key in table if key not in TABLE_KEYS]
    if problems:
        return None, problems
    return _BinaryTable(**values), []


class State(NamedTuple):
    """The whole declared state, in declaration order."""

    entries: tuple[Entry, ...]
    files: tuple[str, ...]  # absolute, in the order read

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
    """The uid of a user name or ASCII number; KeyError when there is no such user.

    Anything but ASCII digits is a user name: ``"١٢"`` is looked up, not uid 12.
    """
    if _UID.fullmatch(owner):
        uid = int(owner)
        if uid > _MAX_UID:
            raise KeyError(owner)
        return uid
    try:
        return pwd.getpwnam(owner).pw_uid
    except ValueError:  # e.g. an embedded NUL
        raise KeyError(owner) from None


_WHY = "whoever can edit the state can grant capabilities"
_STATE_FIX = {
    "directory-owner": "chown root {}",
    "directory-writable": "chmod go-w {}",
    "symlink": "make it root's: chown -h root {}",
    "hardlink": "keep the state in a directory only root can write",
    "pseudo-fs": "point --state at the real file",
}
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
_KINDS = (
    (stat.S_ISDIR, "directory"),
    (stat.S_ISFIFO, "FIFO"),
    (stat.S_ISSOCK, "socket"),
    (stat.S_ISCHR, "character device"),
    (stat.S_ISBLK, "block device"),
)


def _owners(euid: int) -> str:
    """Who may own the state and the route to it: root, and the user reading it."""
    return "root" if euid == 0 else f"root or uid {euid}"


def _kind(mode: int) -> str:
    return next((name for test, name in _KINDS if test(mode)), "special file")


class _Reader:
    """Reads the state files through checked descriptors, collecting every problem.

    Whoever can change the state, or any directory or symlink on the way to it,
    can grant any capability: each file and ``state.d/`` is reached by the same
    ``O_NOFOLLOW`` walk from ``/`` as a binary (:func:`capkeeper.files.open_declared`),
    its route judged by :func:`capkeeper.trust.route_refusals`, and its content read
    from the very descriptor whose owner and mode were checked.

    A plain class, not a dataclass: creating a dataclass costs ~1 ms of every run.
    """

    def __init__(
        self,
        main: str,  # absolute
        why: str = _WHY,  # what whoever can change the file could do
        names: str = "--state / CAPKEEPER_STATE",  # how to point capkeeper at another file
    ) -> None:
        self.main = main
        self.why = why
        self.names = names
        self.problems: list[str] = []
        self.documents: list[tuple[str, str, bytes]] = []

    def _shown(self, path: str) -> str:
        """How problems and entry sources name ``path`` (a file name may hold anything)."""
        return printable(_display(path, self.main))

    def _route(self, hops: list[Hop], declared: str, resolved: str, st: os.stat_result) -> bool:
        """Report every route rule the walk to ``declared`` breaks; True when none does."""
        euid = os.geteuid()
        refusals = route_refusals(
            hops,
            declared=declared,
            resolved=resolved,
            uid=st.st_uid,
            nlink=st.st_nlink,
            owners=(0, euid),
            owner=_owners(euid),
        )
        for refusal in refusals:
            fix = _STATE_FIX.get(refusal.rule, "{}").format(refusal.component)
            self.problems.append(printable(f"{refusal.message}: {self.why} ({fix})"))
        return not refusals

    def _own(self, shown: str, resolved: str, st: os.stat_result) -> bool:
        """The owner and mode rule for a state file or ``state.d`` itself; True when kept."""
        messages = {
            "owner": f"owned by uid {st.st_uid}: {self.why} (chown root {resolved})",
            # No sticky exception here: in a sticky state.d anyone could add a file.
            "file-writable": f"writable by group or others (mode {stat.S_IMODE(st.st_mode):04o}): "
            f"{self.why} (chmod go-w {resolved})",
        }
        euid = os.geteuid()
        refusals = file_refusals(
            resolved, st.st_uid, st.st_mode, owners=(0, euid), owner=_owners(euid)
        )
        for refusal in refusals:
            self.problems.append(printable(f"{shown}: {messages[refusal.rule]}"))
        return not refusals

    def _read(self, fd: int, shown: str, declared: str, st: os.stat_result) -> None:
        """Read a trusted state file from ``fd``: at most :data:`MAX_STATE_BYTES`."""
        too_big = (
            f"{shown}: larger than {MAX_STATE_BYTES >> 20} MiB, the most a state file may "
            "hold: not read (split it into state.d/ drop-ins)"
        )
        if st.st_size > MAX_STATE_BYTES:
            self.problems.append(printable(too_big))
            return
        try:
            content = read_at_most(fd, MAX_STATE_BYTES)
        except OSError as exc:
            self.problems.append(printable(f"{shown}: cannot read: {exc.strerror}"))
            return
        if content is None:
            self.problems.append(printable(too_big))
            return
        self.documents.append((declared, shown, content))

    def _checked_read(
        self, fd: int, hops: list[Hop], declared: str, resolved: str, st: os.stat_result
    ) -> None:
        """Judge the route and the owner of a state file, and read it only if both hold:
        an untrusted file is never read (it could be any size or shape)."""
        shown = self._shown(declared)
        route = self._route(hops, declared, resolved, st)
        if self._own(shown, resolved, st) and route:
            self._read(fd, shown, declared, st)

    def main_file(self) -> None:
        """Read the main file; a missing or non-regular one is the only problem reported."""
        declared = self.main
        try:
            with open_declared(declared) as (fd, hops, resolved):
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode):
                    raise StateError(
                        [
                            f"{printable(declared)}: not a regular file (create it, or point "
                            f"{self.names} at another file)"
                        ]
                    )
                self._checked_read(fd, hops, declared, resolved, st)
        except FileAccessError as exc:
            if exc.errno == errno.ENOENT:
                raise StateNotFound(
                    [
                        f"{printable(declared)}: not found (create it, or point {self.names} "
                        "at another file)"
                    ]
                ) from None
            raise StateError([printable(str(exc))]) from None

    def dropins(self) -> None:
        """Read ``state.d/*.toml`` beside the main file, in name order.

        Hidden names (``.#web.toml``, an editor's lock) are skipped; anything
        else named ``*.toml`` that cannot be read as a state file is a problem.
        """
        declared = posixpath.join(posixpath.dirname(self.main), "state.d")
        try:
            with open_declared(declared, directory=True) as (dir_fd, hops, resolved):
                st = os.fstat(dir_fd)
                route = self._route(hops, declared, resolved, st)
                if not (self._own("state.d", resolved, st) and route):
                    return  # no drop-in in an untrusted state.d is read
                names = sorted(
                    name
                    for name in os.listdir(dir_fd)
                    if name.endswith(".toml") and not name.startswith(".")
                )
                for name in names:
                    self._dropin(dir_fd, declared, name)
        except FileAccessError as exc:
            if exc.errno == errno.ENOENT:
                self._missing_dropins(declared)
                return
            if exc.errno == errno.ENOTDIR:
                self.problems.append(
                    "state.d: not a directory: no drop-in is read (remove it, or make it a "
                    "directory)"
                )
                return
            self.problems.append(printable(f"state.d: {exc.message}"))
        except OSError as exc:
            self.problems.append(printable(f"state.d: cannot list: {exc.strerror}"))

    def _missing_dropins(self, declared: str) -> None:
        """No ``state.d``: silent, unless a symlink named so leads nowhere.

        A dangling ``state.d`` (an unmounted file system, a removed release)
        would silently drop every entry its drop-ins declared.
        """
        try:
            target = os.readlink(declared)
        except OSError:
            return  # not there at all (EINVAL: something appeared that is no symlink)
        self.problems.append(
            printable(
                f"state.d: dangling symlink to {target}: no drop-in is read (restore its "
                "target, or remove the symlink)"
            )
        )

    def _dropin(self, dir_fd: int, directory: str, name: str) -> None:
        declared = posixpath.join(directory, name)
        shown = self._shown(declared)
        try:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            if stat.S_ISLNK(st.st_mode):
                self._linked_dropin(declared, shown, os.readlink(name, dir_fd=dir_fd))
                return
            if not stat.S_ISREG(st.st_mode):
                self.problems.append(
                    f"{printable(shown)}: is a {_kind(st.st_mode)}, not a regular file: not "
                    "read (remove it, or rename it without .toml)"
                )
                return
            # Opened relative to the checked state.d descriptor: a rename of the name
            # after the listing cannot lead anywhere else.
            fd = os.open(name, _READ_FLAGS, dir_fd=dir_fd)
        except OSError as exc:
            self.problems.append(printable(f"{shown}: cannot open: {exc.strerror}"))
            return
        try:
            opened = os.fstat(fd)
            if (opened.st_dev, opened.st_ino) != (st.st_dev, st.st_ino):
                self.problems.append(printable(f"{shown}: {REPLACED} (load the state again)"))
                return
            # Its route is state.d's, judged already (a problem there is reported).
            if self._own(shown, declared, opened):
                self._read(fd, shown, declared, opened)
        finally:
            os.close(fd)

    def _linked_dropin(self, declared: str, shown: str, target: str) -> None:
        """A symlinked drop-in: walked from ``/`` like the main file, then checked."""
        try:
            with open_declared(declared) as (fd, hops, resolved):
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode):
                    self.problems.append(
                        printable(
                            f"{shown}: is a symlink to a {_kind(st.st_mode)} ({target}), not a "
                            "regular file: not read (remove it, or rename it without .toml)"
                        )
                    )
                    return
                self._checked_read(fd, hops, declared, resolved, st)
        except FileAccessError as exc:
            if exc.errno == errno.ENOENT:
                self.problems.append(
                    printable(
                        f"{shown}: dangling symlink to {target}: not read (remove it, or "
                        "restore its target)"
                    )
                )
                return
            self.problems.append(printable(f"{shown}: {exc.message}"))


def _display(path: str, main: str) -> str:
    """``path`` below the main file's directory, relative to it; any other, whole.

    Both are absolute and normal (``os.path.abspath``, then joined with plain names).
    """
    base = posixpath.join(posixpath.dirname(main), "")
    return path[len(base) :] if path.startswith(base) and path != base else path


def read_trusted_file(path: str, *, why: str, names: str) -> bytes | None:
    """Read a configuration file other than the state (the settings file) under the
    state's main-file rules; None when nothing is at ``path``.

    The route, owner and mode rules are the state's, and the content is read from
    the checked descriptor. ``why`` says what whoever can change the file could
    do, ``names`` how to point capkeeper at another file. Raises
    :class:`StateError` listing every rule broken; a dangling symlink is one.
    """
    reader = _Reader(os.path.abspath(path), why=why, names=names)
    try:
        reader.main_file()
    except StateNotFound:
        try:
            target = os.readlink(path)
        except OSError:  # nothing there at all (EINVAL: something that is no symlink)
            return None
        # A removed release or an unmounted file system must not silently drop the file.
        reader.problems.append(printable(f"{path}: dangling symlink to {target}: not read"))
    if reader.problems:
        raise StateError(list(dict.fromkeys(reader.problems)))
    return reader.documents[0][2]


def load_state(
    main: StrPath = DEFAULT_STATE,
    *,
    last_cap: int | None = None,
    uid_of: Callable[[str], int] = _uid_of,
    cache: Cache | None = None,
) -> State:
    """Load and validate the state; raise :class:`StateError` listing every problem.

    This is the one way the state is read (one-shot commands, the daemon's
    start and every SIGHUP reload): the main file, ``state.d/`` and each
    drop-in pass the route and ownership rules and are read from the checked
    descriptors, or the whole state is invalid.

    With a ``cache`` (a read-only one only for a state of :data:`CACHE_WORTH` bytes or
    more), the files are still read that way every time, but parsing
    and validating them is skipped when the cache holds the entries validated
    from exactly these files (:func:`_state_key`); owner names are resolved
    again on every load. A state validated here is written to a writable
    ``cache``; a state with problems never is.
    """
    limit = cap_last_cap() if last_cap is None else last_cap
    try:
        absolute = os.path.abspath(main)
    except OSError as exc:  # getcwd(2) fails once the working directory is removed
        raise StateError(
            [
                f"{printable(str(main))}: a relative state path is read from the working "
                f"directory, which is gone ({exc.strerror}): give an absolute path"
            ]
        ) from None
    # One lookup per owner name and load (a reload looks again): 10,000 entries owned
    # by root made 10,000 getpwnam(3) calls through NSS.
    uid_of = functools.lru_cache(maxsize=None)(uid_of)
    # And one parse per distinct capability text: 10,000 entries mostly share a few.
    caps_of = functools.lru_cache(maxsize=None)(_caps)
    reader = _Reader(absolute)
    reader.main_file()
    reader.dropins()
    problems = list(dict.fromkeys(reader.problems))  # a shared ancestor is reported once
    files = tuple(path for path, _, _ in reader.documents)
    key = ""
    if (
        cache is not None
        and not problems
        and (cache.writable or sum(len(data) for _, _, data in reader.documents) >= CACHE_WORTH)
    ):
        key = _state_key(absolute, reader.documents, limit)
        cached = _from_cache(cache.read(STATE_CACHE), key, uid_of)
        if cached is not None:
            return State(entries=cached, files=files)
    entries: list[Entry] = []
    seen: dict[str, str] = {}
    for _, shown, data in reader.documents:
        try:
            document = _parse(data.decode("utf-8"))
        except UnicodeDecodeError as exc:
            problems.append(f"{shown}: cannot read: {exc}")
            continue
        except ValueError as exc:  # tomllib.TOMLDecodeError, or a value it cannot convert
            problems.append(f"{shown}: invalid TOML: {exc}")
            continue
        except RecursionError:
            problems.append(f"{shown}: invalid TOML: nested too deeply to parse")
            continue
        except MemoryError:
            problems.append(f"{shown}: invalid TOML: too large to parse in memory")
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
            entry, errors = _entry(table, f"{shown}: entry {number}", limit, uid_of, caps_of)
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
    if cache is not None and cache.writable and key:
        cache.write_built(STATE_CACHE, lambda: _document(key, entries))
    return State(entries=tuple(entries), files=files)


def _parse(text: str) -> dict[str, Any]:
    """The TOML document ``text``: the plain form by :func:`read_plain`, any other by
    ``tomllib``, which alone decides and words every invalid document."""
    document = read_plain(text)
    if document is not None:
        return document
    import tomllib  # noqa: PLC0415 - 12 ms of imports a plain state never needs

    return tomllib.loads(text)


STATE_CACHE = "state.json"
"""The validated-state cache's name in the cache directory."""
CACHE_WORTH = 64 << 10
"""The state size from which a read-only cache (a one-shot command's) is looked at: below
it, parsing costs less than hashing the files and reading the cache (~600 entries)."""


def _state_key(main: str, documents: Sequence[tuple[str, str, bytes]], last_cap: int) -> str:
    """What every validated entry depends on but owner names: the main file's path, the
    name, shown name and bytes of every state file in the order read (so adding,
    removing or renaming a drop-in changes it too) and the kernel's last capability.
    The capkeeper version is the cache's (:mod:`capkeeper.cache`)."""
    # hashlib.blake2b itself: importing hashlib loads OpenSSL's libcrypto, 5 ms of every
    # daemon start (the key is hashed at each), for a hash of equal strength.
    try:
        from _blake2 import blake2b  # noqa: PLC0415
    except ImportError:  # pragma: no cover - a Python built without it
        from hashlib import blake2b  # noqa: PLC0415

    digest = blake2b(digest_size=32)
    fields = [main.encode(errors="surrogateescape"), str(last_cap).encode()]
    for declared, shown, data in documents:
        fields += [os.fsencode(declared), shown.encode(errors="surrogateescape"), data]
    for value in fields:  # each length-prefixed: no two lists of fields hash alike
        digest.update(len(value).to_bytes(8, "little"))
        digest.update(value)
    return digest.hexdigest()


def _document(key: str, entries: Sequence[Entry]) -> dict[str, object]:
    """The state cache document: each distinct declaration (caps, owner, pin, flags) once,
    and per entry its path, its declaration's index and its source, in three columns (few
    objects to parse and to free: the daemon keeps what it builds from them)."""
    kinds: dict[tuple[object, ...], int] = {}
    indexes: list[int] = []
    for entry in entries:
        caps = entry.caps
        kind = (
            caps.permitted,
            caps.inheritable,
            caps.effective,
            caps.rootid,
            entry.caps_text,
            entry.owner,
            entry.sha256,
            entry.allow_inheritable,
            entry.allow_interpreter,
        )
        indexes.append(kinds.setdefault(kind, len(kinds)))
    return {
        "key": key,
        "kinds": [list(kind) for kind in kinds],
        "paths": [entry.path for entry in entries],
        "of": indexes,
        "sources": [entry.source for entry in entries],
    }


_Declaration = tuple[CapSet, str, str, int, str | None, bool, bool]


def _declaration(kind: object, uid_of: Callable[[str], int]) -> _Declaration:
    """The shared fields of one of :func:`_document`'s kinds, in :class:`Entry` order from
    ``caps`` to ``allow_interpreter``; ValueError or KeyError (no such owner) if malformed."""
    if type(kind) is not list or len(kind) != 9:
        raise ValueError(kind)
    permitted, inheritable, effective, rootid, text, owner, digest, inherit, interp = kind
    # Exact types: JSON's true is no number here, nor 1 a boolean.
    if not (
        type(permitted) is int
        and type(inheritable) is int
        and type(effective) is bool
        and type(rootid) is int
        and type(text) is str
        and type(owner) is str
        and (digest is None or type(digest) is str)
        and type(inherit) is bool
        and type(interp) is bool
    ):
        raise ValueError(kind)
    caps = CapSet(permitted, inheritable, effective, rootid)
    return (caps, text, owner, uid_of(owner), digest, inherit, interp)


def _from_cache(data: object, key: str, uid_of: Callable[[str], int]) -> tuple[Entry, ...] | None:
    """The entries of a state cache document for ``key``; None when it is for other
    files, malformed in any way, or an owner no longer resolves (the full load then
    reports it)."""
    if type(data) is not dict or data.get("key") != key:
        return None
    kinds, paths, indexes, sources = (
        data.get(name) for name in ("kinds", "paths", "of", "sources")
    )
    if not (
        type(kinds) is list
        and type(paths) is list
        and type(indexes) is list
        and type(sources) is list
        and len(paths) == len(indexes) == len(sources)
    ):
        return None
    try:
        declarations = [_declaration(kind, uid_of) for kind in kinds]
    except (KeyError, ValueError):  # no such owner now; a mask CapSet refuses
        return None
    count = len(declarations)
    entries: list[Entry] = []
    for path, index, source in zip(paths, indexes, sources, strict=True):
        if not (
            type(path) is str and type(index) is int and 0 <= index < count and type(source) is str
        ):
            return None
        caps, text, owner, uid, digest, inherit, interp = declarations[index]
        entries.append(Entry(path, caps, text, owner, uid, digest, inherit, interp, source))
    return tuple(entries)


_CapsOf = Callable[[str, bool, int], tuple[CapSet | None, str, tuple[str, ...]]]


def _entry(
    table: Any,
    where: str,
    last_cap: int,
    uid_of: Callable[[str], int],
    caps_of: _CapsOf,
) -> tuple[Entry | None, list[str]]:
    """The entry of one ``[[binary]]`` table, or None and every problem in it."""
    entry = _plain_entry(table, where, last_cap, uid_of, caps_of)
    if entry is not None:
        return entry, []
    return _checked_entry(table, where, last_cap, uid_of, caps_of)


def _plain_entry(
    table: Any,
    where: str,
    last_cap: int,
    uid_of: Callable[[str], int],
    caps_of: _CapsOf,
) -> Entry | None:
    """The entry :func:`_checked_entry` makes of a table of a path already in normal
    form and valid capabilities, and nothing else; None for any other table.

    Nearly every table is one: each is checked here in a fifth of the time (10,000
    tables in 25 ms instead of 70 ms, a daemon's start with no state cache). A path
    starting with ``/`` that holds no ``//``, no ``/.`` and no trailing ``/`` is its
    own normal form (no empty, ``.`` or ``..`` name to remove), and a printable one
    has nothing to escape. Anything else, an error above all, is for
    :func:`_checked_entry` to judge and word.
    """
    if type(table) is not dict or len(table) != 2:
        return None
    path, text = table.get("path"), table.get("caps")
    if not (
        type(path) is str
        and type(text) is str
        and path.startswith("/")
        and not path.endswith("/")
        and "//" not in path
        and "/." not in path
        and path.isprintable()
    ):
        return None
    caps, caps_text, _ = caps_of(text, False, last_cap)
    if caps is None:
        return None
    try:
        uid = uid_of("root")
    except (KeyError, ValueError):
        return None
    return Entry(path, caps, caps_text, "root", uid, None, False, False, where)


def _checked_entry(
    table: Any,
    where: str,
    last_cap: int,
    uid_of: Callable[[str], int],
    caps_of: _CapsOf,
) -> tuple[Entry | None, list[str]]:
    """:func:`_entry` for any table: every rule, and every problem worded."""
    if not isinstance(table, dict):
        return None, [f"{where}: must be a table"]
    raw, invalid = _table(table)
    caps: CapSet | None = None
    caps_text = ""
    problems: tuple[str, ...] = ()
    text = table.get("caps")
    if isinstance(text, str):
        caps, caps_text, problems = caps_of(text, table.get("allow_inheritable") is True, last_cap)
    uid = 0
    owner = ""  # what is wrong with the owner
    if raw is not None:
        try:
            uid = uid_of(raw.owner)
        except (KeyError, ValueError):
            owner = f"no such user {raw.owner!r}"
    if invalid or problems or owner or caps is None or raw is None:
        # Worded only for an entry with problems: most have none.
        path = table.get("path")
        label = f"{where} ({printable(path)})" if isinstance(path, str) else where
        errors = [f"{label}: {key}: {message}" for key, message in invalid]
        errors.extend(f"{label}: caps: {problem}" for problem in problems)
        if owner:
            errors.append(f"{label}: owner: {owner}")
        return None, errors
    entry = Entry(
        path=raw.path,
        caps=caps,
        caps_text=caps_text,
        owner=raw.owner,
        owner_uid=uid,
        sha256=raw.sha256,
        allow_inheritable=raw.allow_inheritable,
        allow_interpreter=raw.allow_interpreter,
        source=where,
    )
    return entry, []


def _caps(
    text: str, allow_inheritable: bool, last_cap: int
) -> tuple[CapSet | None, str, tuple[str, ...]]:
    """Parse a declared capability text and apply the state's own rules to it: the
    capabilities and their canonical text, or None, "" and every problem."""
    try:
        caps = parse(text, last_cap=last_cap)
    except CapkeeperError as exc:
        return None, "", (exc.message,)
    problems = tuple(
        refusal.message
        for refusal in declaration_refusals(
            caps, allow_inheritable=allow_inheritable, last_cap=last_cap
        )
    )
    if problems:
        return None, "", problems
    return caps, format_text(caps, last_cap=last_cap), ()


def load_state_or_empty(path: StrPath) -> tuple[State, str | None]:
    """The state, or an empty one with a note when the file does not exist.

    An audit is how an unmanaged host is first looked at, so a missing state
    is not an error: every finding is then unmanaged. An invalid state is.
    """
    try:
        return load_state(path), None
    except StateNotFound:
        return State(entries=(), files=()), f"no state at {path}: every finding is unmanaged"
