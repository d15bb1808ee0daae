"""reconcile.decide and event_for, the verdict, with built values: no files, no /proc.

``last_cap`` is always passed in, so the verdict and the text it shows do not
depend on the kernel the tests run on.
"""

from __future__ import annotations

import stat
from typing import Any

import pytest

from capkeeper.capabilities import CapSet, parse
from capkeeper.elf import EIClass, EIData, ElfFacts, ElfType
from capkeeper.files import REFUSED
from capkeeper.model import Entry, Hop, Kind, Observation
from capkeeper.reconcile import Outcome, Status, decide, event_for

LAST_CAP = 40
DIR = stat.S_IFDIR | 0o755
ELF = ElfFacts(EIClass.C64, EIData.LSB, ElfType.DYN, 62, "/lib64/ld-linux-x86-64.so.2", True)
UNREADABLE = next(iter(REFUSED.values()))


def caps(text: str) -> CapSet:
    return parse(text, last_cap=LAST_CAP)


def observed(found: CapSet | None, **changes: Any) -> Observation:
    base = Observation(
        path="/opt/app/tool",
        resolved="/opt/app/tool",
        hops=(Hop("/", 0, DIR), Hop("/opt", 0, DIR), Hop("/opt/app", 0, DIR)),
        uid=0,
        gid=0,
        mode=stat.S_IFREG | 0o755,
        dev=1,
        ino=2,
        kind=Kind.ELF,
        interpreter="",
        caps=found,
        caps_problem=None,
        sha256=None,
        elf=ELF,
    )
    return base._replace(**changes)


def declared(text: str = "cap_net_bind_service=ep", **changes: Any) -> Entry:
    return Entry("/opt/app/tool", caps(text), text)._replace(**changes)


CASES: list[tuple[str, Entry, Observation, Status, str, bool]] = [
    # name, entry, observation, status, found, extra (tampering)
    (
        "in sync",
        declared(),
        observed(caps("cap_net_bind_service=ep")),
        Status.IN_SYNC,
        "cap_net_bind_service=ep",
        False,
    ),
    (
        "in sync, v3 with rootid 0 reads as v2",
        declared(),
        observed(CapSet(permitted=1 << 10, effective=True, rootid=0)),
        Status.IN_SYNC,
        "cap_net_bind_service=ep",
        False,
    ),
    (
        "stripped",
        declared(),
        observed(None),
        Status.DRIFT,
        "none",
        False,
    ),
    (
        "fewer capabilities",
        declared("cap_net_bind_service,cap_net_raw=ep"),
        observed(caps("cap_net_raw=ep")),
        Status.DRIFT,
        "cap_net_raw=ep",
        False,
    ),
    (
        "effective flag lost",
        declared(),
        observed(caps("cap_net_bind_service=p")),
        Status.DRIFT,
        "cap_net_bind_service=p",
        False,
    ),
    (
        "extra permitted capability",
        declared(),
        observed(caps("cap_net_bind_service,cap_sys_admin=ep")),
        Status.DRIFT,
        "cap_net_bind_service,cap_sys_admin=ep",
        True,
    ),
    (
        "other capability instead",
        declared(),
        observed(caps("cap_sys_ptrace=ep")),
        Status.DRIFT,
        "cap_sys_ptrace=ep",
        True,
    ),
    (
        "extra inheritable capability",
        declared(allow_inheritable=True),
        observed(caps("cap_net_bind_service=eip")),
        Status.DRIFT,
        "cap_net_bind_service=eip",
        True,
    ),
    (
        "effective flag added",
        declared("cap_net_bind_service=p"),
        observed(caps("cap_net_bind_service=ep")),
        Status.DRIFT,
        "cap_net_bind_service=ep",
        True,
    ),
    (
        "v3 value of another user namespace",
        declared(),
        observed(CapSet(permitted=1 << 10, effective=True, rootid=100000)),
        Status.DRIFT,
        "cap_net_bind_service=ep [rootid=100000]",
        False,
    ),
    (
        "unreadable value is honoured at exec: tampering",
        declared(),
        observed(None, caps_problem=UNREADABLE),
        Status.DRIFT,
        UNREADABLE,
        True,
    ),
    (
        "declared empty set, none found",
        declared("="),
        observed(None),
        Status.DRIFT,
        "none",
        False,
    ),
    (
        "refused: owned by a user, found with extra capabilities",
        declared(),
        observed(caps("cap_sys_admin=ep"), uid=1000),
        Status.REFUSED,
        "cap_sys_admin=ep",
        False,
    ),
    (
        "refused: unreadable value on a script",
        declared(),
        observed(None, caps_problem=UNREADABLE, kind=Kind.SCRIPT, elf=None),
        Status.REFUSED,
        UNREADABLE,
        False,
    ),
]


@pytest.mark.parametrize(
    ("entry", "observation", "status", "found", "extra"),
    [pytest.param(*row, id=name) for name, *row in CASES],
)
def test_decide_table(
    entry: Entry, observation: Observation, status: Status, found: str, extra: bool
) -> None:
    decision = decide(entry, observation, last_cap=LAST_CAP)
    assert (decision.status, decision.found, decision.extra) == (status, found, extra)
    assert bool(decision.refusals) == (status is Status.REFUSED)


def test_decide_refusals_are_assess_s() -> None:
    decision = decide(declared(), observed(None, uid=1000, mode=0o100777), last_cap=LAST_CAP)
    assert [r.rule for r in decision.refusals] == ["owner", "file-writable"]


def test_found_text_uses_the_given_last_cap() -> None:
    """The text follows the ``last_cap`` given, as getcap on that kernel prints it (a
    capability the kernel does not know is listed apart), never the running kernel's."""
    found = CapSet(permitted=1 << 40 | 1 << 10, effective=True)
    on_40 = decide(declared(), observed(found), last_cap=40)
    on_39 = decide(declared(), observed(found), last_cap=39)
    assert on_40.found == "cap_net_bind_service,cap_checkpoint_restore=ep"
    assert on_39.found == "cap_net_bind_service=ep cap_checkpoint_restore+ep"
    assert on_40.extra
    assert on_39.extra


@pytest.mark.parametrize(
    ("status", "extra", "transient", "event"),
    [
        (Status.IN_SYNC, False, False, ("capability_in_sync", "debug")),
        (Status.DRIFT, False, False, ("capability_drift", "warning")),
        (Status.DRIFT, True, False, ("capability_tampering", "critical")),
        (Status.RESTORED, False, False, ("capability_restored", "warning")),
        (Status.RESTORED, True, False, ("capability_tampering", "critical")),
        (Status.REFUSED, False, False, ("restore_refused", "critical")),
        (Status.FAILED, False, False, ("restore_failed", "error")),
        (Status.FAILED, False, True, ("restore_failed", "warning")),
        (Status.MISSING, False, False, ("binary_missing", "info")),
    ],
)
def test_event_for_table(
    status: Status, extra: bool, transient: bool, event: tuple[str, str]
) -> None:
    outcome = Outcome(declared(), status, "none", extra=extra, transient=transient)
    assert event_for(outcome) == event
