"""The registry of capkeeper's commands: name → module and one-line summary.

Each command lives in its own module (``capkeeper.commands.apply``, …) exposing
``HELP``, ``DESCRIPTION``, ``add_arguments(parser)`` and
``run(args, settings, out) -> ExitStatus``. The registry names the module without
importing it, so :mod:`capkeeper.cli` lists every command from here and imports
only the one that runs (a one-shot ``apply`` in ``ExecStartPre=`` pays for
nothing else).
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable
from types import ModuleType, SimpleNamespace
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

from capkeeper.log import FORMATS, LEVELS

if TYPE_CHECKING:
    from argparse import ArgumentParser

__all__ = [
    "COMMANDS",
    "GLOBAL_ARGUMENTS",
    "Argument",
    "Arguments",
    "CommandInfo",
    "add_all",
    "command_module",
]


class Arguments(SimpleNamespace):
    """A command line as read: an attribute per option and positional, as argparse's
    ``Namespace`` has them. Both readers make one (:func:`capkeeper.cli.parse_args`):
    the quick one must not import argparse, whose Namespace this stands in for."""


class Argument(NamedTuple):
    """One argument of a command, declared once for both readers of a command line:
    argparse's parser is built from it (:func:`add_all`), and the quick reader of a
    plain command line (:func:`capkeeper.cli.quick_args`) takes what it declares."""

    name: str  # "--json"; a positional's dest ("paths")
    help: str | None = None
    metavar: str | None = None
    kind: Literal["value", "flag", "words"] = "value"  # flag: store_true; words: nargs="*"
    choices: tuple[str, ...] | None = None

    @property
    def dest(self) -> str:
        """The attribute that holds its value, as argparse names it."""
        return self.name.lstrip("-").replace("-", "_")


def add_all(parser: ArgumentParser, arguments: Iterable[Argument], **default: Any) -> None:
    """Add ``arguments`` to ``parser`` (with ``default=``, when given, for each)."""
    for argument in arguments:
        options: dict[str, Any] = {"help": argument.help, **default}
        if argument.kind == "words":
            parser.add_argument(argument.name, nargs="*", metavar=argument.metavar, **options)
        elif argument.kind == "flag":
            parser.add_argument(argument.name, action="store_true", **options)
        else:
            parser.add_argument(
                argument.name, metavar=argument.metavar, choices=argument.choices, **options
            )


# The options every command takes, before or after its name.
GLOBAL_ARGUMENTS = (
    Argument("--state", "main state file", metavar="FILE"),
    Argument("--log-format", choices=FORMATS),
    Argument("--log-level", choices=LEVELS),
    Argument("--debug", "show tracebacks and debug logs", kind="flag"),
)


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


def command_module(name: str) -> ModuleType:
    """The module of command ``name`` (imported now: only the command that runs pays)."""
    return importlib.import_module(COMMANDS[name].module)
