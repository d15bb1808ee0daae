"""``capkeeper check [PATH...]``: report drift without changing any file."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, TextIO

from capkeeper.cache import Cache
from capkeeper.commands import COMMANDS
from capkeeper.commands._entries import run_entries
from capkeeper.exit_codes import ExitStatus
from capkeeper.state import load_state

if TYPE_CHECKING:
    from capkeeper.settings import Settings

HELP = COMMANDS["check"].help
DESCRIPTION = ""  # no paragraph beyond HELP


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("paths", nargs="*", metavar="PATH")
    parser.add_argument("--json", action="store_true", help="JSON lines on stdout")


def run(args: argparse.Namespace, settings: Settings, out: TextIO) -> ExitStatus:
    """DRIFT when any declared binary differs, FAILED when any is refused or missing."""
    state = load_state(settings.state, cache=Cache(settings.cache_directory))
    return run_entries(args, state, out, write=False)
