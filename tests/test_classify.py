"""capkeeper.classify with built inputs: no file, no walk (the module is pure)."""

from __future__ import annotations

import pytest

from capkeeper.capabilities import CapSet, format_text, parse
from capkeeper.classify import Finding, StateIndex, Verdict, classify
from capkeeper.model import Entry, Hop, Kind, Observation
from capkeeper.reconcile import Status, decide, tampering

LAST_CAP = 40
PATH = "/usr/bin/ping"
ROUTE = (Hop("/", 0, 0o40755), Hop("/usr", 0, 0o40755), Hop("/usr/bin", 0, 0o40755))


def _observation(caps: CapSet | None, problem: str | None = None, *, ino: int = 2) -> Observation:
    return Observation(
        path=PATH,
        resolved=PATH,
        hops=ROUTE,
        uid=0,
        gid=0,
        mode=0o100755,
        dev=1,
        ino=ino,
        kind=Kind.ELF,
        interpreter="",
        caps=caps,
        caps_problem=problem,
        sha256=None,
    )


def _entry(text: str) -> Entry:
    caps = parse(text)
    return Entry(path=PATH, caps=caps, caps_text=format_text(caps, last_cap=LAST_CAP))


def _classify(entry: Entry | None, found: Observation, path: str = PATH) -> Finding:
    index = StateIndex(
        by_path={PATH: entry} if entry is not None else {},
        by_inode={(1, 2): entry} if entry is not None else {},
        observations={PATH: found} if entry is not None else {},
    )
    return classify(path, path, (found.caps, found.caps_problem), found, index, last_cap=LAST_CAP)


@pytest.mark.parametrize(
    ("declared", "carried", "problem", "verdict", "tampered"),
    [
        ("cap_net_raw=ep", "cap_net_raw=ep", None, Verdict.IN_SYNC, False),
        ("cap_net_raw=ep", "cap_net_raw,cap_sys_admin=ep", None, Verdict.DRIFTED, True),
        ("cap_net_raw=p", "cap_net_raw=ep", None, Verdict.DRIFTED, True),  # effective added
        ("cap_net_raw,cap_net_admin=ep", "cap_net_raw=ep", None, Verdict.DRIFTED, False),
        (
            "cap_net_raw=ep",
            None,
            "present but unreadable (legacy v1 or malformed value)",
            Verdict.DRIFTED,
            True,
        ),
    ],
)
def test_declared_file_verdict_and_tampering(
    declared: str, carried: str | None, problem: str | None, verdict: Verdict, tampered: bool
) -> None:
    """A declared file is in sync or drifted; "possible tampering" is noted exactly when
    reconcile would report the same file as capability_tampering."""
    entry = _entry(declared)
    found = _observation(parse(carried) if carried else None, problem)
    finding = _classify(entry, found)
    assert finding.verdict is verdict
    assert finding.entry == entry
    decision = decide(entry, found, last_cap=LAST_CAP)
    assert tampering(decision.status, decision.extra) is tampered
    assert ("possible tampering" in finding.note) is tampered


def test_tampering_is_only_for_a_restorable_verdict() -> None:
    """Extra capabilities on a refused or missing file are not reported as tampering."""
    for status in Status:
        assert tampering(status, True) is (status in (Status.RESTORED, Status.DRIFT))
        assert tampering(status, False) is False


def test_unmanaged_file_is_rated() -> None:
    """A file the state does not declare is unmanaged and rated by what it exposes."""
    finding = _classify(None, _observation(parse("cap_setuid=ep")))
    assert finding.verdict is Verdict.UNMANAGED
    assert finding.rating is not None
    assert finding.rating.reasons == ("cap_setuid amounts to root",)


def test_hard_link_of_a_declared_file_is_named() -> None:
    """Another name of a declared inode is classified against that entry."""
    entry = _entry("cap_net_raw=ep")
    finding = _classify(entry, _observation(parse("cap_net_raw=ep")), path="/usr/bin/ping2")
    assert finding.verdict is Verdict.IN_SYNC
    assert finding.note == f"hard link of declared {PATH}"
