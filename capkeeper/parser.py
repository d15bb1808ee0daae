"""The command line read with argparse: every command, ``--help``, ``--version`` and
the explanation of a mistake.

:func:`capkeeper.cli.parse_args` comes here for any command line the quick reader
does not take (:func:`capkeeper.cli.quick_args`). Only the named command's module is
imported, so ``capkeeper show --help`` does not pay for ``audit`` or the daemon.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterable, Sequence
from typing import Any, NoReturn

from capkeeper.commands import COMMANDS, GLOBAL_ARGUMENTS, Arguments, add_all, command_module
from capkeeper.errors import UsageError

__all__ = ["build_parser", "parse"]

# The global options that take a value: skipped when looking for the command name.
_VALUED = tuple(a.name for a in GLOBAL_ARGUMENTS if a.kind == "value")


class _Version(argparse.Action):
    """``--version``: reads the installed version only when asked (it costs an import)."""

    def __init__(self, option_strings: Sequence[str], dest: str, help: str | None = None) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, help=help)

    def __call__(self, parser: argparse.ArgumentParser, *args: object) -> None:
        import capkeeper  # noqa: PLC0415

        sys.stdout.write(f"capkeeper {capkeeper.__version__}\n")
        parser.exit()


def _columns() -> int:
    """``shutil.get_terminal_size().columns``: ``$COLUMNS`` when a positive number, else
    the width of the terminal on stdout, else 80."""
    try:
        columns = int(os.environ["COLUMNS"])
    except (KeyError, ValueError):
        columns = 0
    if columns > 0:
        return columns
    try:
        return os.get_terminal_size(sys.__stdout__.fileno()).columns or 80  # type: ignore[union-attr]
    except (AttributeError, ValueError, OSError):  # stdout None, closed, or not a terminal
        return 80


class _Formatter(argparse.HelpFormatter):
    """argparse's help layout, with the width found without importing shutil.

    argparse builds a formatter for every option it adds (to check its metavar)
    and, given no width, imports shutil (and with it bz2, lzma) to ask for the
    terminal's: a few ms of every one-shot run for no output.
    """

    def __init__(
        self,
        prog: str,
        indent_increment: int = 2,
        max_help_position: int = 24,
        width: int | None = None,
    ) -> None:
        width = _columns() - 2 if width is None else width  # as argparse computes it
        super().__init__(prog, indent_increment, max_help_position, width)


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see '{self.prog} --help')")

    def parse_known_args(  # type: ignore[override]  # typeshed: generic in the namespace
        self, args: Sequence[str] | None = None, namespace: object = None
    ) -> tuple[Any, list[str]]:
        """What argparse reads, in an :class:`Arguments` (the quick reader's kind)."""
        return super().parse_known_args(args, Arguments() if namespace is None else namespace)


def build_parser(commands: Iterable[str] | None = None) -> _Parser:
    """The parser of every command; with ``commands``, only those get their options
    (the others are listed by name and summary, and their modules are not imported)."""
    full = set(COMMANDS if commands is None else commands)
    parser = _Parser(
        prog="capkeeper",
        description="Keep declared file capabilities on binaries across deploys.",
    )
    parser.add_argument("--version", action=_Version, help="show the version and exit")
    add_all(parser, GLOBAL_ARGUMENTS, default=None)
    common = _Parser(add_help=False)
    add_all(common, GLOBAL_ARGUMENTS, default=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for name, info in COMMANDS.items():
        if name not in full:
            sub.add_parser(name, parents=[common], help=info.help)
            continue
        module = command_module(name)
        description = module.DESCRIPTION or None  # "" would print an empty paragraph
        module.add_arguments(
            sub.add_parser(name, parents=[common], help=info.help, description=description)
        )
    return parser


def _command_name(argv: Sequence[str]) -> str | None:
    """The first word of ``argv`` that is neither a global option nor its value."""
    words = iter(argv)
    for word in words:
        if not word.startswith("-") or word == "-":
            return word
        if "=" not in word and any(len(word) > 2 and o.startswith(word) for o in _VALUED):
            next(words, None)  # its value (argparse accepts unambiguous abbreviations)
    return None


def parse(argv: Sequence[str]) -> Arguments:
    """Read ``argv`` with argparse, importing only the module of the command it names;
    raise :class:`UsageError` (or SystemExit, for ``--help`` and ``--version``)."""
    name = _command_name(argv)
    parser = build_parser([name] if name in COMMANDS else [])
    args: Arguments
    args, unknown = parser.parse_known_args(argv)
    if args.command != name:  # argv fooled the scan: let the full parser decide
        parser = build_parser()
        args, unknown = parser.parse_known_args(argv)
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    return args
