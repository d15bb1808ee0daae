"""The ``capkeeper`` command line: parse, dispatch, and turn errors into exit statuses.

The commands live in :mod:`capkeeper.commands`; this module imports only the one
that runs (found in argv before parsing), so a one-shot ``apply`` does not pay
for ``audit``, ``doctor`` or the daemon. :func:`main` is the only place that maps
an exception to an :class:`ExitStatus`.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Iterable, Sequence
from types import ModuleType
from typing import Any, NoReturn, TextIO

from capkeeper.commands import COMMANDS
from capkeeper.errors import (
    CapkeeperError,
    SettingsError,
    StateError,
    UsageError,
    printable,
)
from capkeeper.exit_codes import ExitStatus
from capkeeper.log import LEVELS, configure

__all__ = ["COMMANDS", "ExitStatus", "build_parser", "main", "parse_args"]

# The global options that take a value: skipped when looking for the command name.
_VALUED = ("--state", "--log-format", "--log-level")
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


def _common(parser: argparse.ArgumentParser, *, suppress: bool) -> None:
    default = argparse.SUPPRESS if suppress else None
    parser.add_argument("--state", metavar="FILE", default=default, help="main state file")
    parser.add_argument(
        "--log-format", choices=("auto", "console", "json", "journal"), default=default
    )
    parser.add_argument("--log-level", choices=LEVELS, default=default)
    parser.add_argument(
        "--debug", action="store_true", default=default, help="show tracebacks and debug logs"
    )


def command_module(name: str) -> ModuleType:
    """The module of command ``name`` (imported now: only the command that runs pays)."""
    return importlib.import_module(COMMANDS[name].module)


def build_parser(commands: Iterable[str] | None = None) -> argparse.ArgumentParser:
    """The parser of every command; with ``commands``, only those get their options
    (the others are listed by name and summary, and their modules are not imported)."""
    full = set(COMMANDS if commands is None else commands)
    parser = _Parser(
        prog="capkeeper",
        description="Keep declared file capabilities on binaries across deploys.",
    )
    parser.add_argument("--version", action=_Version, help="show the version and exit")
    _common(parser, suppress=False)
    common = _Parser(add_help=False)
    _common(common, suppress=True)
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


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """Parse ``argv``, importing only the module of the command it names."""
    name = _command_name(argv)
    parser = build_parser([name] if name in COMMANDS else [])
    args, unknown = parser.parse_known_args(argv)
    if args.command != name:  # argv fooled the scan: let the full parser decide
        return build_parser().parse_args(argv)
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    return args


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
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
