"""A trusted on-disk cache: named JSON documents in one directory (``cache_directory``).

The daemon keeps what it can rebuild but would rather not at every start here: the
validated state (:mod:`capkeeper.state`) and the ELF facts of the declared files
(:mod:`capkeeper.files`). A cached value stands in for a check of the trust policy,
so the cache must be as trustworthy as the state files themselves: the directory is
reached by the state's own ``O_NOFOLLOW`` walk from ``/`` (:func:`capkeeper.files.open_declared`)
and judged by the state's route and owner rules (:func:`capkeeper.trust.route_refusals`,
:func:`capkeeper.trust.file_refusals`: root or this process's user, writable by nobody
else), and so is each file, opened ``O_NOFOLLOW`` relative to that directory's
descriptor.

A cache is only ever a shortcut: anything wrong with it (untrusted, missing,
unreadable, too large, not JSON, another format or capkeeper version) is a miss,
logged once at debug level with the reason, and the caller does the full work.
Writes go to a ``0600`` temporary file in the same directory, fsync'd and renamed
over the old one; a failed write (read-only, full, missing directory) is a debug
line too. The directory itself is never created: systemd creates it for the
service (``CacheDirectory=capkeeper``).

JSON, not pickle or marshal: loading a hostile pickle runs code, and the reader here
must be safe on any bytes. The callers type-check every field of what they load.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from capkeeper._version import __version__
from capkeeper.errors import FileAccessError
from capkeeper.files import export_elf_facts, open_declared, read_at_most, restore_elf_facts
from capkeeper.trust import file_refusals, route_refusals

FORMAT = 1
"""The envelope's format; a document of any other format is a miss."""
MAX_CACHE_BYTES = 32 << 20
"""The most a cache file may hold (10,000 entries take about 2 MiB); larger is a miss."""
ELF_CACHE = "elf.json"
"""The ELF facts' cache (:func:`capkeeper.files.export_elf_facts`) in the cache directory."""
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
_WRITE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def _version() -> str:
    """The capkeeper version every document is keyed by: a new version misses."""
    return __version__


class Cache:
    """One cache directory; :meth:`read` and :meth:`write` named documents in it.

    ``directory`` None: caching is off (every read a miss, every write skipped).
    ``writable`` False: a reader only (the one-shot commands); ``defer``: writes wait
    for :meth:`flush`. ``debug`` receives each reason a cache was not used or not
    written, once per reason.
    """

    def __init__(
        self,
        directory: os.PathLike[str] | str | None,
        *,
        writable: bool = False,
        defer: bool = False,
        debug: Callable[..., object] | None = None,
    ) -> None:
        self.directory = None if directory is None else os.fspath(directory)
        self.writable = writable
        self._debug = debug
        self._said: set[str] = set()
        # Deferred writes: each document's builder, called when written.
        self._pending: dict[str, Callable[[], object]] | None = {} if defer else None

    def flush(self) -> None:
        """Write what :meth:`write` kept back (``defer``: the daemon writes after READY=1)."""
        if self._pending is None:
            return
        pending, self._pending = self._pending, {}
        for name, build in pending.items():
            try:
                data = build()
            except Exception as exc:  # a cache only saves time: the daemon runs on without it
                self._note("cache_not_written", name, f"cannot build: {exc!r}")
                continue
            self._write(name, data)

    def _note(self, event: str, name: str, reason: str) -> None:
        key = f"{event} {name} {reason}"
        if key in self._said or self._debug is None:
            return
        self._said.add(key)
        self._debug(event, file=f"{self.directory}/{name}", reason=reason)

    def read(self, name: str) -> Any:
        """The ``data`` of document ``name`` written by this capkeeper version, or None."""
        if self.directory is None:
            return None
        try:
            raw = self._read_trusted(name)
        except _Untrusted as exc:
            self._note("cache_ignored", name, str(exc))
            return None
        except OSError as exc:  # e.g. fstat(2) of the directory: a cache is never an error
            self._note("cache_ignored", name, exc.strerror or str(exc))
            return None
        import json  # noqa: PLC0415 - only when a cache is read: a one-shot may never

        try:
            document = json.loads(raw)
        except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
            self._note("cache_ignored", name, f"not JSON: {exc}")
            return None
        if not (
            type(document) is dict
            and document.get("format") == FORMAT
            and type(document.get("format")) is int
            and document.get("capkeeper") == _version()
            and document.get("name") == name
            and "data" in document
        ):
            self._note("cache_ignored", name, "another format or capkeeper version")
            return None
        return document["data"]

    def write(self, name: str, data: object) -> bool:
        """Replace document ``name`` with ``data`` (JSON types only), or with ``defer`` at
        the next :meth:`flush`; False when not written."""
        return self.write_built(name, lambda: data)

    def write_built(self, name: str, build: Callable[[], object]) -> bool:
        """:meth:`write` of what ``build()`` returns, built only when written: with
        ``defer``, at the next :meth:`flush` (the daemon's state cache document, 10 ms
        with 10,000 entries, waits until after READY=1)."""
        if self.directory is None or not self.writable:
            return False
        if self._pending is not None:
            self._pending[name] = build
            return True
        return self._write(name, build())

    def _write(self, name: str, data: object) -> bool:
        document = {"format": FORMAT, "capkeeper": _version(), "name": name, "data": data}
        try:
            with self._directory() as dir_fd:
                self._replace(dir_fd, name, _pieces(document))
        except _Untrusted as exc:
            self._note("cache_not_written", name, str(exc))
            return False
        except OSError as exc:
            self._note("cache_not_written", name, exc.strerror or str(exc))
            return False
        return True

    def load_elf_facts(self) -> int:
        """Restore the ELF facts a previous daemon saved; the number of files restored.

        A fact is used only for a file whose device, inode, size, mtime and ctime
        are still those it was learnt with (:class:`capkeeper.files._ElfCache`).
        """
        return restore_elf_facts(self.read(ELF_CACHE))

    def save_elf_facts(self) -> bool:
        """Save the ELF facts learnt so far, unless nothing changed since they were
        loaded or last saved; False when nothing was written."""
        data = export_elf_facts() if self.writable and self.directory is not None else None
        return data is not None and self.write(ELF_CACHE, data)

    # -- the trusted directory and files ------------------------------------------------

    def _directory(self) -> contextlib.AbstractContextManager[int]:
        return _trusted_directory(str(self.directory))

    def _read_trusted(self, name: str) -> bytes:
        with self._directory() as dir_fd:
            try:
                fd = os.open(name, _READ_FLAGS, dir_fd=dir_fd)
            except OSError as exc:
                if exc.errno == errno.ENOENT:
                    raise _Untrusted("no cache yet") from None
                if exc.errno == errno.ELOOP:  # O_NOFOLLOW on a symlink
                    raise _Untrusted("a symlink") from None
                raise _Untrusted(f"cannot open: {exc.strerror}") from None
            try:
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode):
                    raise _Untrusted("not a regular file")
                _judge_file(name, st)
                if st.st_size > MAX_CACHE_BYTES:
                    raise _Untrusted(f"larger than {MAX_CACHE_BYTES >> 20} MiB")
                content = read_at_most(fd, MAX_CACHE_BYTES)
                if content is None:
                    raise _Untrusted(f"larger than {MAX_CACHE_BYTES >> 20} MiB")
                return content
            except OSError as exc:
                raise _Untrusted(f"cannot read: {exc.strerror}") from None
            finally:
                os.close(fd)

    @staticmethod
    def _replace(dir_fd: int, name: str, pieces: Iterable[str]) -> None:
        temporary = f".{name}.{os.getpid()}.tmp"
        with contextlib.suppress(FileNotFoundError):  # left by a process that died writing
            os.unlink(temporary, dir_fd=dir_fd)
        fd = os.open(temporary, _WRITE_FLAGS, 0o600, dir_fd=dir_fd)
        try:
            with os.fdopen(fd, "wb") as handle:
                os.fchmod(fd, 0o600)  # whatever the umask
                size = 0
                for piece in pieces:  # JSON text is ASCII (ensure_ascii)
                    size += handle.write(piece.encode("ascii"))
                    if size > MAX_CACHE_BYTES:
                        raise _Untrusted(f"larger than {MAX_CACHE_BYTES >> 20} MiB")
                handle.flush()
                os.fsync(fd)
            os.rename(temporary, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temporary, dir_fd=dir_fd)
            raise


_SLICE = 256
"""Elements of a long list encoded at once by :func:`_pieces`."""


def _pieces(value: object, depth: int = 3) -> Iterator[str]:
    """``json.dumps(value, separators=(",", ":"))`` in pieces: the lists and dicts of
    the top ``depth`` levels (the envelope, its data, the data's columns) element by
    element, so a document of 10,000 entries is never held whole, nor as the encoder's
    10,000 chunks at once (Python keeps the heap such a peak grew: ~3 MB of the
    daemon's RSS at 10,000 entries, measured)."""
    import json  # noqa: PLC0415 - only when a cache is written

    encode = json.JSONEncoder(separators=(",", ":")).encode
    if depth and type(value) is list:
        yield "["
        if depth == 1:  # the encoder's speed, a bounded slice at a time
            for start in range(0, len(value), _SLICE):
                piece = encode(value[start : start + _SLICE])[1:-1]
                yield ("," if start else "") + piece
        else:
            for number, item in enumerate(value):
                yield from (("," if number else ""), *_pieces(item, depth - 1))
        yield "]"
    elif depth and type(value) is dict and all(type(key) is str for key in value):
        yield "{"
        for number, (key, item) in enumerate(value.items()):
            yield ("," if number else "") + encode(key) + ":"
            yield from _pieces(item, depth - 1)
        yield "}"
    else:  # a leaf, or a dict whose keys json.dumps turns into strings
        yield encode(value)


class _Untrusted(Exception):
    """Why a cache directory or file is not used (the message)."""


def _owners() -> tuple[tuple[int, ...], str]:
    euid = os.geteuid()
    return (0, euid), ("root" if euid == 0 else f"root or uid {euid}")


def _judge_file(path: str, st: os.stat_result) -> None:
    """The state's owner and mode rule, for a cache file or the cache directory."""
    owners, owner = _owners()
    refusals = file_refusals(path, st.st_uid, st.st_mode, owners=owners, owner=owner)
    if st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode):
        raise _Untrusted("hard-linked")
    if refusals:
        raise _Untrusted("; ".join(refusal.message for refusal in refusals))


@contextlib.contextmanager
def _trusted_directory(path: str) -> Iterator[int]:
    """The cache directory's descriptor, reached and judged like ``state.d``."""
    try:
        with open_declared(path, directory=True) as (fd, hops, resolved):
            st = os.fstat(fd)
            owners, owner = _owners()
            refusals = route_refusals(
                hops,
                declared=path,
                resolved=resolved,
                uid=st.st_uid,
                nlink=1,  # link(2) refuses directories (EPERM): st_nlink counts subdirectories
                owners=owners,
                owner=owner,
            )
            if refusals:
                raise _Untrusted("; ".join(refusal.message for refusal in refusals))
            _judge_file(resolved, st)
            yield fd
    except FileAccessError as exc:
        if exc.errno == errno.ENOENT:
            raise _Untrusted("no such directory") from None
        raise _Untrusted(exc.message) from None
