"""``capkeeper status [--json]``: show what the running daemon reports in its status file."""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING, TextIO

from capkeeper.commands import COMMANDS, Arguments
from capkeeper.errors import CapkeeperError, StatusFileError
from capkeeper.exit_codes import ExitStatus
from capkeeper.snapshot import parse_status, read_status
from capkeeper.snapshot import render as render_status

if TYPE_CHECKING:
    from capkeeper.settings import Settings

HELP = COMMANDS["status"].help
DESCRIPTION = ""  # no paragraph beyond HELP


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # Its value reaches run() as settings.status_file (the CLI's overrides).
    parser.add_argument("--status-file", metavar="FILE", help="default /run/capkeeper/status.json")
    parser.add_argument("--json", action="store_true", help="print the raw JSON snapshot")


def run(args: Arguments, settings: Settings, out: TextIO) -> ExitStatus:
    """Print the daemon's snapshot; FAILED when it reports itself unhealthy."""
    path = settings.status_file
    try:
        data = read_status(path)
        snapshot = parse_status(data)
    except FileNotFoundError:
        raise CapkeeperError(
            "no status file: the daemon is not running or writes it elsewhere",
            context=str(path),
            hint="systemctl status capkeeper; or pass --status-file",
        ) from None
    except OSError as exc:
        raise CapkeeperError(f"cannot read the status file: {exc}", context=str(path)) from exc
    except StatusFileError as exc:
        raise CapkeeperError(f"not a capkeeper status file: {exc}", context=str(path)) from None
    out.write(json.dumps(data, indent=1) + "\n" if args.json else render_status(snapshot))
    return ExitStatus.OK if snapshot.healthy else ExitStatus.FAILED
