"""``capkeeper validate [--json]``: check the state and the trust of every declared file."""

from __future__ import annotations

import argparse
import errno
from typing import TYPE_CHECKING, TextIO

from capkeeper.commands import COMMANDS, Arguments
from capkeeper.commands._output import emit
from capkeeper.errors import FileAccessError, printable
from capkeeper.exit_codes import ExitStatus
from capkeeper.files import NO_XATTR, observe
from capkeeper.kernel import cap_last_cap
from capkeeper.model import Entry
from capkeeper.state import load_state
from capkeeper.trust import FLOOD_HINT, assess, exposed_directory, flood_warning

if TYPE_CHECKING:
    from capkeeper.settings import Settings

HELP = COMMANDS["validate"].help
DESCRIPTION = ""  # no paragraph beyond HELP


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="JSON lines on stdout")


def run(args: Arguments, settings: Settings, out: TextIO) -> ExitStatus:
    """One line per problem, warning or note; FAILED when there is a problem."""
    state = load_state(settings.state)
    problems = 0

    def report(where: str, kind: str, message: str, rule: str | None = None) -> None:
        record = {"entry": where, "kind": kind, "message": message}
        if rule:
            record["rule"] = rule
        prefix = f"{kind}: " if kind in ("note", "warning") else ""
        emit(out, args.json, record, f"{where}: {prefix}{message}")

    same_file: dict[tuple[int, int], list[Entry]] = {}
    for entry in state.entries:
        where = f"{entry.source} ({entry.path})"
        try:
            observation = observe(entry.path, hash=entry.sha256 is not None)
        except FileAccessError as exc:
            if exc.errno == errno.ENOENT:
                report(where, "note", "not present yet (enforced when it appears)")
            else:
                problems += 1
                report(where, "problem", str(exc))
            continue
        same_file.setdefault((observation.dev, observation.ino), []).append(entry)
        if not observation.xattr_supported:
            problems += 1
            report(where, "problem", f"{observation.resolved}: {NO_XATTR}", "xattr")
        if entry.owner_uid != 0:
            report(
                where,
                "warning",
                f"owner {entry.owner} can rewrite this binary through a shared mmap without "
                f"losing its capabilities: that user effectively holds {entry.caps_text}",
            )
        refusals = assess(entry, observation, last_cap=cap_last_cap())
        for refusal in refusals:
            problems += 1
            report(where, "problem", str(refusal), refusal.rule)
        exposed = exposed_directory(observation)
        if exposed is not None and not any(r.rule.startswith("directory") for r in refusals):
            report(where, "warning", f"{flood_warning(exposed)} ({FLOOD_HINT})", "flood")
    # Two declared paths naming one file (a hard link, a symlink) with different
    # capabilities would be restored back and forth forever.
    for aliases in same_file.values():
        if len({entry.caps for entry in aliases}) > 1:
            problems += 1
            first, *others = aliases
            names = ", ".join(f"{e.path} ({e.caps_text})" for e in others)
            report(
                f"{first.source} ({first.path})",
                "problem",
                f"is the same file as {names} but declares {first.caps_text}; "
                "declare one set for it",
                "alias",
            )
    if not args.json:
        files = ", ".join(str(f) for f in state.files)
        verdict = "no problems" if not problems else f"{problems} problem(s)"
        out.write(printable(f"{len(state.entries)} declared binaries in {files}: {verdict}") + "\n")
    return ExitStatus.FAILED if problems else ExitStatus.OK
