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
import json
import os
import posixpath
import pwd
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, TextIO

from capkeeper.audit import (
    StateIndex,
    Verdict,
    add_walk_arguments,
    audit,
    index_state,
    load_state_or_empty,
    report_walk_problems,
    walk_options,
)
from capkeeper.capabilities import CapSet, format_text
from capkeeper.errors import CapkeeperError, needs_escape, printable
from capkeeper.exit_codes import ExitStatus
from capkeeper.files import observe
from capkeeper.kernel import cap_last_cap
from capkeeper.model import Entry, Kind, Observation
from capkeeper.trust import Refusal, assess

if TYPE_CHECKING:
    from capkeeper.settings import Settings

__all__ = ["Adoption", "adopt_observation", "cmd_adopt", "render", "toml_string"]

HELP = "print state entries for files that already carry capabilities"
DESCRIPTION = (
    "Print [[binary]] tables (TOML) declaring the capabilities the given files carry, "
    "ready to be appended to the state. --from-audit ROOT adopts every unmanaged file "
    "with capabilities below ROOT; --pin adds a sha256 pin of the current content. "
    "Files the trust policy would refuse are printed commented out, with the reasons. "
    "Exit status: 0 when every file was adopted (or already declared), 2 when some "
    "could not be."
)


@dataclass(frozen=True)
class Adoption:
    """One file to declare, with the trust policy's objections (if any)."""

    path: str
    caps: CapSet
    owner: str = "root"
    sha256: str | None = None
    refusals: tuple[Refusal, ...] = ()

    @property
    def trusted(self) -> bool:
        return not self.refusals


def toml_string(text: str) -> str:
    """``text`` as a TOML basic string (JSON's escapes are valid TOML)."""
    return json.dumps(text, ensure_ascii=False)


def _owner_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def adopt_observation(path: str, observation: Observation, *, last_cap: int) -> Adoption | str:
    """The adoption of an observed file, or why it cannot be declared."""
    if observation.kind is Kind.NOT_REGULAR:
        return "not a regular file"
    if observation.caps_problem is not None:
        return f"its capabilities cannot be read ({observation.caps_problem})"
    caps = observation.caps
    if caps is None:
        return "carries no capabilities"
    if caps.rootid:
        return (
            f"its capabilities belong to the root of a user namespace (rootid {caps.rootid}), "
            "which the state cannot declare"
        )
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return "its path is not valid UTF-8, which a TOML state cannot hold"
    if needs_escape(path):
        return "its path contains control or format characters, which the state refuses"
    owner = "root" if observation.uid == 0 else _owner_name(observation.uid)
    entry = Entry(
        path=path,
        caps=caps,
        caps_text=format_text(caps, last_cap=last_cap),
        owner=owner,
        owner_uid=observation.uid,
        sha256=observation.sha256,
        allow_inheritable=bool(caps.inheritable),
    )
    refusals = assess(entry, observation, last_cap=last_cap)
    if observation.uid != 0:
        # The owner can rewrite the file through a shared mmap, which keeps its
        # capabilities: declaring it would hand that user these capabilities for
        # any code. That is a decision for a person, not for a generated state.
        refusals += (
            Refusal(
                "owner",
                f"{path} is owned by {owner}, who could change its content without losing "
                "the capabilities",
                f"chown root {path}, or declare owner = {toml_string(owner)} knowingly",
            ),
        )
    return Adoption(path, caps, owner, observation.sha256, refusals)


def _table(adoption: Adoption, *, last_cap: int) -> list[str]:
    lines = [
        "[[binary]]",
        f"path = {toml_string(adoption.path)}",
        f"caps = {toml_string(format_text(adoption.caps, last_cap=last_cap))}",
    ]
    if adoption.sha256 is not None:
        lines.append(f"sha256 = {toml_string(adoption.sha256)}")
    if adoption.owner != "root":
        lines.append(f"owner = {toml_string(adoption.owner)}")
    if adoption.caps.inheritable:
        lines.append("allow_inheritable = true")
    return lines


def render(adoptions: Iterable[Adoption], *, last_cap: int) -> str:
    """The TOML text for ``adoptions``; refused ones commented out with their reasons."""
    chunks = []
    for adoption in adoptions:
        table = _table(adoption, last_cap=last_cap)
        if adoption.trusted:
            chunks.append("\n".join(table))
            continue
        reasons = [f"# capkeeper would refuse this file: {r}" for r in adoption.refusals]
        chunks.append("\n".join([*reasons, *(f"# {line}" for line in table)]))
    return "\n\n".join(chunks) + "\n" if chunks else ""


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


def cmd_adopt(args: argparse.Namespace, settings: Settings, out: TextIO) -> ExitStatus:
    """``capkeeper adopt PATH... | --from-audit ROOT``."""
    from capkeeper.errors import UsageError  # noqa: PLC0415

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
        adoption = adopt_observation(path, observation, last_cap=limit)
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
