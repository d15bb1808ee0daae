"""The verdict on one declared binary: pure, shared by ``apply``, ``check``, the daemon and audit.

:func:`decide` is pure: given a declared entry and what was observed on the
file, it says whether the file is in sync, needs its capabilities restored,
or must be refused. :func:`capkeeper.enforce.reconcile` wraps it with the
fd-pinned observation and the write, so every mode reaches the same verdict
for the same file. :func:`event_for` names the one event each outcome is
reported as (including the "tampering" verdict).
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any, NamedTuple

from capkeeper.capabilities import CapSet, format_text
from capkeeper.model import Entry, Observation
from capkeeper.trust import Refusal, assess


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


def describe(
    caps: CapSet | None, problem: str | None = None, *, last_cap: int | None = None
) -> str:
    """Capabilities as ``getcap`` prints them; ``none`` when absent."""
    if problem:
        return problem
    if caps is None:
        return "none"
    text = format_text(caps, last_cap=last_cap)
    return f"{text} [rootid={caps.rootid}]" if caps.rootid else text


class Decision(NamedTuple):
    """What :func:`decide` concluded, before any write."""

    status: Status
    found: str
    extra: bool = False  # found carries capabilities beyond the declared set
    refusals: tuple[Refusal, ...] = ()


class Outcome(NamedTuple):
    """The result of reconciling one entry (a NamedTuple, like
    :class:`~capkeeper.model.Observation`: one is built for every check)."""

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
    found = describe(observation.caps, observation.caps_problem, last_cap=last_cap)
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


def tampering(status: Status, extra: bool) -> bool:
    """Whether a verdict reads as possible tampering: the file was found carrying
    capabilities beyond the declared set (``extra`` from :func:`decide`) and was, or
    would be, restored. The one place this verdict is derived."""
    return extra and status in (Status.RESTORED, Status.DRIFT)


def event_for(outcome: Outcome) -> tuple[str, str]:
    """``(event name, log level)`` for an outcome."""
    status = outcome.status
    if tampering(status, outcome.extra):
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
