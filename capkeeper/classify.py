"""Where a file with capabilities stands against the state, and what it exposes (pure).

A file found by the audit walk is managed and in sync, managed but drifted (or
refused by the trust policy), or unmanaged (:func:`classify`); an unmanaged one
is rated by what it exposes, each reason spelled out (:func:`rate`). An
unmanaged file can be adopted: :func:`adopt_observation` and :func:`render`
write the state entry that declares what it carries. Everything here works on
built inputs (:class:`~capkeeper.model.Observation`, decoded capabilities); the
walk is :mod:`capkeeper.scan`, the audit operation :mod:`capkeeper.inventory`.
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from capkeeper.capabilities import CapSet, capability_name, capability_number, format_text
from capkeeper.errors import needs_escape
from capkeeper.interpreters import runs_other_code
from capkeeper.model import Entry, Kind, Observation
from capkeeper.reconcile import Status, decide, describe, tampering
from capkeeper.trust import Refusal, assess

__all__ = [
    "ROOT_EQUIVALENT",
    "Adoption",
    "Finding",
    "Level",
    "Rating",
    "StateIndex",
    "Verdict",
    "adopt_observation",
    "classify",
    "classify_stripped",
    "display_path",
    "ordered",
    "rate",
    "render",
    "toml_string",
]

ROOT_EQUIVALENT: frozenset[int] = frozenset(
    capability_number(name)
    for name in (
        "cap_chown",  # take ownership of any file, e.g. /etc/shadow
        "cap_dac_override",  # write any file
        "cap_dac_read_search",  # read any file (open_by_handle_at escapes too)
        "cap_fowner",  # chmod any file
        "cap_setgid",
        "cap_setuid",
        "cap_setpcap",
        "cap_setfcap",  # grant itself or anything every capability
        "cap_sys_module",  # load kernel code
        "cap_sys_rawio",  # raw memory and disk access
        "cap_sys_ptrace",  # inject into any process
        "cap_sys_admin",
        "cap_sys_boot",  # kexec another kernel
        "cap_mknod",  # make a block device of the root disk
        "cap_bpf",
    )
)
"""Capabilities that hand their holder a short path to full root."""


class Verdict(StrEnum):
    """Where a file with capabilities stands against the state."""

    UNMANAGED = "unmanaged"
    DRIFTED = "drifted"
    REFUSED = "refused"  # declared, but the trust policy refuses to enforce it
    IN_SYNC = "in-sync"

    @property
    def is_finding(self) -> bool:
        """Whether this asks for action (anything but in sync)."""
        return self is not Verdict.IN_SYNC


class Level(StrEnum):
    """How much an unmanaged file with capabilities exposes."""

    CRITICAL = "critical"
    HIGH = "high"
    MEDIUM = "medium"
    LOW = "low"

    @classmethod
    def of(cls, score: int) -> Level:
        if score >= 60:
            return cls.CRITICAL
        if score >= 30:
            return cls.HIGH
        if score >= 10:
            return cls.MEDIUM
        return cls.LOW


@dataclass(frozen=True)
class Rating:
    """A risk score with every reason that contributed to it."""

    score: int
    reasons: tuple[str, ...]

    @property
    def level(self) -> Level:
        return Level.of(self.score)


# Weights of the trust policy's refusal rules when rating an unmanaged file.
_RULE_WEIGHTS: Mapping[str, int] = {
    "directory-writable": 30,  # anyone who can write the directory can replace the binary
    "directory-owner": 30,
    "symlink": 30,
    "file-writable": 30,
    "owner": 30,
    "setuid": 20,
    "elf": 10,  # a script, or not an executable at all
    "regular": 10,
}
_IGNORED_RULES = frozenset({"sha256", "inheritable", "kernel"})  # not about the file
_RUNS_CODE = 60  # a loader or interpreter with capabilities: critical whatever it holds


def rate(
    caps: CapSet | None,
    problem: str | None,
    observation: Observation | None,
    refusals: Sequence[Refusal] = (),
) -> Rating:
    """Rate an unmanaged file: what could its capabilities be used for, and by whom?

    ``refusals`` are the trust policy's objections to the file (who can write
    or replace it, setuid, script); each adds its weight and its message.
    """
    score = 0
    reasons: list[str] = []
    if caps is not None and not caps.is_empty:
        score += 1
        dangerous = sorted(caps.capabilities() & ROOT_EQUIVALENT)
        if dangerous:
            names = ", ".join(capability_name(n) for n in dangerous)
            verb = "amounts" if len(dangerous) == 1 else "amount"
            score += 40
            reasons.append(f"{names} {verb} to root")
    if problem is not None:
        score += 10
        reasons.append(f"{problem}; the kernel may still honour it at exec")
    capable = (caps is not None and not caps.is_empty) or problem is not None
    if capable and observation is not None and observation.kind is Kind.ELF:
        name = posixpath.basename(observation.resolved)
        runs = runs_other_code(name, observation.elf)
        if runs is not None:
            score += _RUNS_CODE
            reasons.append(f"{name} {runs} gets these capabilities")
    for refusal in refusals:
        if refusal.rule in _IGNORED_RULES or refusal.rule == "interpreter":  # rated above
            continue
        score += _RULE_WEIGHTS.get(refusal.rule, 5)
        reasons.append(refusal.message)
    return Rating(score, tuple(reasons))


@dataclass(frozen=True)
class Finding:
    """One file with capabilities (or a declared one that lost them), classified."""

    path: str  # absolute, symlink-free
    display: str  # as getcap -r prints it for the root given
    caps: CapSet | None
    problem: str | None
    verdict: Verdict
    entry: Entry | None = None
    rating: Rating | None = None  # unmanaged files, and refused ones that run other code
    note: str = ""

    @property
    def caps_text(self) -> str:
        return describe(self.caps, self.problem)

    def record(self) -> dict[str, Any]:
        """The JSON form of this finding."""
        data: dict[str, Any] = {
            "type": "finding",
            "path": self.path,
            "caps": format_text(self.caps) if self.caps is not None else None,
            "verdict": str(self.verdict),
        }
        if self.problem:
            data["problem"] = self.problem
        if self.entry is not None:
            data["expected"] = self.entry.caps_text
            data["declared_in"] = self.entry.source
        if self.rating is not None:
            data["rating"] = str(self.rating.level)
            data["score"] = self.rating.score
            data["reasons"] = list(self.rating.reasons)
        if self.note:
            data["note"] = self.note
        return data


@dataclass(frozen=True)
class StateIndex:
    """Declared entries keyed by the path their file resolves to and by inode."""

    by_path: Mapping[str, Entry]
    by_inode: Mapping[tuple[int, int], Entry]
    observations: Mapping[str, Observation]  # entry.path -> what is there now, by that route


def _synthetic_entry(path: str, caps: CapSet | None) -> Entry:
    """An entry declaring what the file carries, to ask the trust policy about it."""
    found = caps or CapSet()
    return Entry(path=path, caps=found, caps_text="", allow_inheritable=True)


def classify(
    path: str,
    display: str,
    found: tuple[CapSet | None, str | None],
    observation: Observation | None,
    index: StateIndex,
    *,
    last_cap: int,
) -> Finding:
    """Classify one file found with capabilities (``found``: the decoded value, or why it
    cannot be read) against the declared state."""
    caps, problem = found
    entry = index.by_path.get(path)
    note = ""
    if entry is None and observation is not None:
        entry = index.by_inode.get((observation.dev, observation.ino))
        if entry is not None:
            note = f"hard link of declared {entry.path}"
    if entry is None or observation is None:
        refusals = (
            assess(_synthetic_entry(path, caps), observation, last_cap=last_cap)
            if observation is not None
            else ()
        )
        rating = rate(caps, problem, observation, refusals)
        return Finding(path, display, caps, problem, Verdict.UNMANAGED, rating=rating)
    # The trust policy judges the route of the declared path, not the walk's: a declared
    # path through another user's directory may lead to this file, and the entry is
    # refused whatever route the walk took to it.
    declared = index.observations.get(entry.path, observation)
    decision = decide(entry, declared, last_cap=last_cap)
    if decision.status is Status.REFUSED:
        reasons = "; ".join(str(r) for r in decision.refusals)
        # A declared loader or interpreter that already carries capabilities is as
        # exposed as an unmanaged one: rate it so it ranks with the worst.
        runs_code = any(r.rule == "interpreter" for r in decision.refusals)
        return Finding(
            path,
            display,
            caps,
            problem,
            Verdict.REFUSED,
            entry,
            rating=rate(caps, problem, observation, decision.refusals) if runs_code else None,
            note=note or reasons,
        )
    verdict = Verdict.IN_SYNC if decision.status is Status.IN_SYNC else Verdict.DRIFTED
    if tampering(decision.status, decision.extra):
        note = (note + "; " if note else "") + "extra capabilities: possible tampering"
    return Finding(path, display, caps, problem, verdict, entry, note=note)


def classify_stripped(
    entry: Entry, observation: Observation, display: str, *, last_cap: int
) -> Finding:
    """A declared file the walk passed that carries no capabilities at all: drifted, or
    refused when the trust policy would not restore them."""
    refusals = assess(entry, observation, last_cap=last_cap)
    return Finding(
        observation.resolved,
        display,
        None,
        None,
        Verdict.REFUSED if refusals else Verdict.DRIFTED,
        entry,
        note="; ".join(str(r) for r in refusals) or "declared capabilities are missing",
    )


def display_path(path: str, roots: Sequence[tuple[str, str]]) -> str:
    """``path`` spelled as ``getcap -r`` prints it for the root the user gave."""
    for given, canonical in roots:
        if path == canonical:
            return given
        prefix = canonical.rstrip("/") + "/"
        if path.startswith(prefix):
            base = given if given == "/" else given.rstrip("/")
            return posixpath.join(base, path[len(prefix) :])
    return path


_VERDICT_ORDER = {Verdict.UNMANAGED: 0, Verdict.DRIFTED: 1, Verdict.REFUSED: 2, Verdict.IN_SYNC: 3}


def ordered(findings: Iterable[Finding]) -> list[Finding]:
    """Worst first: rated findings by falling score, then unmanaged, drifted, refused,
    in sync; then by path."""
    return sorted(
        findings,
        key=lambda f: (
            -(f.rating.score if f.rating is not None else 0),
            _VERDICT_ORDER[f.verdict],
            f.path,
        ),
    )


# -- adoption: the state entry declaring what a file carries -----------------------------


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


def adopt_observation(
    path: str, observation: Observation, *, last_cap: int, owner_name: Callable[[int], str] = str
) -> Adoption | str:
    """The adoption of an observed file, or why it cannot be declared (``owner_name``
    names the owner's uid, a file owned by anyone but root being declared by name)."""
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
    owner = "root" if observation.uid == 0 else owner_name(observation.uid)
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
