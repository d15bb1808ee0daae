"""The ``capkeeper`` command line: read, dispatch, and turn errors into exit statuses.

The commands live in :mod:`capkeeper.commands`; this module imports only the one
that runs, so a one-shot ``apply`` does not pay for ``audit``, ``doctor`` or the
daemon. A plain command line of a command that declares its arguments (``apply``,
``check``: what ``ExecStartPre=`` runs) is read here without argparse
(:func:`quick_args`); any other goes to argparse (:mod:`capkeeper.parser`).
:func:`main` is the only place that maps an exception to an :class:`ExitStatus`.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, TextIO

from capkeeper.commands import COMMANDS, GLOBAL_ARGUMENTS, Argument, Arguments, command_module
from capkeeper.errors import (
    CapkeeperError,
    SettingsError,
    StateError,
    UsageError,
    printable,
)
from capkeeper.exit_codes import ExitStatus
from capkeeper.log import configure

if TYPE_CHECKING:
    import argparse

__all__ = [
    "COMMANDS",
    "ExitStatus",
    "build_parser",
    "command_module",
    "main",
    "parse_args",
    "quick_args",
]

# The settings an option may override (Settings field names; argparse dests).
_OVERRIDES = (
    "log_format",
    "log_level",
    "rescan_interval",
    "settle_time",
    "status_file",
    "metrics_file",
    "cache_directory",
)
# Errors a user can fix, and their exit status; any other CapkeeperError is FAILED.
_USER_ERRORS: tuple[tuple[type[CapkeeperError], ExitStatus], ...] = (
    (UsageError, ExitStatus.USAGE),
    (StateError, ExitStatus.CONFIG),
    (SettingsError, ExitStatus.CONFIG),
)
_GLOBAL = {argument.name: argument for argument in GLOBAL_ARGUMENTS}
_GLOBAL_DESTS = tuple(argument.dest for argument in GLOBAL_ARGUMENTS)


def build_parser(commands: Iterable[str] | None = None) -> argparse.ArgumentParser:
    """argparse's parser of every command, or of ``commands`` (:mod:`capkeeper.parser`)."""
    from capkeeper.parser import build_parser as build  # noqa: PLC0415 - argparse

    return build(commands)


def _option(
    argv: Sequence[str], at: int, known: dict[str, Argument], values: dict[str, object]
) -> int:
    """Take the option at ``argv[at]`` into ``values``; the index after it, or -1 when
    argparse must read this command line (an unknown option, a value that is missing,
    not one of its choices, or one argparse could take for an option). The last of
    a repeated option counts, as with argparse."""
    name, equals, value = argv[at].partition("=")
    argument = known.get(name)
    if argument is None:
        return -1
    if argument.kind == "flag":
        values[argument.dest] = True
        return -1 if equals else at + 1
    if equals and value == "--":  # argparse 3.11 reads "--opt=--" as an empty list
        return -1
    if not equals:
        at += 1
        if at == len(argv) or argv[at].startswith("-"):
            return -1
        value = argv[at]
    if argument.choices is not None and value not in argument.choices:
        return -1
    values[argument.dest] = value
    return at + 1


def quick_args(argv: Sequence[str]) -> Arguments | None:
    """``argv`` read as argparse reads it, when it is a plain command line of a command
    that declares its arguments (``ARGUMENTS``, at most one of them positional); None
    for any other, which argparse reads (and explains, when it is a mistake).

    Plain: global options (:data:`GLOBAL_ARGUMENTS`) before the command, its own and
    the global ones after it, each spelt whole, each value one that argparse cannot
    take for an option; the positionals in one run; no ``-h``, ``--version`` or ``--``.
    argparse is about a tenth of what an in-sync one-shot costs an ``ExecStartPre=``.
    ``tests/test_cli.py`` compares the two readers.
    """
    given: dict[str, object] = {}
    at = 0
    while at < len(argv) and argv[at].startswith("-"):
        at = _option(argv, at, _GLOBAL, given)
        if at < 0:
            return None
    if at == len(argv) or argv[at] not in COMMANDS:
        return None
    command = argv[at]
    arguments: tuple[Argument, ...] | None = getattr(command_module(command), "ARGUMENTS", None)
    if arguments is None:
        return None
    known = _GLOBAL | {a.name: a for a in arguments if a.kind != "words"}
    words = next((a for a in arguments if a.kind == "words"), None)
    positionals: list[str] = []
    run = "before"  # argparse takes the positionals in the first run of them only
    at += 1
    while at < len(argv):
        if argv[at].startswith("-"):
            at = _option(argv, at, known, given)
            if at < 0:
                return None
            run = "after" if run == "in" else run
        elif words is None or run == "after":
            return None
        else:
            run = "in"
            positionals.append(argv[at])
            at += 1
    # argparse's defaults: None for a global option (and a value), False for a flag.
    values: dict[str, object] = dict.fromkeys(_GLOBAL_DESTS)
    for argument in arguments:
        values[argument.dest] = {"flag": False, "words": positionals}.get(argument.kind)
    return Arguments(command=command, **(values | given))


def parse_args(argv: Sequence[str]) -> Arguments:
    """Read ``argv``: quickly when it is plain (:func:`quick_args`), else with argparse,
    importing only the module of the command it names."""
    quick = quick_args(argv)
    if quick is not None:
        return quick
    from capkeeper.parser import parse  # noqa: PLC0415 - argparse, only when needed

    return parse(argv)


def _overrides(args: Arguments) -> dict[str, Any]:
    """The settings given on the command line, by Settings field name."""
    state = getattr(args, "state", None)
    if state == "":  # not "the default": an unset variable in a unit file expands to ""
        raise UsageError("--state: empty path (name the state file)")
    overrides: dict[str, Any] = {} if state is None else {"state": state}
    for key in _OVERRIDES:
        value = getattr(args, key, None)
        if value is not None:
            overrides[key] = value
    return overrides


def _report(exc: CapkeeperError, err: TextIO) -> None:
    if isinstance(exc, StateError):
        err.write(f"capkeeper: {exc.message}\n")
        return
    err.write(f"capkeeper: error: {printable(str(exc))}\n")


def main(argv: Sequence[str] | None = None, *, out: TextIO | None = None) -> int:
    """Run capkeeper; return the exit status (never raises for user mistakes)."""
    stdout = out if out is not None else sys.stdout
    stderr = sys.stderr
    debug = False
    try:
        words = sys.argv[1:] if argv is None else argv
        args = parse_args(words)
        if args.command != "watch" and "watch" in words:
            # capkeeper.__main__ held them back for the daemon: not for this command.
            import signal  # noqa: PLC0415 - only then

            signal.pthread_sigmask(
                signal.SIG_UNBLOCK, (signal.SIGHUP, signal.SIGTERM, signal.SIGINT)
            )
        debug = bool(getattr(args, "debug", False))
        from capkeeper.settings import load_settings  # noqa: PLC0415 - after --help/--version

        settings = load_settings(_overrides(args), isolate=args.command == "watch")
        level = "debug" if debug else (settings.log_level or "info")
        concrete = configure(settings.log_format, level)
        # One-shot commands report on stdout; their events also go to the log when
        # it is the journal (ExecStartPre= mode) or when a log level was asked for.
        args.log_events = concrete == "journal" or settings.log_level is not None or debug
        run = command_module(args.command).run
        return int(run(args, settings, stdout))
    except SystemExit as exc:  # --help and --version
        return exc.code if isinstance(exc.code, int) else int(ExitStatus.USAGE)
    except CapkeeperError as exc:
        status = next((s for kind, s in _USER_ERRORS if isinstance(exc, kind)), ExitStatus.FAILED)
        if debug and status is ExitStatus.FAILED:
            raise
        _report(exc, stderr)
        return int(status)
    except KeyboardInterrupt:
        stderr.write("capkeeper: interrupted\n")
        return int(ExitStatus.INTERRUPTED)
    except OSError as exc:
        if isinstance(exc, BrokenPipeError):
            # Our reader went away (e.g. "| head"); silence the interpreter's flush error.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            return int(ExitStatus.FAILED)
        if debug:
            raise
        stderr.write(f"capkeeper: error: {printable(str(exc))}\n")
        return int(ExitStatus.FAILED)
    except Exception as exc:
        if debug:
            raise
        stderr.write(
            f"capkeeper: internal error: {exc.__class__.__name__}: {printable(str(exc))} "
            "(run with --debug for a traceback, and please report it)\n"
        )
        return int(ExitStatus.FAILED)
