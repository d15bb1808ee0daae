"""trust.assess, the trust policy, with built Entry/Observation/Hop values: no files.

One row per rule and per exception: the rules that must refuse, in the order
:func:`capkeeper.trust.assess` gives them, and nothing else.
"""

from __future__ import annotations

import stat
from typing import Any

import pytest

from capkeeper.capabilities import CapSet, parse
from capkeeper.elf import EIClass, EIData, ElfFacts, ElfType
from capkeeper.model import Entry, Hop, Kind, Observation
from capkeeper.trust import (
    ROUTE_RULES,
    assess,
    declaration_refusals,
    file_refusals,
    removal_blocker,
)

LAST_CAP = 40
USER = 1000
OTHER = 2000
DIR = stat.S_IFDIR | 0o755
STICKY = stat.S_IFDIR | 0o1777
LINK = stat.S_IFLNK | 0o777
FILE = stat.S_IFREG | 0o755
NET_RAW = parse("cap_net_raw=ep", last_cap=LAST_CAP)
ROOT_ROUTE = (Hop("/", 0, DIR), Hop("/opt", 0, DIR), Hop("/opt/app", 0, DIR))
PLAIN_ELF = ElfFacts(EIClass.C64, EIData.LSB, ElfType.DYN, 62, "/lib64/ld-linux-x86-64.so.2", True)


def observed(**changes: Any) -> Observation:
    """A trusted root-owned ELF /opt/app/tool on a root-only route, changed by ``changes``."""
    base = Observation(
        path="/opt/app/tool",
        resolved="/opt/app/tool",
        hops=ROOT_ROUTE,
        uid=0,
        gid=0,
        mode=FILE,
        dev=1,
        ino=2,
        kind=Kind.ELF,
        interpreter="",
        caps=None,
        caps_problem=None,
        sha256=None,
        elf=PLAIN_ELF,
    )
    return base._replace(**changes)


def declared(**changes: Any) -> Entry:
    base = Entry(path="/opt/app/tool", caps=NET_RAW, caps_text="cap_net_raw=ep")
    return base._replace(**changes)


def _route(*hops: Hop) -> tuple[Hop, ...]:
    return (Hop("/", 0, DIR), *hops)


CASES: list[tuple[str, Entry, Observation, tuple[str, ...]]] = [
    ("trusted", declared(), observed(), ()),
    # -- the route
    (
        "directory owned by a user",
        declared(),
        observed(hops=_route(Hop("/opt", 0, DIR), Hop("/opt/app", USER, DIR))),
        ("directory-owner",),
    ),
    (
        "group-writable directory",
        declared(),
        observed(hops=_route(Hop("/opt", 0, DIR), Hop("/opt/app", 0, stat.S_IFDIR | 0o775))),
        ("directory-writable",),
    ),
    (
        "world-writable directory without sticky bit",
        declared(),
        observed(hops=_route(Hop("/opt", 0, stat.S_IFDIR | 0o777), Hop("/opt/app", 0, DIR))),
        ("directory-writable",),
    ),
    (
        "sticky root directory holding a root-owned file",
        declared(path="/tmp/tool"),
        observed(path="/tmp/tool", resolved="/tmp/tool", hops=_route(Hop("/tmp", 0, STICKY))),
        (),
    ),
    (
        "sticky root directory holding a user's directory",
        declared(path="/tmp/d/tool"),
        observed(
            path="/tmp/d/tool",
            resolved="/tmp/d/tool",
            hops=_route(Hop("/tmp", 0, STICKY), Hop("/tmp/d", USER, DIR)),
        ),
        ("directory-writable", "directory-owner"),
    ),
    (
        "sticky root directory holding a user's file",
        declared(path="/tmp/tool"),
        observed(
            path="/tmp/tool", resolved="/tmp/tool", hops=_route(Hop("/tmp", 0, STICKY)), uid=USER
        ),
        ("directory-writable", "owner"),
    ),
    (
        "sticky directory owned by a user",
        declared(path="/tmp/tool"),
        observed(path="/tmp/tool", resolved="/tmp/tool", hops=_route(Hop("/tmp", USER, STICKY))),
        ("directory-owner", "directory-writable"),
    ),
    (
        "hard link in a sticky directory",
        declared(path="/tmp/tool"),
        observed(
            path="/tmp/tool", resolved="/tmp/tool", hops=_route(Hop("/tmp", 0, STICKY)), nlink=2
        ),
        ("hardlink",),
    ),
    (
        "hard link in a root-only directory",
        declared(),
        observed(nlink=3),
        (),
    ),
    (
        "symlink owned by a user",
        declared(path="/opt/current/tool"),
        observed(
            path="/opt/current/tool",
            hops=(
                *ROOT_ROUTE[:2],
                Hop("/opt/current", USER, LINK, is_symlink=True, target="app"),
                ROOT_ROUTE[2],
            ),
        ),
        ("symlink",),
    ),
    (
        "symlink owned by root",
        declared(path="/opt/current/tool"),
        observed(
            path="/opt/current/tool",
            hops=(
                *ROOT_ROUTE[:2],
                Hop("/opt/current", 0, LINK, is_symlink=True, target="app"),
                ROOT_ROUTE[2],
            ),
        ),
        (),
    ),
    (
        "route into /proc",
        declared(path="/opt/app/tool"),
        observed(
            resolved="/proc/1/root/tool",
            hops=(
                *ROOT_ROUTE[:2],
                Hop("/opt/app", 0, LINK, is_symlink=True, target="/proc/1/root"),
                Hop("/proc", 0, stat.S_IFDIR | 0o555),
                Hop("/proc/1", 0, stat.S_IFDIR | 0o555),
                Hop("/proc/1/root", 0, DIR),
            ),
        ),
        ("pseudo-fs",),
    ),
    (
        "file in /sys itself",
        declared(path="/sys/tool"),
        observed(path="/sys/tool", resolved="/sys/tool", hops=_route(Hop("/sys", 0, DIR))),
        ("pseudo-fs",),
    ),
    # -- the declared owner
    (
        "declared owner owns the file and its directory",
        declared(owner="app", owner_uid=USER),
        observed(uid=USER, hops=_route(Hop("/opt", 0, DIR), Hop("/opt/app", USER, DIR))),
        (),
    ),
    (
        "declared owner, but root owns the file",
        declared(owner="app", owner_uid=USER),
        observed(uid=0),
        ("owner",),
    ),
    (
        "declared owner, directory of a third user",
        declared(owner="app", owner_uid=USER),
        observed(uid=USER, hops=_route(Hop("/opt", 0, DIR), Hop("/opt/app", OTHER, DIR))),
        ("directory-owner",),
    ),
    (
        "declared owner's symlink",
        declared(owner="app", owner_uid=USER),
        observed(
            uid=USER,
            hops=(*ROOT_ROUTE, Hop("/opt/app/tool", USER, LINK, is_symlink=True, target="t")),
        ),
        (),
    ),
    # -- the file
    ("not a regular file", declared(), observed(kind=Kind.NOT_REGULAR, elf=None), ("regular",)),
    (
        "script",
        declared(),
        observed(kind=Kind.SCRIPT, interpreter="/bin/sh", elf=None),
        ("elf",),
    ),
    ("neither ELF nor script", declared(), observed(kind=Kind.OTHER, elf=None), ("elf",)),
    (
        "interpreter by content",
        declared(),
        observed(elf=PLAIN_ELF._replace(exports=frozenset({"Py_BytesMain"}))),
        ("interpreter",),
    ),
    (
        "interpreter by linked runtime",
        declared(),
        observed(elf=PLAIN_ELF._replace(needed=("libperl.so.5.36",))),
        ("interpreter",),
    ),
    (
        "the dynamic loader",
        declared(),
        observed(elf=PLAIN_ELF._replace(interp=None, soname="ld-linux-x86-64.so.2")),
        ("interpreter",),
    ),
    (
        "interpreter by name, content unreadable",
        declared(path="/opt/app/python3.11"),
        observed(resolved="/opt/app/python3.11", elf=None),
        ("interpreter",),
    ),
    (
        "interpreter allowed",
        declared(allow_interpreter=True),
        observed(elf=PLAIN_ELF._replace(exports=frozenset({"Py_BytesMain"}))),
        (),
    ),
    ("setuid", declared(), observed(mode=FILE | stat.S_ISUID), ("setuid",)),
    ("setgid", declared(), observed(mode=FILE | stat.S_ISGID), ("setuid",)),
    ("owned by a user", declared(), observed(uid=USER), ("owner",)),
    ("group-writable file", declared(), observed(mode=stat.S_IFREG | 0o775), ("file-writable",)),
    ("world-writable file", declared(), observed(mode=stat.S_IFREG | 0o757), ("file-writable",)),
    # -- the content pin
    ("sha256 matches", declared(sha256="a" * 64), observed(sha256="a" * 64), ()),
    ("sha256 differs", declared(sha256="a" * 64), observed(sha256="b" * 64), ("sha256",)),
    ("sha256 not computed", declared(sha256="a" * 64), observed(sha256=None), ("sha256",)),
    # -- the declaration
    (
        "capability beyond the kernel's last",
        declared(caps=CapSet(permitted=1 << 41 | 1 << 13, effective=True)),
        observed(),
        ("kernel",),
    ),
    (
        "inheritable not declared on purpose",
        declared(caps=parse("cap_net_raw=eip", last_cap=LAST_CAP)),
        observed(),
        ("inheritable",),
    ),
    (
        "inheritable declared on purpose",
        declared(caps=parse("cap_net_raw=eip", last_cap=LAST_CAP), allow_inheritable=True),
        observed(),
        (),
    ),
    # -- everything at once, in assess's order
    (
        "every rule",
        declared(
            owner="app",
            owner_uid=USER,
            sha256="a" * 64,
            caps=CapSet(permitted=1 << 41, inheritable=1 << 13),
        ),
        observed(
            hops=_route(Hop("/opt", OTHER, stat.S_IFDIR | 0o777)),
            resolved="/opt/tool",
            uid=OTHER,
            mode=stat.S_IFREG | 0o6777,
            kind=Kind.OTHER,
            elf=None,
        ),
        (
            "directory-owner",
            "directory-writable",
            "elf",
            "setuid",
            "owner",
            "file-writable",
            "sha256",
            "kernel",
            "inheritable",
        ),
    ),
]


@pytest.mark.parametrize(
    ("entry", "observation", "rules"),
    [pytest.param(e, o, r, id=name) for name, e, o, r in CASES],
)
def test_assess_table(entry: Entry, observation: Observation, rules: tuple[str, ...]) -> None:
    refusals = assess(entry, observation, last_cap=LAST_CAP)
    assert tuple(refusal.rule for refusal in refusals) == rules
    for refusal in refusals:
        assert refusal.about_route == (refusal.rule in ROUTE_RULES)
        if refusal.about_route:
            assert refusal.component  # names the directory or symlink at fault


def test_assess_messages_name_the_fault_and_the_fix() -> None:
    entry = declared(owner="app", owner_uid=USER)
    observation = observed(
        uid=OTHER,
        mode=stat.S_IFREG | 0o775,
        hops=_route(
            Hop("/opt", 0, DIR),
            Hop("/opt/link", OTHER, LINK, is_symlink=True, target="app"),
            Hop("/opt/app", 0, stat.S_IFDIR | 0o757),
        ),
        kind=Kind.SCRIPT,
        interpreter="/usr/bin/env python3",
    )
    shown = [str(refusal) for refusal in assess(entry, observation, last_cap=LAST_CAP)]
    assert shown == [
        "symlink /opt/link -> app is owned by uid 2000, not by app "
        "(hint: only root may own symlinks on the path to a privileged binary)",
        "directory /opt/app is writable by others (mode 0757) (hint: chmod go-w /opt/app)",
        "/opt/app/tool is a script (#!/usr/bin/env python3); the kernel ignores file "
        "capabilities on scripts (hint: give the service AmbientCapabilities= in its unit "
        "instead)",
        "/opt/app/tool is owned by uid 2000, not by app (hint: chown app /opt/app/tool)",
        "/opt/app/tool is writable by group (mode 0775) (hint: chmod go-w /opt/app/tool)",
    ]


def test_untrusted_text_in_a_refusal_is_escaped() -> None:
    """A symlink target is anybody's text: it is shown escaped, never as a new line."""
    observation = observed(
        hops=(*ROOT_ROUTE, Hop("/opt/app/x", USER, LINK, is_symlink=True, target="t\nforged")),
    )
    (refusal,) = assess(declared(), observation, last_cap=LAST_CAP)
    assert "\n" not in str(refusal)


_USER_DIR = _route(Hop("/opt", 0, DIR), Hop("/opt/app", USER, DIR))


@pytest.mark.parametrize(
    ("entry", "observation", "rules", "blocker"),
    [
        (declared(), observed(), (), None),
        # A file rule on a root-only route: the file is the declared one, fail closed.
        (declared(), observed(uid=USER), ("owner",), None),
        (
            declared(),
            observed(hops=_USER_DIR),
            ("directory-owner",),
            "the route to it is not trusted",
        ),
        # Trusted, but the declared owner chose the route: they may point it anywhere.
        (
            declared(owner="app", owner_uid=USER),
            observed(hops=_USER_DIR, uid=USER),
            (),
            "directory /opt/app on the route to it is owned by uid 1000, not by root",
        ),
    ],
)
def test_removal_blocker_table(
    entry: Entry, observation: Observation, rules: tuple[str, ...], blocker: str | None
) -> None:
    """Capabilities are only ever removed from the file a root-only route names."""
    refusals = assess(entry, observation, last_cap=LAST_CAP)
    assert tuple(r.rule for r in refusals) == rules
    assert removal_blocker(observation, refusals) == blocker


def test_file_rule_is_the_state_rule() -> None:
    """The one owner/writable rule: any of the owners, no group/other write bit."""
    assert file_refusals("/f", 0, stat.S_IFREG | 0o644, owners=(0,), owner="root") == []
    assert [
        r.rule for r in file_refusals("/f", 5, stat.S_IFREG | 0o1777, owners=(0,), owner="root")
    ] == ["owner", "file-writable"]


def test_declaration_rule_is_the_state_rule() -> None:
    caps = CapSet(permitted=1 << 41 | 1 << 40, inheritable=1 << 13)
    refusals = declaration_refusals(caps, allow_inheritable=False, last_cap=39)
    assert [(r.rule, r.message) for r in refusals] == [
        ("kernel", "cap_checkpoint_restore, 41 not known to this kernel (last capability is 39)"),
        ("inheritable", "inheritable capabilities need allow_inheritable = true"),
    ]
