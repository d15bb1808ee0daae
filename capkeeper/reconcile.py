"""Observe → decide → act, the one path shared by ``apply``, ``check`` and the daemon.

:func:`decide` is pure: given a declared entry and what was observed on the
file, it says whether the file is in sync, needs its capabilities restored,
or must be refused. :func:`reconcile` wraps it with the fd-pinned observation
and the write, so every mode reaches the same verdict for the same file.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from capkeeper.capabilities import CapSet, format_text, kernel_last_cap
from capkeeper.errors import CapabilitiesNotKept, FileAccessError
from capkeeper.files import (
    NO_XATTR,
    Observation,
    observe_fd,
    open_declared,
    remove_caps,
    write_caps,
)
from capkeeper.state import Entry
from capkeeper.trust import Refusal, assess, removal_blocker


class Status(StrEnum):
    """The verdict on one declared binary."""

    IN_SYNC = "in-sync"
    RESTORED = "restored"
    DRIFT = "drift"  # differs; a write would restore it (check mode, or before act)
    REFUSED = "refused"
    MISSING = "missing"
    FAILED = "failed"

    @property
    def ok(self) -> bool:
        return self in (Status.IN_SYNC, Status.RESTORED)


def describe(caps: CapSet | None, problem: str | None = None) -> str:
    """Capabilities as ``getcap`` prints them; ``none`` when absent."""
    if problem:
        return problem
    if caps is None:
        return "none"
    text = format_text(caps)
    return f"{text} [rootid={caps.rootid}]" if caps.rootid else text


@dataclass(frozen=True)
class Decision:
    """What :func:`decide` concluded, before any write."""

    status: Status
    found: str
    extra: bool = False  # found carries capabilities beyond the declared set
    refusals: tuple[Refusal, ...] = ()


@dataclass(frozen=True)
class Outcome:
    """The result of reconciling one entry."""

    entry: Entry
    status: Status
    found: str
    resolved: str = ""
    reason: str = ""
    extra: bool = False
    observation: Observation | None = None  # what the verdict was made on
    held: bool = False  # ``hold`` said wait: nothing decided, nothing written
    transient: bool = False  # a race (replaced while opening): the next look may succeed

    @property
    def expected(self) -> str:
        return self.entry.caps_text

    def fields(self) -> dict[str, Any]:
        """The structured fields of this outcome for a log event."""
        data: dict[str, Any] = {
            "path": self.entry.path,
            "expected": self.expected,
            "found": self.found,
            "status": str(self.status),
        }
        if self.resolved and self.resolved != self.entry.path:
            data["target"] = self.resolved
        if self.reason:
            data["reason"] = self.reason
        return data


def decide(entry: Entry, observation: Observation, *, last_cap: int) -> Decision:
    """Pure verdict: in sync, drift (restorable) or refused."""
    found = describe(observation.caps, observation.caps_problem)
    refusals = assess(entry, observation, last_cap=last_cap)
    if refusals:
        return Decision(Status.REFUSED, found, refusals=refusals)
    if observation.caps_problem is None and observation.caps == entry.caps:
        return Decision(Status.IN_SYNC, found)
    current = observation.caps
    # An unreadable value (legacy v1, foreign v3) is still honoured at exec: treat
    # it like extra capabilities, i.e. possible tampering.
    expected = entry.caps
    extra = observation.caps_problem is not None or (
        current is not None
        and bool(
            current.permitted & ~expected.permitted
            or current.inheritable & ~expected.inheritable
            or (current.effective and not expected.effective)
        )
    )
    return Decision(Status.DRIFT, found, extra=extra)


_ATTEMPTS = 3  # walks tried when the file keeps being replaced while it is opened


def reconcile(
    entry: Entry,
    *,
    write: bool,
    last_cap: int | None = None,
    hold: Callable[[Observation, Decision], bool] | None = None,
) -> Outcome:
    """Observe ``entry``'s file, decide, and (when ``write``) restore its capabilities.

    When ``hold`` returns True for the observation and verdict (the daemon: a
    write may be in progress), nothing is written: the outcome is ``held``.
    A file replaced between the walk and the open is walked again (a deploy
    renaming a new build into place); after a few such races in a row the
    outcome is a transient failure that the next event or retry looks at again.
    """
    limit = kernel_last_cap() if last_cap is None else last_cap
    attempt = 1
    while True:
        try:
            return _reconcile_once(entry, write=write, last_cap=limit, hold=hold)
        except FileAccessError as exc:
            if exc.errno == errno.ENOENT:
                return Outcome(entry, Status.MISSING, "none", reason="file does not exist")
            if exc.errno == errno.EAGAIN and attempt < _ATTEMPTS:
                attempt += 1
                continue
            transient = exc.errno == errno.EAGAIN
            return Outcome(entry, Status.FAILED, "unknown", reason=str(exc), transient=transient)


def _reconcile_once(
    entry: Entry,
    *,
    write: bool,
    last_cap: int,
    hold: Callable[[Observation, Decision], bool] | None,
) -> Outcome:
    with open_declared(entry.path) as (fd, hops, resolved):
        observation = observe_fd(entry.path, fd, hops, resolved, hash=entry.sha256 is not None)
        decision = decide(entry, observation, last_cap=last_cap)
        if hold is not None and hold(observation, decision):
            return Outcome(
                entry,
                decision.status,
                decision.found,
                resolved,
                observation=observation,
                held=True,
            )
        if decision.status is Status.REFUSED:
            return _refuse(entry, fd, observation, decision, write=write)
        if not observation.xattr_supported:
            reason = f"{resolved}: {NO_XATTR}"
            return Outcome(
                entry,
                Status.FAILED,
                decision.found,
                resolved,
                reason=reason,
                observation=observation,
            )
        if decision.status is Status.IN_SYNC or not write:
            return Outcome(
                entry,
                decision.status,
                decision.found,
                resolved,
                extra=decision.extra,
                observation=observation,
            )
        try:
            write_caps(fd, entry.caps, path=entry.path)
        except CapabilitiesNotKept as exc:
            # Usually a race with whatever strips them (the daemon brakes such a fight);
            # the next event or retry looks again.
            return Outcome(
                entry,
                Status.FAILED,
                decision.found,
                resolved,
                reason=str(exc),
                observation=observation,
                transient=True,
            )
        return Outcome(
            entry,
            Status.RESTORED,
            decision.found,
            resolved,
            extra=decision.extra,
            observation=observation,
        )


def _refuse(
    entry: Entry, fd: int, observation: Observation, decision: Decision, *, write: bool
) -> Outcome:
    reason = "; ".join(str(r) for r in decision.refusals)
    capable = observation.caps is not None or observation.caps_problem is not None
    blocker = removal_blocker(observation, decision.refusals)
    if blocker is not None:
        # Whoever controls the route chose the file it reaches: it may be any
        # binary on the host, so nothing is changed on it.
        if write and capable:
            reason += (
                f"; nothing was changed on {observation.resolved} (it keeps {decision.found}): "
                f"{blocker}"
            )
    elif write and capable:
        # Fail closed: capabilities left on a file we no longer trust (its mode
        # loosened, its pinned content changed through a shared mmap, which keeps
        # them) would still be granted at every exec. Only root chose the route,
        # so this is the very file the declared path names.
        try:
            remove_caps(fd, path=entry.path)
            reason += f"; its capabilities ({decision.found}) were removed"
        except FileAccessError as exc:
            reason += f"; its capabilities could not be removed: {exc}"
    return Outcome(
        entry,
        Status.REFUSED,
        decision.found,
        observation.resolved,
        reason,
        observation=observation,
    )


def event_for(outcome: Outcome) -> tuple[str, str]:
    """``(event name, log level)`` for an outcome."""
    status = outcome.status
    if status in (Status.RESTORED, Status.DRIFT) and outcome.extra:
        return "capability_tampering", "critical"
    if status is Status.FAILED and outcome.transient:
        return "restore_failed", "warning"
    return {
        Status.RESTORED: ("capability_restored", "warning"),
        Status.DRIFT: ("capability_drift", "warning"),
        Status.REFUSED: ("restore_refused", "critical"),
        Status.FAILED: ("restore_failed", "error"),
        Status.MISSING: ("binary_missing", "info"),
        Status.IN_SYNC: ("capability_in_sync", "debug"),
    }[status]


def log_outcome(logger: Any, outcome: Outcome, **extra: Any) -> None:
    """Emit the one structured event describing ``outcome``."""
    event, level = event_for(outcome)
    fields = outcome.fields()
    fields.update(extra)
    if outcome.status in (Status.RESTORED, Status.DRIFT):
        fields["action"] = "restored" if outcome.status is Status.RESTORED else "none"
    getattr(logger, level)(event, **fields)
