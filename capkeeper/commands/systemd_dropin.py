"""``capkeeper systemd-dropin [--output FILE|-] [--check]``: the service's ReadWritePaths=."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from capkeeper.commands import COMMANDS, Arguments
from capkeeper.errors import printable
from capkeeper.exit_codes import ExitStatus
from capkeeper.state import load_state
from capkeeper.systemd import (
    DROPIN,
    HIDDEN_FROM_SERVICE,
    dropin_refusals,
    dropin_text,
    write_atomically,
)

if TYPE_CHECKING:
    from capkeeper.settings import Settings

HELP = COMMANDS["systemd-dropin"].help
DESCRIPTION = ""  # no paragraph beyond HELP


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", metavar="FILE", help=f"default {DROPIN}; '-' for stdout")
    parser.add_argument(
        "--check",
        action="store_true",
        help=f"exit {ExitStatus.DRIFT:d} when the drop-in is missing or out of date",
    )


def run(args: Arguments, settings: Settings, out: TextIO) -> ExitStatus:
    """Write the drop-in (or with ``--check`` compare it: DRIFT when out of date)."""
    state = load_state(settings.state)
    refusals = dropin_refusals(state)
    if refusals:  # nothing is written, and --check cannot say "up to date" either
        for refusal in refusals:
            sys.stderr.write(f"capkeeper: error: {printable(refusal)}\n")
        return ExitStatus.FAILED
    text = dropin_text(state)
    for entry in state.entries:
        if entry.path.startswith(HIDDEN_FROM_SERVICE):
            sys.stderr.write(
                f"capkeeper: warning: {printable(entry.path)} is hidden from the service "
                "(PrivateTmp=/ProtectHome= in capkeeper.service); keep managed binaries "
                "elsewhere\n"
            )
    if args.output == "-":
        out.write(text)
        return ExitStatus.OK
    target = Path(args.output) if args.output else DROPIN
    current = target.read_text() if target.is_file() else None
    if args.check:
        verdict = "up to date" if current == text else "out of date"
        out.write(f"{printable(str(target))}: {verdict}\n")
        return ExitStatus.OK if current == text else ExitStatus.DRIFT
    if current == text:
        out.write(f"{printable(str(target))}: already up to date\n")
        return ExitStatus.OK
    write_atomically(target, text)
    out.write(
        f"wrote {printable(str(target))}; now run: systemctl daemon-reload && "
        "systemctl restart capkeeper\n"
    )
    return ExitStatus.OK
