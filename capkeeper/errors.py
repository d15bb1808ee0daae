"""The one exception hierarchy of capkeeper.

This module imports nothing from capkeeper, so every other module can use it.
Each user-facing error carries a message, optional context (usually the path
or file it concerns) and an optional hint telling the user what to do.
"""

from __future__ import annotations


def printable(text: str) -> str:
    """``text`` safe to show on one line: control characters (a newline in a file
    name) and undecodable bytes escaped, so a name cannot forge output lines."""
    return text if text.isprintable() else text.encode("unicode_escape").decode("ascii")


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
            + "\n".join(f"  {p}" for p in problems)
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


class UsageError(CapkeeperError):
    """The command line asks for something that cannot be done."""
