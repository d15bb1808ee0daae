"""``capkeeper doctor``: explain why declared capabilities would not take effect.

The checks and their readers are :mod:`capkeeper.diagnose`; this is the command
line and the output (every path through :func:`capkeeper.errors.printable`).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING, TextIO

from capkeeper.commands import COMMANDS, Arguments
from capkeeper.diagnose import Severity, run_checks, targets, unit_properties
from capkeeper.errors import printable
from capkeeper.exit_codes import ExitStatus
from capkeeper.state import load_state, load_state_or_empty

if TYPE_CHECKING:
    from capkeeper.settings import Settings

__all__ = ["DESCRIPTION", "HELP", "add_arguments", "run"]

HELP = COMMANDS["doctor"].help
DESCRIPTION = (
    "For each declared binary (or each PATH; with --unit and no PATH, the binaries "
    "the unit's ExecStart= runs) check that its capabilities can take effect: the "
    "trust policy for a declared binary (what apply would refuse), the "
    "mount (nosuid, noexec, read-only, no xattr support), the file (script, "
    "interpreter, setuid), the declared set (inheritable, effective beyond a typical "
    "bounding set) and, with --unit, the unit (NoNewPrivileges=, "
    "CapabilityBoundingSet=, AmbientCapabilities=, User=). Each problem is printed "
    "with a fix. "
    f"Exit status: {ExitStatus.OK:d} no problems, {ExitStatus.DRIFT:d} problems, "
    f"{ExitStatus.FAILED:d} when something could not be checked."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``doctor`` command line."""
    parser.add_argument("paths", nargs="*", metavar="PATH", help="binaries to check")
    parser.add_argument("--unit", metavar="UNIT", help="also check the unit that runs them")
    parser.add_argument("--json", action="store_true", help="JSON lines on stdout")


def run(args: Arguments, settings: Settings, out: TextIO) -> ExitStatus:
    """``capkeeper doctor [PATH...] [--unit UNIT]``."""
    failures: list[str] = []
    unit = unit_properties(args.unit, failures)
    paths = list(args.paths) or (list(unit.exec_paths) if unit is not None else [])
    if args.unit and not paths and unit is not None:
        failures.append(f"unit {unit.name} has no ExecStart= binary to check; name the paths")
    if paths or args.unit:  # named binaries can be checked without a state
        state = load_state_or_empty(settings.state)[0]
    else:
        state = load_state(settings.state)
    diagnosis = run_checks(targets(state, paths) if paths or not args.unit else [], unit)
    diagnosis.failures += failures
    for failure in diagnosis.failures:
        sys.stderr.write(f"capkeeper: doctor: {printable(failure)}\n")
    for target, problems in diagnosis.results:
        for problem in problems:
            if args.json:
                out.write(json.dumps(problem.record()) + "\n")
            else:
                out.write(f"{printable(problem.line())}\n  fix: {printable(problem.fix)}\n")
        if not problems and not args.json:
            out.write(f"{printable(target.path)}: ok\n")
    if not args.json:
        problems = diagnosis.problems
        errors = sum(1 for p in problems if p.severity is Severity.ERROR)
        out.write(
            f"{len(diagnosis.results)} binaries checked: {errors} error(s), "
            f"{len(problems) - errors} warning(s)\n"
        )
    if diagnosis.failures:
        return ExitStatus.FAILED
    return ExitStatus.DRIFT if any(not p.advisory for p in diagnosis.problems) else ExitStatus.OK
