"""``capkeeper apply [PATH...] [--unit UNIT]``: make declared binaries carry exactly their caps.

The one-shot of ``ExecStartPre=``: it imports only what reconciling needs
(``doctor`` only with ``--unit``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, TextIO

from capkeeper.cache import Cache
from capkeeper.commands import COMMANDS, Argument, Arguments, add_all
from capkeeper.commands._entries import run_entries
from capkeeper.exit_codes import ExitStatus
from capkeeper.state import load_state

if TYPE_CHECKING:
    import argparse

    from capkeeper.settings import Settings

HELP = COMMANDS["apply"].help
DESCRIPTION = ""  # no paragraph beyond HELP
UNIT_HELP = (
    "first check that the declared capabilities can work in this systemd unit "
    "(the checks of 'capkeeper doctor --unit'); problems are printed as warnings "
    "and do not change the exit status"
)


# Declared, not only added to argparse: a plain 'capkeeper apply' command line is read
# without it (capkeeper.cli.quick_args), a few ms of every ExecStartPre=.
ARGUMENTS = (
    Argument("paths", "only these declared binaries", metavar="PATH", kind="words"),
    Argument("--json", "JSON lines on stdout", kind="flag"),
    Argument("--unit", UNIT_HELP, metavar="UNIT"),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_all(parser, ARGUMENTS)


def run(args: Arguments, settings: Settings, out: TextIO) -> ExitStatus:
    """Restore what drifted; exit FAILED when any binary was refused, missing or not written."""
    state = load_state(settings.state, cache=Cache(settings.cache_directory))
    if args.unit:  # ExecStartPre= mode: warnings only, the exit status stays apply's
        from capkeeper.diagnose import preflight  # noqa: PLC0415 - only --unit needs it

        preflight(args.unit, state, args.paths, out, log_events=args.log_events)
    return run_entries(args, state, out, write=True)
