"""``capkeeper check [PATH...]``: report drift without changing any file."""

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

HELP = COMMANDS["check"].help
DESCRIPTION = ""  # no paragraph beyond HELP


# Declared, as apply's: a plain command line is read without argparse.
ARGUMENTS = (
    Argument("paths", metavar="PATH", kind="words"),
    Argument("--json", "JSON lines on stdout", kind="flag"),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_all(parser, ARGUMENTS)


def run(args: Arguments, settings: Settings, out: TextIO) -> ExitStatus:
    """DRIFT when any declared binary differs, FAILED when any is refused or missing."""
    state = load_state(settings.state, cache=Cache(settings.cache_directory))
    return run_entries(args, state, out, write=False)
