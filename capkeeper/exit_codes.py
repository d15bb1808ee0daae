"""The exit status of every capkeeper command, decided in one place (:mod:`capkeeper.cli`).

Imports nothing: every layer may name an exit status without importing the CLI.
"""

from __future__ import annotations

from enum import IntEnum


class ExitStatus(IntEnum):
    """Exit codes of every capkeeper command."""

    OK = 0  # everything in sync / done
    DRIFT = 1  # check: some binary differs from the state
    FAILED = 2  # some binary was refused, is missing, or could not be written
    USAGE = 64  # bad command line (EX_USAGE)
    CONFIG = 78  # invalid state or settings (EX_CONFIG)
    INTERRUPTED = 130  # Ctrl-C
