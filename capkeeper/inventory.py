"""The audit operation: walk some roots, observe every file found with capabilities, and
classify each against the state.

:func:`audit` joins the walk (:mod:`capkeeper.scan`), the fd-pinned observation
(:mod:`capkeeper.files`) and the pure verdicts (:mod:`capkeeper.classify`);
``capkeeper audit`` renders its report and ``capkeeper adopt --from-audit``
declares its unmanaged findings.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TextIO

from capkeeper.classify import (
    Finding,
    StateIndex,
    Verdict,
    classify,
    classify_stripped,
    display_path,
    ordered,
)
from capkeeper.errors import CapkeeperError
from capkeeper.files import observe
from capkeeper.kernel import cap_last_cap
from capkeeper.model import Entry, Observation
from capkeeper.mounts import MountTable
from capkeeper.scan import WalkError, WalkOptions, WalkResult, decode_finding, walk
from capkeeper.state import State

__all__ = ["AuditReport", "audit", "index_state"]


def index_state(state: State, observe_entry: Callable[..., Observation] = observe) -> StateIndex:
    """Observe every declared file once (hashing pinned ones) through its declared path;
    entries whose file is missing are left out."""
    by_path: dict[str, Entry] = {}
    by_inode: dict[tuple[int, int], Entry] = {}
    observations: dict[str, Observation] = {}
    for entry in state.entries:
        try:
            observation = observe_entry(entry.path, hash=entry.sha256 is not None)
        except CapkeeperError:
            continue
        observations[entry.path] = observation
        by_path.setdefault(observation.resolved, entry)
        by_inode.setdefault((observation.dev, observation.ino), entry)
    return StateIndex(by_path, by_inode, observations)


@dataclass
class AuditReport:
    """The classified result of an audit."""

    findings: list[Finding]
    walk: WalkResult

    def count(self, verdict: Verdict) -> int:
        return sum(1 for f in self.findings if f.verdict is verdict)

    @property
    def worst(self) -> Finding | None:
        """The rated finding with the highest score."""
        rated = [f for f in self.findings if f.rating is not None]
        return max(rated, key=lambda f: f.rating.score if f.rating else 0, default=None)


def _within(path: str, result: WalkResult) -> bool:
    """Whether ``path`` lies in the part of the tree the walk covered."""

    def under(top: str) -> bool:
        return path == top or path.startswith(top.rstrip("/") + "/")

    return any(under(canonical) for _, canonical in result.roots) and not any(
        under(s.path) for s in result.skipped
    )


def audit(
    roots: Sequence[str],
    state: State,
    options: WalkOptions | None = None,
    *,
    progress: TextIO | None = None,
    last_cap: int | None = None,
    table: MountTable | None = None,
) -> AuditReport:
    """Walk ``roots`` and classify every file with capabilities against ``state``.

    Declared files below the roots that exist but carry no capabilities at all
    are reported as drifted too.
    """
    limit = cap_last_cap() if last_cap is None else last_cap
    result = walk(roots, options, progress=progress, table=table)
    index = index_state(state)
    findings: list[Finding] = []
    seen: set[str] = set()
    for raw in result.found:
        entry = index.by_path.get(raw.path)
        pinned = entry is not None and entry.sha256 is not None
        try:
            observation: Observation | None = observe(raw.path, hash=pinned)
        except CapkeeperError as exc:
            result.errors.append(WalkError(raw.path, f"cannot inspect: {exc.message}"))
            observation = None
        display = display_path(raw.path, result.roots)
        found = decode_finding(raw)
        findings.append(classify(raw.path, display, found, observation, index, last_cap=limit))
        seen.add(raw.path)
    for entry in state.entries:
        observation = index.observations.get(entry.path)
        if observation is None or observation.resolved in seen:
            continue
        lost = observation.caps is None and observation.caps_problem is None
        if lost and _within(observation.resolved, result):
            display = display_path(observation.resolved, result.roots)
            findings.append(classify_stripped(entry, observation, display, last_cap=limit))
    return AuditReport(ordered(findings), result)
