"""The one exception hierarchy of capkeeper, and the one escape for untrusted text.

This module imports nothing from capkeeper, so every other module can use it.
Each user-facing error carries a message, optional context (usually the path
or file it concerns) and an optional hint telling the user what to do. Every
path or name printed for people goes through :func:`printable`.
"""

from __future__ import annotations

import unicodedata

# The Unicode general categories that can forge or hide output: Cc (C0 and C1
# controls and DEL: a newline starts a forged line, ESC drives the terminal),
# Cf (format characters: bidi overrides reorder what is shown, zero-width
# characters hide), Zl/Zp (U+2028/U+2029 break lines in some viewers) and Cs
# (surrogates: bytes that were not UTF-8, decoded with surrogateescape).
# Everything else, including non-ASCII letters and the no-break space, is shown.
_HIDDEN = frozenset({"Cc", "Cf", "Zl", "Zp", "Cs"})
_NAMED = {"\n": "\\n", "\t": "\\t", "\r": "\\r", "\\": "\\\\"}


def needs_escape(text: str) -> bool:
    """Whether :func:`printable` would change ``text``: it holds a control or
    format character, a line or paragraph separator, or an undecodable byte."""
    # isprintable() is False for every character of the categories above (and
    # for some harmless ones, such as U+00A0): a fast path for ordinary text.
    return not text.isprintable() and any(unicodedata.category(ch) in _HIDDEN for ch in text)


def _escape(ch: str) -> str:
    code = ord(ch)
    if ch in _NAMED:
        return _NAMED[ch]
    if 0xDC80 <= code <= 0xDCFF:  # the byte surrogateescape decoded it from
        return f"\\x{code - 0xDC00:02x}"
    if code <= 0xFF:
        return f"\\x{code:02x}"
    if code <= 0xFFFF:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def printable(text: str) -> str:
    """``text`` safe to show on one line, so an untrusted name cannot forge or hide output.

    Text that needs no escape (see :func:`needs_escape`) is returned unchanged,
    non-ASCII letters and backslashes included. Otherwise each control or
    format character, separator and undecodable byte is written as a Python
    escape (``\\n``, ``\\x1b``, ``\\u202e``; an undecodable byte as ``\\xNN``),
    and backslashes are doubled, so a backslash in such a name is not taken
    for the start of an escape.
    The result never needs escaping again: ``printable`` is idempotent.
    """
    if not needs_escape(text):
        return text
    return "".join(
        _escape(ch) if ch == "\\" or unicodedata.category(ch) in _HIDDEN else ch for ch in text
    )


class CapkeeperError(Exception):
    """Root of every error capkeeper reports to a user without a traceback."""

    def __init__(self, message: str, *, context: str | None = None, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.context = context
        self.hint = hint

    def __str__(self) -> str:
        text = f"{self.context}: {self.message}" if self.context else self.message
        if self.hint:
            text += f" (hint: {self.hint})"
        return text


class InvalidCapabilityText(CapkeeperError):
    """A capability text that libcap's ``cap_from_text``/``setcap`` would refuse."""


class InvalidCapabilityData(CapkeeperError):
    """A ``security.capability`` value that cannot be decoded; shows the bytes."""

    def __init__(self, message: str, data: bytes, *, context: str | None = None):
        super().__init__(f"{message} (value: {data.hex() or 'empty'})", context=context)
        self.data = data


class StateError(CapkeeperError):
    """The state file(s) could not be loaded; ``problems`` lists every one."""

    def __init__(self, problems: list[str]):
        count = len(problems)
        super().__init__(
            f"{count} problem{'s' if count != 1 else ''} in the state:\n"
            + "\n".join(f"  {printable(p)}" for p in problems)
        )
        self.problems = problems


class StateNotFound(StateError):
    """The main state file does not exist (an audit takes that as an empty state)."""


class FileAccessError(CapkeeperError):
    """An OS error while observing or writing a file, turned into a sentence."""

    def __init__(
        self,
        message: str,
        *,
        context: str | None = None,
        hint: str | None = None,
        errno: int | None = None,
    ):
        super().__init__(message, context=context, hint=hint)
        self.errno = errno


class CapabilitiesNotKept(FileAccessError):
    """``security.capability`` read back otherwise right after it was written: something
    changed it again at that moment (a process fighting the restore), or the file system
    does not keep it."""


class UsageError(CapkeeperError):
    """The command line asks for something that cannot be done."""


class PrivilegeError(CapkeeperError):
    """The daemon lacks what it needs to write ``security.capability``."""


class WatchError(CapkeeperError):
    """inotify itself cannot be used (no instance, no binding)."""


class SettingsError(CapkeeperError):
    """A setting (environment ``CAPKEEPER_*``, settings file or option) is invalid (exit 78)."""


class ElfError(CapkeeperError):
    """The bytes are not an ELF file :mod:`capkeeper.elf` can read; the message shows the
    value. Never reaches a user: the ``inspect_*`` helpers turn it into "not recognised"."""


class StatusFileError(CapkeeperError):
    """The status file holds something the daemon does not write; says what, on one line."""
