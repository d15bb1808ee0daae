"""The one component-wise resolution of a declared path, as the kernel resolves it.

A path is taken one name at a time from ``/``: ``.`` and empty names are
skipped, ``..`` goes back to the parent of the directory actually reached (not
of the text: after a symlink that is the target's parent), a symlink's text is
put in front of the names still to resolve (an absolute one restarts at
``/``), and the 41st symlink is a loop (the kernel's MAXSYMLINKS is 40, and it
then fails with ELOOP). :class:`Walk` holds that algorithm and nothing else;
each caller brings its own OS calls and decides what a failure means:

- :func:`capkeeper.files.open_declared`, the trust walk: every directory is
  opened with ``O_NOFOLLOW`` relative to the descriptor of the one before
  (``dir_fd``), so nothing is resolved by string between check and use
  (:class:`FdCalls`);
- :func:`capkeeper.watcher.plan_route`, the watch plan: ``lstat``/``readlink``
  on joined strings, never failing;
- :func:`capkeeper.systemd.writable_directory`, the drop-in writer: stops at the
  first symlink.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Generic, TypeVar

__all__ = ["MAX_SYMLINKS", "FdCalls", "Walk", "components", "posixjoin"]

MAX_SYMLINKS = 40
"""The kernel's MAXSYMLINKS: the 41st symlink of one resolution fails with ELOOP."""

D = TypeVar("D")


def components(path: str) -> list[str]:
    """The names of ``path`` in order, without empty names and ``.`` (``..`` kept)."""
    return [part for part in path.split("/") if part not in ("", ".")]


def posixjoin(directory: str, name: str) -> str:
    """``name`` inside ``directory`` (an absolute, normalised directory path)."""
    return f"/{name}" if directory == "/" else f"{directory}/{name}"


def _keep(handle: object) -> None:
    """The release of a handle that holds nothing (a path string)."""


class Walk(Generic[D]):
    """The state of one resolution of ``path``: the directories entered from ``/``,
    each with its handle (a descriptor for the trust walk, its path for a string
    walk), and the names still to resolve.

    The caller asks for the next name (:meth:`next_name`), looks it up in
    :attr:`directory` with its own OS call, and then either enters it
    (:meth:`enter`), follows it (:meth:`follow`) or stops. Handles left by
    ``..`` and by an absolute symlink are given to ``release`` at once, the
    others at :meth:`close`.
    """

    def __init__(self, path: str, root: D, *, release: Callable[[D], None] = _keep) -> None:
        self._todo = components(path)[::-1]  # reversed: the next name is popped from the end
        self._release = release
        self.stack: list[tuple[D, str]] = [(root, "/")]
        self.symlinks = 0

    @property
    def directory(self) -> tuple[D, str]:
        """The handle and path of the directory the next name is looked up in."""
        return self.stack[-1]

    @property
    def last(self) -> bool:
        """Whether the name just taken is the final one (no name is left after it)."""
        return not self._todo

    def next_name(self) -> str | None:
        """The next name to look up, ``..`` already applied; None when the path is done."""
        while self._todo:
            name = self._todo.pop()
            if name != "..":
                return name
            if len(self.stack) > 1:  # ".." of "/" is "/"
                self._release(self.stack.pop()[0])
        return None

    def enter(self, handle: D, path: str) -> None:
        """Continue inside the directory just looked up."""
        self.stack.append((handle, path))

    def follow(self, target: str) -> bool:
        """Continue with the text of the symlink just looked up.

        False when it is one symlink too many: the kernel fails with ELOOP.
        """
        self.symlinks += 1
        if self.symlinks > MAX_SYMLINKS:
            return False
        if target.startswith("/"):
            while len(self.stack) > 1:
                self._release(self.stack.pop()[0])
        self._todo.extend(reversed(components(target)))
        return True

    def close(self) -> None:
        """Release every handle still held, ``/`` included."""
        while self.stack:
            self._release(self.stack.pop()[0])


class FdCalls:
    """The system calls of the descriptor walk: the real ones.

    Each is looked up in :mod:`os` at the moment of the call. A test that must
    make the file system change at an exact point of the walk (a replacement
    between ``stat`` and ``open``) overrides one method in a subclass.
    """

    def open(self, path: str, flags: int, *, dir_fd: int | None = None) -> int:
        return os.open(path, flags, dir_fd=dir_fd)

    def stat(self, name: str, *, dir_fd: int) -> os.stat_result:
        """``fstatat(dir_fd, name, AT_SYMLINK_NOFOLLOW)``."""
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)

    def fstat(self, fd: int) -> os.stat_result:
        return os.fstat(fd)

    def readlink(self, name: str, *, dir_fd: int) -> str:
        return os.readlink(name, dir_fd=dir_fd)

    def close(self, fd: int) -> None:
        os.close(fd)


FD_CALLS = FdCalls()
"""The real system calls."""
