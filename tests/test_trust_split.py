"""trust.route_refusals, split into a route part remembered by value and a file part,
against the rule as it was written before the split (one function, every hop, every file).

The reference below is the pre-split ``route_refusals`` verbatim: the oracle of a
differential test, not a second rule the code uses.
"""

from __future__ import annotations

import posixpath
import stat
from collections.abc import Collection, Sequence

from hypothesis import given, settings
from hypothesis import strategies as st

from capkeeper.model import Hop
from capkeeper.trust import Refusal, _who, route_refusals, writable_by_others


def _next_owner(hops: Sequence[Hop], index: int, final_uid: int) -> int:
    directory = hops[index].path
    for hop in hops[index + 1 :]:
        if posixpath.dirname(hop.path) == directory:
            return hop.uid
    return final_uid


def _on_pseudo_fs(path: str) -> bool:
    return path.startswith(("/proc/", "/sys/")) or path in ("/proc", "/sys")


def reference_route_refusals(
    hops: Sequence[Hop],
    *,
    declared: str,
    resolved: str,
    uid: int,
    nlink: int,
    owners: Collection[int],
    owner: str,
) -> list[Refusal]:
    """The unsplit rule of capkeeper 0.x (main b6b7d6a), for comparison."""
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
    on_pseudo = [p for p in (*(hop.path for hop in hops), resolved) if _on_pseudo_fs(p)]
    if on_pseudo:
        refusals.append(
            Refusal(
                "pseudo-fs",
                f"{declared} leads into /proc or /sys (resolved: {resolved}), "
                "which hold no stable binary",
                "declare the real path of the binary",
                component=on_pseudo[0],
            )
        )
    return refusals


USERS = (0, 1000, 2000)
PATHS = ("/", "/tmp", "/tmp/a", "/tmp/a/b", "/opt", "/opt/app", "/proc", "/proc/1", "/sys")
MODES = (0o755, 0o775, 0o757, 0o777, 0o1777, 0o1775, 0o1757, 0o3777, 0o1755, 0o700)

hops_strategy = st.lists(
    st.builds(
        lambda path, uid, mode, link, target: (
            Hop(path, uid, stat.S_IFLNK | 0o777, is_symlink=True, target=target)
            if link
            else Hop(path, uid, stat.S_IFDIR | mode)
        ),
        st.sampled_from(PATHS),
        st.sampled_from(USERS),
        st.sampled_from(MODES),
        st.booleans(),
        st.sampled_from(("/opt/app", "..", "a", "/proc/self/root")),
    ),
    max_size=7,
)
FILES = [
    (resolved, uid, nlink)
    for resolved in (*(f"{p.rstrip('/')}/tool" for p in PATHS), "/proc", "/sys")
    for uid in USERS
    for nlink in (0, 1, 2, 3)
]
owners_strategy = st.sampled_from((((0,), "root"), ((0, 1000), "alice"), ((0, 0), "root")))


@settings(max_examples=600, deadline=None)
@given(hops=hops_strategy, who=owners_strategy, backwards=st.booleans())
def test_split_route_rule_equals_the_unsplit_rule(
    hops: list[Hop], who: tuple[tuple[int, ...], str], backwards: bool
) -> None:
    """For any hops and every file reached through them, one after the other (the route
    part remembered from the files before), the split rule says what the unsplit did."""
    owners, owner = who
    for resolved, uid, nlink in reversed(FILES) if backwards else FILES:
        args = {
            "declared": "/declared/tool",
            "resolved": resolved,
            "uid": uid,
            "nlink": nlink,
            "owners": owners,
            "owner": owner,
        }
        assert route_refusals(hops, **args) == reference_route_refusals(hops, **args)  # type: ignore[arg-type]


def test_the_file_reached_decides_a_sticky_hop_after_a_remembered_route() -> None:
    """The same sticky /tmp route, remembered for a root file, refuses a user's file in it
    and a root file with two links (the file part is never taken from the memo)."""
    route = [Hop("/", 0, stat.S_IFDIR | 0o755), Hop("/tmp", 0, stat.S_IFDIR | 0o1777)]
    common = {"declared": "/tmp/tool", "resolved": "/tmp/tool", "owners": (0,), "owner": "root"}
    assert route_refusals(route, uid=0, nlink=1, **common) == []  # type: ignore[arg-type]
    mine = route_refusals(route, uid=1000, nlink=1, **common)  # type: ignore[arg-type]
    assert [r.rule for r in mine] == ["directory-writable"]
    linked = route_refusals(route, uid=0, nlink=2, **common)  # type: ignore[arg-type]
    assert [r.rule for r in linked] == ["hardlink"]
