"""The registry of capkeeper's commands: name → module and one-line summary.

Each command lives in its own module (``capkeeper.commands.apply``, …) exposing
``HELP``, ``DESCRIPTION``, ``add_arguments(parser)`` and
``run(args, settings, out) -> ExitStatus``. The registry names the module without
importing it, so :mod:`capkeeper.cli` lists every command from here and imports
only the one that runs (a one-shot ``apply`` in ``ExecStartPre=`` pays for
nothing else).
"""

from __future__ import annotations

from typing import NamedTuple

__all__ = ["COMMANDS", "CommandInfo"]


class CommandInfo(NamedTuple):
    """Where a command lives and what ``capkeeper --help`` says about it."""

    module: str
    help: str


# In the order ``capkeeper --help`` lists them.
COMMANDS: dict[str, CommandInfo] = {
    "apply": CommandInfo(
        "capkeeper.commands.apply", "make declared binaries carry exactly their capabilities"
    ),
    "check": CommandInfo("capkeeper.commands.check", "report drift without changing files"),
    "show": CommandInfo("capkeeper.commands.show", "print capabilities like getcap"),
    "validate": CommandInfo(
        "capkeeper.commands.validate", "check the state and the trust of declared files"
    ),
    "status": CommandInfo("capkeeper.commands.status", "show what the running daemon reports"),
    "systemd-dropin": CommandInfo(
        "capkeeper.commands.systemd_dropin",
        "write the ReadWritePaths= drop-in that lets the service write declared directories",
    ),
    "watch": CommandInfo(
        "capkeeper.commands.watch",
        "run the daemon: restore capabilities as deploys drop them",
    ),
    "audit": CommandInfo(
        "capkeeper.commands.audit",
        "list every file with capabilities, classified against the state",
    ),
    "adopt": CommandInfo(
        "capkeeper.commands.adopt", "print state entries for files that already carry capabilities"
    ),
    "doctor": CommandInfo(
        "capkeeper.commands.doctor", "explain why declared capabilities would not take effect"
    ),
}
