"""The trust policy: may this observed file receive these capabilities?

Pure: takes an :class:`~capkeeper.state.Entry` and the
:class:`~capkeeper.files.Observation` made on the descriptor that would be
written, returns every reason to refuse (an empty tuple means trusted).
"""

from __future__ import annotations

import posixpath
import stat
from dataclasses import dataclass

from capkeeper.capabilities import capability_name
from capkeeper.errors import printable
from capkeeper.files import Hop, Kind, Observation
from capkeeper.interpreters import runs_other_code
from capkeeper.state import Entry

_WRITABLE_BY_OTHERS = stat.S_IWGRP | stat.S_IWOTH


@dataclass(frozen=True)
class Refusal:
    """One reason not to grant capabilities."""

    rule: str
    message: str
    hint: str | None = None

    def __str__(self) -> str:
        text = f"{self.message} (hint: {self.hint})" if self.hint else self.message
        return printable(text)


def _owner_ok(uid: int, entry: Entry) -> bool:
    return uid in (0, entry.owner_uid)


def _next_owner(hops: tuple[Hop, ...], index: int, observation: Observation) -> int:
    """Owner of the component that directory ``hops[index]`` holds on the way."""
    directory = hops[index].path
    for hop in hops[index + 1 :]:
        if posixpath.dirname(hop.path) == directory:
            return hop.uid
    return observation.uid


def _holds_file(hops: tuple[Hop, ...], index: int, observation: Observation) -> bool:
    """Whether directory ``hops[index]`` directly holds the observed file."""
    return posixpath.dirname(observation.resolved) == hops[index].path


def _check_hops(entry: Entry, observation: Observation) -> list[Refusal]:
    refusals: list[Refusal] = []
    hops = observation.hops
    for index, hop in enumerate(hops):
        if hop.is_symlink:
            if not _owner_ok(hop.uid, entry):
                refusals.append(
                    Refusal(
                        "symlink",
                        f"symlink {hop.path} -> {hop.target} is owned by uid {hop.uid}, "
                        f"not by {entry.owner}",
                        "only root may own symlinks on the path to a privileged binary",
                    )
                )
            continue
        if not _owner_ok(hop.uid, entry):
            refusals.append(
                Refusal(
                    "directory-owner",
                    f"directory {hop.path} is owned by uid {hop.uid}, not by {entry.owner}",
                    "whoever owns a directory can replace the binary inside it",
                )
            )
        if hop.mode & _WRITABLE_BY_OTHERS:
            sticky_ok = (
                hop.uid == 0
                and hop.mode & stat.S_ISVTX
                and _owner_ok(_next_owner(hops, index, observation), entry)
            )
            if sticky_ok and observation.nlink > 1 and _holds_file(hops, index, observation):
                # With fs.protected_hardlinks=0 anyone may link a root-owned file into
                # a sticky directory: the root-owned name proves nothing then.
                refusals.append(
                    Refusal(
                        "hardlink",
                        f"{observation.resolved} has {observation.nlink} hard links and sits in "
                        f"world-writable {hop.path}, where anyone could have linked it",
                        "keep managed binaries in directories only root can write",
                    )
                )
            if not sticky_ok:
                refusals.append(
                    Refusal(
                        "directory-writable",
                        f"directory {hop.path} is writable by "
                        f"{_who(hop.mode)} (mode {stat.S_IMODE(hop.mode):04o})",
                        f"chmod go-w {hop.path}",
                    )
                )
    return refusals


def _on_pseudo_fs(path: str) -> bool:
    return path.startswith(("/proc/", "/sys/")) or path in ("/proc", "/sys")


def _who(mode: int) -> str:
    parts = []
    if mode & stat.S_IWGRP:
        parts.append("group")
    if mode & stat.S_IWOTH:
        parts.append("others")
    return " and ".join(parts)


def assess(entry: Entry, observation: Observation, *, last_cap: int) -> tuple[Refusal, ...]:
    """Every reason to refuse granting ``entry.caps`` to the observed file."""
    refusals = _check_hops(entry, observation)
    path = observation.resolved
    if any(_on_pseudo_fs(p) for p in (path, *(hop.path for hop in observation.hops))):
        refusals.append(
            Refusal(
                "pseudo-fs",
                f"{observation.path} leads into /proc or /sys (resolved: {path}), "
                "which hold no stable binary",
                "declare the real path of the binary",
            )
        )
    if observation.kind is Kind.NOT_REGULAR:
        refusals.append(Refusal("regular", f"{path} is not a regular file"))
    elif observation.kind is Kind.SCRIPT:
        refusals.append(
            Refusal(
                "elf",
                f"{path} is a script (#!{observation.interpreter}); the kernel ignores "
                "file capabilities on scripts",
                "give the service AmbientCapabilities= in its unit instead",
            )
        )
    elif observation.kind is Kind.OTHER:
        refusals.append(Refusal("elf", f"{path} is not an ELF executable"))
    elif not entry.allow_interpreter and (
        runs := runs_other_code(posixpath.basename(path), observation.elf)
    ):
        refusals.append(
            Refusal(
                "interpreter",
                f"{path} {runs} would get these capabilities",
                "give the one service that needs them AmbientCapabilities= in its unit, or "
                "declare allow_interpreter = true if you really mean it",
            )
        )
    if observation.mode & (stat.S_ISUID | stat.S_ISGID):
        refusals.append(
            Refusal(
                "setuid",
                f"{path} is setuid/setgid (mode {stat.S_IMODE(observation.mode):04o}); "
                "file capabilities and setuid do not compose",
                f"chmod ug-s {path}",
            )
        )
    if observation.uid != entry.owner_uid:
        refusals.append(
            Refusal(
                "owner",
                f"{path} is owned by uid {observation.uid}, not by {entry.owner}",
                f"chown {entry.owner} {path}",
            )
        )
    if observation.mode & _WRITABLE_BY_OTHERS:
        refusals.append(
            Refusal(
                "file-writable",
                f"{path} is writable by {_who(observation.mode)} "
                f"(mode {stat.S_IMODE(observation.mode):04o})",
                f"chmod go-w {path}",
            )
        )
    if entry.sha256 is not None and observation.sha256 != entry.sha256:
        refusals.append(
            Refusal(
                "sha256",
                f"{path} content does not match the sha256 pin "
                f"(found {observation.sha256 or 'unknown'}, pinned {entry.sha256})",
                "update the pin in the state if this build is trusted",
            )
        )
    beyond = sorted(n for n in entry.caps.capabilities() if n > last_cap)
    if beyond:
        names = ", ".join(capability_name(n) for n in beyond)
        refusals.append(Refusal("kernel", f"{names} not known to this kernel (last is {last_cap})"))
    if entry.caps.inheritable and not entry.allow_inheritable:
        refusals.append(
            Refusal("inheritable", "inheritable capabilities need allow_inheritable = true")
        )
    return tuple(refusals)
