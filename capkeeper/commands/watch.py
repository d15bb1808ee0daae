"""``capkeeper watch``: run the daemon that restores capabilities as deploys drop them.

Its options reach the daemon through the settings: the CLI merges them once
(:func:`capkeeper.settings.load_settings`), so :func:`capkeeper.daemon.watch`
gets the final values.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, TextIO

from capkeeper.commands import COMMANDS, Arguments
from capkeeper.exit_codes import ExitStatus
from capkeeper.settings import option_type

if TYPE_CHECKING:
    from capkeeper.settings import Settings

HELP = COMMANDS["watch"].help
DESCRIPTION = ""  # no paragraph beyond HELP


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--rescan-interval",
        type=option_type("rescan_interval"),
        metavar="SECONDS",
        help="seconds between full rescans (default 300; catches changes inotify cannot see)",
    )
    parser.add_argument(
        "--settle-time",
        type=option_type("settle_time"),
        metavar="SECONDS",
        help="how long a write may pause before the file is checked anyway (default 0.25)",
    )
    parser.add_argument("--status-file", metavar="FILE", help="default /run/capkeeper/status.json")
    parser.add_argument(
        "--metrics-file", metavar="FILE", help="also write a Prometheus textfile (node_exporter)"
    )
    parser.add_argument(
        "--cache-directory",
        type=_cache_directory,
        metavar="DIR",
        help="default /var/cache/capkeeper (the unit's CacheDirectory=); empty: no cache",
    )


def _cache_directory(text: str) -> str:
    """``--cache-directory``, checked by its setting's rule and kept as given: an empty
    value (no cache) must still reach the settings as an option."""
    option_type("cache_directory")(text)
    return text


def run(args: Arguments, settings: Settings, out: TextIO) -> ExitStatus:
    """Run the daemon until it is stopped; its exit status."""
    from capkeeper.daemon import watch  # noqa: PLC0415 - only the daemon needs pyinotify

    return ExitStatus(watch(settings))
