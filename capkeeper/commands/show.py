"""``capkeeper show [-v] [--json] PATH...``: print capabilities as ``getcap`` does."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, TextIO

from capkeeper.capabilities import decode_revision, format_text
from capkeeper.commands import COMMANDS, Arguments
from capkeeper.commands._output import emit
from capkeeper.errors import CapkeeperError, printable
from capkeeper.exit_codes import ExitStatus
from capkeeper.files import read_path_caps

if TYPE_CHECKING:
    from capkeeper.settings import Settings

HELP = COMMANDS["show"].help
DESCRIPTION = ""  # no paragraph beyond HELP


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("paths", nargs="+", metavar="PATH")
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="add xattr revision and rootid"
    )
    parser.add_argument("--json", action="store_true", help="JSON lines on stdout")


def run(args: Arguments, settings: Settings, out: TextIO) -> ExitStatus:
    """One line per file with capabilities; FAILED when some file could not be read."""
    status = ExitStatus.OK
    for path in args.paths:
        try:
            caps, raw = read_path_caps(path)
        except CapkeeperError as exc:
            sys.stderr.write(f"capkeeper: {printable(str(exc))}\n")
            status = ExitStatus.FAILED
            continue
        if caps is None or raw is None:
            if args.json:
                emit(out, True, {"path": path, "caps": None}, "")
            elif args.verbose:
                out.write(f"{printable(path)} (no capabilities)\n")
            continue
        text = format_text(caps)
        revision = int(decode_revision(raw))
        record = {
            "path": path,
            "caps": text,
            "revision": revision,
            "rootid": caps.rootid,
            "effective": caps.effective,
            "permitted": caps.permitted,
            "inheritable": caps.inheritable,
        }
        human = f"{path} {text}"
        if args.verbose:
            human += f" [v{revision}" + (f" rootid={caps.rootid}]" if revision == 3 else "]")
        emit(out, args.json, record, human)
    return status
