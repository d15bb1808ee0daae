"""The walk options shared by ``capkeeper audit`` and ``capkeeper adopt --from-audit``."""

from __future__ import annotations

import argparse
from typing import TextIO

from capkeeper.commands import Arguments
from capkeeper.errors import printable
from capkeeper.scan import WalkOptions, WalkResult, default_jobs

__all__ = ["add_walk_arguments", "report_walk_problems", "walk_options"]


def _jobs(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive number, not {text!r}")
    return value


def add_walk_arguments(parser: argparse.ArgumentParser) -> None:
    """The options choosing what the walk enters (``audit`` and ``adopt --from-audit``)."""
    parser.add_argument(
        "-x", "--one-file-system", action="store_true", help="do not cross into other mounts"
    )
    parser.add_argument(
        "--include-fs",
        action="append",
        metavar="TYPE",
        help="also walk mounts of this type, e.g. nfs4 or sysfs (repeatable or comma-separated; "
        "pseudo and network file systems are skipped by default)",
    )
    parser.add_argument(
        "-j", "--jobs", type=_jobs, metavar="N", help="worker processes (default: CPUs, at most 4)"
    )


def walk_options(args: Arguments) -> WalkOptions:
    """The walk options of the ``audit`` and ``adopt --from-audit`` command lines."""
    include = frozenset(
        part.strip() for value in (args.include_fs or ()) for part in value.split(",") if part
    )
    jobs = args.jobs if args.jobs is not None else default_jobs()
    return WalkOptions(one_file_system=args.one_file_system, include_fs=include, jobs=jobs)


def report_walk_problems(result: WalkResult, err: TextIO) -> None:
    """Print what the walk could not read on stderr."""
    for error in result.errors:
        err.write(f"capkeeper: audit: {printable(error.path)}: {printable(error.message)}\n")
