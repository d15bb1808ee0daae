"""``capkeeper adopt``: state entries for files that already carry capabilities.

A host set up by hand with ``setcap`` is brought under management in one step:
``capkeeper adopt --from-audit / > /etc/capkeeper/state.d/adopted.toml``. Each
adopted file gets a ``[[binary]]`` table declaring exactly what it carries, so
that ``capkeeper check`` on the result reports it in sync. A file the trust
policy would refuse (a script, setuid, replaceable by non-root) is printed as
a commented-out table with the reasons, so the output stays a state that
checks clean while the user sees what to fix.
"""

from __future__ import annotations

import argparse
import os
import posixpath
import pwd
import sys
from typing import TYPE_CHECKING, TextIO

from capkeeper.classify import Adoption, StateIndex, Verdict, adopt_observation, render
from capkeeper.commands import COMMANDS, Arguments
from capkeeper.commands._walk import add_walk_arguments, report_walk_problems, walk_options
from capkeeper.errors import CapkeeperError, UsageError, printable
from capkeeper.exit_codes import ExitStatus
from capkeeper.files import observe
from capkeeper.inventory import audit, index_state
from capkeeper.kernel import cap_last_cap
from capkeeper.model import Entry, Observation
from capkeeper.state import load_state_or_empty

if TYPE_CHECKING:
    from capkeeper.settings import Settings

__all__ = ["DESCRIPTION", "HELP", "add_arguments", "run"]

HELP = COMMANDS["adopt"].help
DESCRIPTION = (
    "Print [[binary]] tables (TOML) declaring the capabilities the given files carry, "
    "ready to be appended to the state. --from-audit ROOT adopts every unmanaged file "
    "with capabilities below ROOT; --pin adds a sha256 pin of the current content. "
    "Files the trust policy would refuse are printed commented out, with the reasons. "
    f"Exit status: {ExitStatus.OK:d} when every file was adopted (or already declared), "
    f"{ExitStatus.FAILED:d} when some could not be."
)


def _owner_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``adopt`` command line."""
    parser.add_argument("paths", nargs="*", metavar="PATH", help="files to declare")
    parser.add_argument(
        "--from-audit",
        action="append",
        metavar="ROOT",
        help="adopt every unmanaged file with capabilities below ROOT (repeatable)",
    )
    parser.add_argument("--pin", action="store_true", help="add sha256 pins of the content")
    add_walk_arguments(parser)


def _declared(observation: Observation, index: StateIndex) -> Entry | None:
    return index.by_path.get(observation.resolved) or index.by_inode.get(
        (observation.dev, observation.ino)
    )


def run(args: Arguments, settings: Settings, out: TextIO) -> ExitStatus:
    """``capkeeper adopt PATH... | --from-audit ROOT``."""
    if not args.paths and not args.from_audit:
        raise UsageError("name the files to adopt, or use --from-audit ROOT")
    err = sys.stderr
    state, _ = load_state_or_empty(settings.state)
    index = index_state(state)
    limit = cap_last_cap()
    paths = [posixpath.normpath(os.path.abspath(p)) for p in args.paths]
    failed = False
    if args.from_audit:
        report = audit(args.from_audit, state, walk_options(args), progress=err)
        report_walk_problems(report.walk, err)
        failed = bool(report.walk.errors)
        paths += sorted(f.path for f in report.findings if f.verdict is Verdict.UNMANAGED)
    adoptions: list[Adoption] = []
    for path in dict.fromkeys(paths):
        try:
            observation = observe(path, hash=args.pin)
        except CapkeeperError as exc:
            err.write(f"capkeeper: adopt: {printable(str(exc))}\n")
            failed = True
            continue
        declared = _declared(observation, index)
        if declared is not None:
            err.write(
                f"capkeeper: adopt: {printable(path)}: already declared in {declared.source}\n"
            )
            continue
        adoption = adopt_observation(path, observation, last_cap=limit, owner_name=_owner_name)
        if isinstance(adoption, str):
            err.write(f"capkeeper: adopt: {printable(path)}: not adopted: {adoption}\n")
            failed = True
            continue
        if not adoption.trusted:
            reasons = "; ".join(str(r) for r in adoption.refusals)
            err.write(
                f"capkeeper: adopt: {printable(path)}: commented out, the trust policy "
                f"refuses it: {reasons}\n"
            )
            failed = True
        adoptions.append(adoption)
    out.write(render(adoptions, last_cap=limit))
    return ExitStatus.FAILED if failed else ExitStatus.OK
