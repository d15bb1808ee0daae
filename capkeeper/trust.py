"""The trust policy: may this observed file receive these capabilities?

Pure: takes an :class:`~capkeeper.state.Entry` and the
:class:`~capkeeper.files.Observation` made on the descriptor that would be
written, returns every reason to refuse (an empty tuple means trusted).
"""

from __future__ import annotations

import posixpath
import stat
from collections.abc import Collection, Sequence
from typing import NamedTuple

from capkeeper.capabilities import CapSet, capability_name
from capkeeper.errors import printable
from capkeeper.interpreters import runs_other_code
from capkeeper.model import Entry, Hop, Kind, Observation

_WRITABLE_BY_OTHERS = stat.S_IWGRP | stat.S_IWOTH


def writable_by_others(mode: int) -> bool:
    """Whether ``mode`` lets the group or others write (``S_IWGRP``/``S_IWOTH``)."""
    return bool(mode & _WRITABLE_BY_OTHERS)


def open_to_others(uid: int, mode: int) -> bool:
    """Whether users other than root can create and remove names in a directory with
    this owner and mode (and so raise any number of inotify events in it)."""
    return uid != 0 or writable_by_others(mode)


def file_refusals(
    path: str, uid: int, mode: int, *, owners: Collection[int], owner: str
) -> list[Refusal]:
    """The owner and mode rule for a file whose content grants power (a binary, a
    state file, ``state.d``): owned by one of ``owners`` (``owner`` names them), and
    writable by nobody else. Rules ``owner`` and ``file-writable``; no sticky
    exception, that is for the directories on a route (:func:`route_refusals`)."""
    refusals: list[Refusal] = []
    if uid not in owners:
        refusals.append(
            Refusal(
                "owner", f"{path} is owned by uid {uid}, not by {owner}", f"chown {owner} {path}"
            )
        )
    if writable_by_others(mode):
        refusals.append(
            Refusal(
                "file-writable",
                f"{path} is writable by {_who(mode)} (mode {stat.S_IMODE(mode):04o})",
                f"chmod go-w {path}",
            )
        )
    return refusals


def declaration_refusals(caps: CapSet, *, allow_inheritable: bool, last_cap: int) -> list[Refusal]:
    """The rules on the declared capabilities themselves, whatever the file: every one
    known to this kernel (rule ``kernel``: one beyond ``last_cap`` is a typo or a
    state written for a newer kernel), and inheritable ones only when declared on
    purpose (rule ``inheritable``). The state refuses such a declaration when it is
    loaded; :func:`assess` asks again for entries built otherwise."""
    refusals: list[Refusal] = []
    # The bits above last_cap, tested at once before any list is built.
    if (caps.permitted | caps.inheritable) >> max(last_cap + 1, 0):
        beyond = sorted(n for n in caps.capabilities() if n > last_cap)
        names = ", ".join(capability_name(n) for n in beyond)
        refusals.append(
            Refusal("kernel", f"{names} not known to this kernel (last capability is {last_cap})")
        )
    if caps.inheritable and not allow_inheritable:
        refusals.append(
            Refusal("inheritable", "inheritable capabilities need allow_inheritable = true")
        )
    return refusals


ROUTE_RULES = frozenset(
    {"symlink", "directory-owner", "directory-writable", "hardlink", "pseudo-fs"}
)
"""Rules about the route to the file rather than the file: when one fails, the file
reached is not necessarily the one the declared path legitimately names."""


class Refusal(NamedTuple):
    """One reason not to grant capabilities."""

    rule: str
    message: str
    hint: str | None = None
    component: str = ""  # the directory or symlink at fault, for a route rule

    @property
    def about_route(self) -> bool:
        """Whether the route is untrusted, so the file reached may be anybody's.

        Then nothing may be changed on that file (not even removing its
        capabilities): whoever controls the route chose it.
        """
        return self.rule in ROUTE_RULES

    def __str__(self) -> str:
        text = f"{self.message} (hint: {self.hint})" if self.hint else self.message
        return printable(text)


def removal_blocker(observation: Observation, refusals: Sequence[Refusal]) -> str | None:
    """Why the refused observed file may not lose its capabilities; None when it may.

    Failing closed (removing the capabilities of a file capkeeper no longer
    trusts) is only right for the file the declared path legitimately names.
    That holds only when root alone chose the route: every directory and
    symlink on it owned by root and no route rule refused. A declared owner
    other than root who owns a hop decides what the path reaches (a symlink to
    any capable binary on the host), so removal would let them strip it; and
    against that owner removal protects nothing, since they can already move a
    capable file of theirs out of the path's reach.
    """
    if any(refusal.about_route for refusal in refusals):
        return "the route to it is not trusted"
    for hop in observation.hops:
        if hop.uid != 0:
            kind = "symlink" if hop.is_symlink else "directory"
            return f"{kind} {hop.path} on the route to it is owned by uid {hop.uid}, not by root"
    return None


def exposed_directory(observation: Observation) -> str | None:
    """The directory holding the observed file, if users other than root can write to it.

    Trusted or not, such a file's directory can be flooded with file events by
    any of those users (create, close, unlink in a loop): the daemon's queue for
    it overflows and restores there wait for the rescan that follows.
    """
    directory = posixpath.dirname(observation.resolved)
    for hop in observation.hops:
        if hop.path == directory and not hop.is_symlink:
            return directory if open_to_others(hop.uid, hop.mode) else None
    return None


def flood_warning(directory: str) -> str:
    """The warning ``validate`` and ``doctor`` give for a binary in ``directory``."""
    return printable(
        f"its directory {directory} can be written by users other than root: any of them "
        "can flood it with file events, and restores there then wait for a rescan"
    )


FLOOD_HINT = "keep binaries with capabilities in a directory only root can write"


def _next_owner(hops: Sequence[Hop], index: int, final_uid: int) -> int:
    """Owner of the component that directory ``hops[index]`` holds on the way."""
    directory = hops[index].path
    for hop in hops[index + 1 :]:
        if posixpath.dirname(hop.path) == directory:
            return hop.uid
    return final_uid


def route_refusals(
    hops: Sequence[Hop],
    *,
    declared: str,
    resolved: str,
    uid: int,
    nlink: int,
    owners: Collection[int],
    owner: str,
) -> list[Refusal]:
    """Every reason the route ``hops`` from ``/`` to ``resolved`` is not trusted.

    ``uid`` and ``nlink`` are those of the file reached; ``owners`` may own the
    directories and symlinks on the way besides root (``owner`` names them).
    The one route rule, for binaries and for the state files alike.

    The thousands of files of one directory share their route: for a file with
    one link, the verdict on the hops depends only on the hops, the file's
    owner and ``owners``; a route with no refusal is remembered by those values.
    """
    route = tuple(hops)
    if nlink > 1:
        refusals, pseudo = _hop_refusals(
            route, resolved=resolved, uid=uid, nlink=nlink, owners=tuple(owners), owner=owner
        )
    else:
        # With one link, resolved and nlink only enter the hardlink rule, which needs
        # nlink > 1: the same verdict for every such file of that owner on this route.
        refusals, pseudo = _one_link_verdict(route, uid, tuple(owners), owner)
    # /proc/<pid>/root, /proc/self/fd/N and friends lead wherever some process is.
    if pseudo is None and _on_pseudo_fs(resolved):
        pseudo = resolved
    if pseudo is None:
        return list(refusals)
    return [
        *refusals,
        Refusal(
            "pseudo-fs",
            f"{declared} leads into /proc or /sys (resolved: {resolved}), "
            "which hold no stable binary",
            "declare the real path of the binary",
            component=pseudo,
        ),
    ]


_HopVerdict = tuple[tuple[Refusal, ...], str | None]
_RouteKey = tuple[tuple[Hop, ...], int, tuple[int, ...]]
# Only routes with no refusal are remembered: every hop of one is a directory or
# symlink only the trusted owners can change, so there are as many as they made.
# A refused route may run through a directory of anyone's, who can make each
# check meet a new one (40 symlinks of 4095 bytes: 30,000 hops, 14 MB a verdict).
_TRUSTED_ROUTES: dict[_RouteKey, str | None] = {}
_TRUSTED_ROUTES_MAX = 1024


def _remember_trusted(key: _RouteKey, pseudo: str | None) -> None:
    if len(_TRUSTED_ROUTES) >= _TRUSTED_ROUTES_MAX:
        _TRUSTED_ROUTES.clear()
    _TRUSTED_ROUTES[key] = pseudo


# The last trusted route, by identity: the files of one pinned directory share one
# route object (:class:`capkeeper.files.Pins`), whose hashing (every hop) the dict above
# would redo for each. A tuple of frozen hops cannot change, and the reference kept here
# stops its identity from passing to another tuple.
_last_trusted: tuple[tuple[Hop, ...], int, tuple[int, ...], str | None] | None = None


def _one_link_verdict(
    hops: tuple[Hop, ...], uid: int, owners: tuple[int, ...], owner: str
) -> _HopVerdict:
    """:func:`_hop_refusals` of a one-link file owned by ``uid``; a route with no
    refusal is remembered (see :data:`_TRUSTED_ROUTES`), a refused one never."""
    global _last_trusted  # noqa: PLW0603 - a one-entry memo over the one above
    last = _last_trusted
    if last is not None and last[0] is hops and last[1] == uid and last[2] == owners:
        return (), last[3]
    key = (hops, uid, owners)
    if key in _TRUSTED_ROUTES:
        pseudo = _TRUSTED_ROUTES[key]
    else:
        refusals, pseudo = _hop_refusals(
            hops, resolved="", uid=uid, nlink=1, owners=owners, owner=owner
        )
        if refusals:
            return refusals, pseudo
        _remember_trusted(key, pseudo)
    _last_trusted = (hops, uid, owners, pseudo)
    return (), pseudo


def _hop_refusals(
    hops: tuple[Hop, ...],
    *,
    resolved: str,
    uid: int,
    nlink: int,
    owners: tuple[int, ...],
    owner: str,
) -> _HopVerdict:
    """The route rule on each hop, and the first hop in /proc or /sys (None: none)."""
    refusals: list[Refusal] = []
    for index, hop in enumerate(hops):
        if hop.is_symlink:
            if hop.uid not in owners:
                refusals.append(
                    Refusal(
                        "symlink",
                        f"symlink {hop.path} -> {hop.target} is owned by uid {hop.uid}, "
                        f"not by {owner}",
                        "only root may own symlinks on the path to a privileged binary",
                        component=hop.path,
                    )
                )
            continue
        if hop.uid not in owners:
            refusals.append(
                Refusal(
                    "directory-owner",
                    f"directory {hop.path} is owned by uid {hop.uid}, not by {owner}",
                    "whoever owns a directory can replace the binary inside it",
                    component=hop.path,
                )
            )
        if writable_by_others(hop.mode):
            sticky_ok = (
                hop.uid == 0 and hop.mode & stat.S_ISVTX and _next_owner(hops, index, uid) in owners
            )
            if sticky_ok and nlink > 1 and posixpath.dirname(resolved) == hop.path:
                # With fs.protected_hardlinks=0 anyone may link a root-owned file into
                # a sticky directory: the root-owned name proves nothing then.
                refusals.append(
                    Refusal(
                        "hardlink",
                        f"{resolved} has {nlink} hard links and sits in "
                        f"world-writable {hop.path}, where anyone could have linked it",
                        "keep managed binaries in directories only root can write",
                        component=hop.path,
                    )
                )
            if not sticky_ok:
                refusals.append(
                    Refusal(
                        "directory-writable",
                        f"directory {hop.path} is writable by "
                        f"{_who(hop.mode)} (mode {stat.S_IMODE(hop.mode):04o})",
                        f"chmod go-w {hop.path}",
                        component=hop.path,
                    )
                )
    pseudo = next((hop.path for hop in hops if _on_pseudo_fs(hop.path)), None)
    return tuple(refusals), pseudo


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
    path = observation.resolved
    refusals = route_refusals(
        observation.hops,
        declared=observation.path,
        resolved=path,
        uid=observation.uid,
        nlink=observation.nlink,
        owners=(0, entry.owner_uid),
        owner=entry.owner,
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
        runs := runs_other_code(path.rpartition("/")[2], observation.elf)  # basename
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
    refusals += file_refusals(
        path, observation.uid, observation.mode, owners=(entry.owner_uid,), owner=entry.owner
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
    refusals += declaration_refusals(
        entry.caps, allow_inheritable=entry.allow_inheritable, last_cap=last_cap
    )
    return tuple(refusals)
