"""``apply`` and ``check``: reconcile the declared binaries and report one line each."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TextIO

from capkeeper.commands import Arguments
from capkeeper.commands._output import emit
from capkeeper.enforce import reconcile
from capkeeper.exit_codes import ExitStatus
from capkeeper.log import get_logger
from capkeeper.reconcile import Outcome, Status, log_outcome, tampering
from capkeeper.state import State


def outcome_line(outcome: Outcome) -> str:
    """``status  path  details``: what one entry was found to be (and what was done)."""
    entry = outcome.entry
    label = f"{outcome.status:<9} {entry.path}"
    if outcome.status is Status.IN_SYNC:
        return f"{label}  {outcome.expected}"
    if outcome.status in (Status.RESTORED, Status.DRIFT):
        suspect = tampering(outcome.status, outcome.extra)
        extra = " (possible tampering: extra capabilities)" if suspect else ""
        return f"{label}  found {outcome.found}, expected {outcome.expected}{extra}"
    return f"{label}  {outcome.reason}"


def summary(outcomes: Sequence[Outcome]) -> str:
    """``N declared: n1 status1, n2 status2``."""
    counts: dict[Status, int] = {}
    for outcome in outcomes:
        counts[outcome.status] = counts.get(outcome.status, 0) + 1
    parts = [f"{n} {status}" for status, n in counts.items()]
    return f"{len(outcomes)} declared: " + (", ".join(parts) if parts else "nothing to do")


def run_entries(args: Arguments, state: State, out: TextIO, *, write: bool) -> ExitStatus:
    """Reconcile the declared binaries (those in ``args.paths``, or all), one line each.

    FAILED when any was refused, missing or could not be written; else DRIFT when
    any differs (``check``); else OK.
    """
    entries = state.select(args.paths) if args.paths else state.entries
    logger = get_logger()
    outcomes = []
    for entry in entries:
        outcome = reconcile(entry, write=write)
        outcomes.append(outcome)
        if args.log_events:
            log_outcome(logger, outcome, cause="apply" if write else "check")
        emit(out, args.json, outcome.fields(), outcome_line(outcome))
    if not args.json:
        out.write(summary(outcomes) + "\n")
    if any(o.status in (Status.REFUSED, Status.FAILED, Status.MISSING) for o in outcomes):
        return ExitStatus.FAILED
    if any(o.status is Status.DRIFT for o in outcomes):
        return ExitStatus.DRIFT
    return ExitStatus.OK
