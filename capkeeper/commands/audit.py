"""``capkeeper audit``: every file on the host that carries capabilities, accounted for.

The walk is :mod:`capkeeper.scan`, the verdicts :mod:`capkeeper.classify`, the two
joined by :func:`capkeeper.inventory.audit`; this module is the command line and the
renderers: a table, JSON lines, or ``getcap -r`` lines. Every path printed goes
through :func:`capkeeper.errors.printable`, so one file is always one line.

Exit status: 0 clean (every file with capabilities is managed and in sync),
1 findings (anything unmanaged, drifted or refused), 2 when nothing was found
to report but the walk hit errors (an unreadable directory, a worker failure):
an incomplete walk never reads as clean, and findings outrank errors because
they need action either way; errors are always printed on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING, Any, TextIO

from capkeeper.capabilities import format_text
from capkeeper.classify import Verdict
from capkeeper.commands import COMMANDS, Arguments
from capkeeper.commands._walk import add_walk_arguments, report_walk_problems, walk_options
from capkeeper.errors import printable
from capkeeper.exit_codes import ExitStatus
from capkeeper.inventory import AuditReport, audit
from capkeeper.state import load_state_or_empty

if TYPE_CHECKING:
    from capkeeper.settings import Settings

__all__ = ["DESCRIPTION", "HELP", "add_arguments", "render_getcap", "render_table", "run"]

HELP = COMMANDS["audit"].help
DESCRIPTION = (
    "Walk local file systems (default /) for every file that carries "
    "security.capability and classify each against the state: in-sync, drifted, "
    "refused or unmanaged; unmanaged files are rated with their reasons. Pseudo and "
    "network file systems are skipped unless named with --include-fs; symlinks are "
    "never followed. "
    f"Exit status: {ExitStatus.OK:d} clean, {ExitStatus.DRIFT:d} findings (unmanaged, "
    f"drifted or refused), {ExitStatus.FAILED:d} errors (e.g. an unreadable directory) "
    "and nothing else to report."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``audit`` command line."""
    parser.add_argument("roots", nargs="*", metavar="ROOT", help="where to walk (default /)")
    output = parser.add_mutually_exclusive_group()
    output.add_argument(
        "--format",
        choices=("table", "json", "getcap"),
        default="table",
        help="table (default), JSON lines, or what 'getcap -r' prints (a name with control "
        "or format characters escaped, so one file is one line; getcap prints it raw)",
    )
    output.add_argument(
        "--json", dest="format", action="store_const", const="json", help="--format json"
    )
    add_walk_arguments(parser)


def run(args: Arguments, settings: Settings, out: TextIO) -> ExitStatus:
    """``capkeeper audit [ROOT...]``."""
    err = sys.stderr
    state, note = load_state_or_empty(settings.state)
    if note and args.format != "getcap":
        err.write(f"capkeeper: audit: {printable(note)}\n")
    report = audit(args.roots or ["/"], state, walk_options(args), progress=err)
    report_walk_problems(report.walk, err)
    if args.format == "getcap":
        for finding in report.findings:
            if finding.caps is None and finding.problem is not None:
                err.write(
                    f"Failed to get capabilities of file '{printable(finding.display)}' "
                    f"({finding.problem})\n"
                )
        out.writelines(line + "\n" for line in render_getcap(report))
    elif args.format == "json":
        for finding in report.findings:
            out.write(json.dumps(finding.record()) + "\n")
        for error in report.walk.errors:
            out.write(json.dumps({"type": "error", "path": error.path, "message": error.message}))
            out.write("\n")
        for skipped in report.walk.skipped:
            record = {"type": "skipped", "path": skipped.path, "fstype": skipped.fstype}
            out.write(json.dumps({**record, "reason": skipped.reason}) + "\n")
        out.write(json.dumps(_summary_record(report)) + "\n")
    else:
        out.writelines(line + "\n" for line in render_table(report))
        out.write(summary(report) + "\n")
    return _exit_status(report)


def _summary_record(report: AuditReport) -> dict[str, Any]:
    walked = report.walk
    return {
        "type": "summary",
        "files_with_capabilities": len(report.findings),
        **{str(v): report.count(v) for v in Verdict},
        "errors": len(walked.errors),
        "skipped_mounts": len(walked.skipped),
        "directories": walked.directories,
        "files": walked.files,
        "seconds": round(walked.seconds, 3),
    }


# -- output ---------------------------------------------------------------------------


def render_getcap(report: AuditReport) -> list[str]:
    """The lines ``getcap -r`` prints on stdout for the same tree (sorted by path).

    A name is printed as getcap prints it unless it holds a control or format
    character or an undecodable byte: then it is escaped (:func:`printable`),
    so one file is always one line. getcap itself writes such a name raw, and
    a newline in it reads as a second file.
    """
    return [
        f"{printable(f.display)} {format_text(f.caps)}"
        for f in sorted(report.findings, key=lambda f: f.path)
        if f.caps is not None
    ]


def render_table(report: AuditReport) -> list[str]:
    """A readable table: one line per finding, its reasons indented below it."""
    lines = []
    for finding in report.findings:
        level = str(finding.rating.level) if finding.rating is not None else "-"
        caps = finding.caps_text
        if finding.entry is not None and finding.verdict is not Verdict.IN_SYNC:
            caps += f" (declared {finding.entry.caps_text})"
        lines.append(
            f"{level:<9} {finding.verdict:<10} {printable(finding.path)}  {printable(caps)}"
        )
        reasons = list(finding.rating.reasons) if finding.rating is not None else []
        if finding.note:
            reasons.append(finding.note)
        lines.extend(f"{'':<20} - {printable(reason)}" for reason in reasons)
    return lines


def summary(report: AuditReport) -> str:
    """One line: what was found and how much was walked."""
    walked = report.walk
    counts = [f"{report.count(v)} {v}" for v in Verdict if report.count(v)] or [
        "nothing with capabilities"
    ]
    text = (
        f"{len(report.findings)} files: {', '.join(counts)}; walked {walked.directories} "
        f"directories, {walked.files} files in {walked.seconds:.2f}s"
    )
    if walked.errors:
        text += f"; {len(walked.errors)} error(s)"
    if walked.skipped:
        types = sorted({s.fstype for s in walked.skipped})
        text += f"; skipped {len(walked.skipped)} mount(s) ({', '.join(types)})"
    return printable(text)


def _exit_status(report: AuditReport) -> ExitStatus:
    if any(f.verdict.is_finding for f in report.findings):
        return ExitStatus.DRIFT
    if report.walk.errors:
        return ExitStatus.FAILED
    return ExitStatus.OK
