"""One security test per trust rule: each proves that nothing was granted."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from capkeeper.capabilities import format_text, parse
from capkeeper.enforce import reconcile
from capkeeper.files import XATTR_NAME
from capkeeper.model import Entry, Hop, Kind, Observation
from capkeeper.reconcile import Status
from capkeeper.trust import assess
from tests.conftest import getcap, make_binary, setcap

NOBODY = 65534


def _entry(path: Path, **kw: object) -> Entry:
    caps = parse("cap_net_bind_service=+ep", last_cap=40)
    return Entry(path=str(path), caps=caps, caps_text=format_text(caps, last_cap=40), **kw)  # type: ignore[arg-type]


def _refused(entry: Entry) -> str:
    """Apply ``entry``; assert it was refused and nothing was written; return the reason."""
    outcome = reconcile(entry, write=True)
    assert outcome.status is Status.REFUSED
    target = outcome.resolved or entry.path
    assert XATTR_NAME not in os.listxattr(target)
    return outcome.reason


def test_group_writable_binary(tree: Path) -> None:
    """A group-writable binary is refused."""
    binary = make_binary(tree / "app", mode=0o775)
    assert _refused(_entry(binary)) == (
        f"{binary} is writable by group (mode 0775) (hint: chmod go-w {binary})"
    )


def test_world_writable_binary(tree: Path) -> None:
    """A world-writable binary is refused."""
    binary = make_binary(tree / "app", mode=0o757)
    assert _refused(_entry(binary)) == (
        f"{binary} is writable by others (mode 0757) (hint: chmod go-w {binary})"
    )


def test_directory_owned_by_non_root_user(tree: Path) -> None:
    """A binary in a directory a non-root user owns (and so can replace it) is refused."""
    directory = tree / "userdir"
    directory.mkdir(mode=0o755)
    os.chown(directory, NOBODY, NOBODY)
    binary = make_binary(directory / "app")
    assert _refused(_entry(binary)) == (
        f"directory {directory} is owned by uid {NOBODY}, not by root "
        "(hint: whoever owns a directory can replace the binary inside it)"
    )


def test_directory_writable_by_others(tree: Path) -> None:
    """A binary in a world-writable, non-sticky directory is refused."""
    directory = tree / "open"
    directory.mkdir()
    os.chmod(directory, 0o777)
    binary = make_binary(directory / "app")
    assert _refused(_entry(binary)) == (
        f"directory {directory} is writable by group and others (mode 0777) "
        f"(hint: chmod go-w {directory})"
    )


def test_sticky_directory_with_root_owned_child_is_trusted(tree: Path) -> None:
    """A root-owned sticky world-writable directory is fine when the next component is root's."""
    sticky = tree / "sticky"
    sticky.mkdir()
    os.chmod(sticky, 0o1777)
    binary = make_binary(sticky / "app")
    assert reconcile(_entry(binary), write=True).status is Status.RESTORED


def test_sticky_directory_with_user_owned_child_is_refused(tree: Path) -> None:
    """In a sticky directory, a component owned by another user could be swapped: refused."""
    sticky = tree / "sticky"
    sticky.mkdir()
    os.chmod(sticky, 0o1777)
    sub = sticky / "sub"
    sub.mkdir(mode=0o755)
    os.chown(sub, NOBODY, NOBODY)
    binary = make_binary(sub / "app")
    reason = _refused(_entry(binary))
    assert f"directory {sticky} is writable by group and others (mode 1777)" in reason
    assert f"directory {sub} is owned by uid {NOBODY}, not by root" in reason


def test_symlink_planted_by_non_root_user(tree: Path) -> None:
    """A symlink on the path owned by a non-root user is refused, even to a good binary."""
    real = tree / "real"
    real.mkdir(mode=0o755)
    make_binary(real / "app")
    link = tree / "current"
    link.symlink_to("real")
    os.lchown(link, NOBODY, NOBODY)
    assert _refused(_entry(link / "app")) == (
        f"symlink {link} -> real is owned by uid {NOBODY}, not by root "
        "(hint: only root may own symlinks on the path to a privileged binary)"
    )


def test_final_symlink_owned_by_non_root(tree: Path) -> None:
    """A declared path that is itself a user-owned symlink is refused."""
    binary = make_binary(tree / "app")
    link = tree / "app-link"
    link.symlink_to(binary)
    os.lchown(link, NOBODY, NOBODY)
    assert _refused(_entry(link)).startswith(f"symlink {link} -> {binary} is owned by uid {NOBODY}")


def test_script_is_refused_with_hint(tree: Path) -> None:
    """A #! script is refused with a hint about AmbientCapabilities=."""
    script = make_binary(tree / "run.sh", content=b"#!/bin/sh\necho hi\n")
    assert _refused(_entry(script)) == (
        f"{script} is a script (#!/bin/sh); the kernel ignores file capabilities on scripts "
        "(hint: give the service AmbientCapabilities= in its unit instead)"
    )


def test_non_elf_file_is_refused(tree: Path) -> None:
    """A regular file that is not ELF is refused."""
    data = make_binary(tree / "data", content=b"hello")
    assert _refused(_entry(data)) == f"{data} is not an ELF executable"


def test_setuid_binary(tree: Path) -> None:
    """A setuid binary is refused: setuid and file capabilities do not compose."""
    binary = make_binary(tree / "app", mode=0o4755)
    assert _refused(_entry(binary)) == (
        f"{binary} is setuid/setgid (mode 4755); file capabilities and setuid do not compose "
        f"(hint: chmod ug-s {binary})"
    )


def test_sha256_mismatch(tree: Path) -> None:
    """Content that does not match the pin is refused."""
    binary = make_binary(tree / "app")
    digest = hashlib.sha256(binary.read_bytes()).hexdigest()
    pin = "0" * 64
    assert _refused(_entry(binary, sha256=pin)) == (
        f"{binary} content does not match the sha256 pin (found {digest}, pinned {pin}) "
        "(hint: update the pin in the state if this build is trusted)"
    )


def test_wrong_owner(tree: Path) -> None:
    """A binary owned by someone other than the declared owner is refused."""
    binary = make_binary(tree / "app")
    os.chown(binary, NOBODY, NOBODY)
    assert _refused(_entry(binary)) == (
        f"{binary} is owned by uid {NOBODY}, not by root (hint: chown root {binary})"
    )


def test_declared_owner_is_accepted(tree: Path) -> None:
    """A binary owned by its declared owner (in a root-owned directory) is granted."""
    binary = make_binary(tree / "app")
    os.chown(binary, NOBODY, NOBODY)
    entry = _entry(binary, owner="nobody", owner_uid=NOBODY)
    assert reconcile(entry, write=True).status is Status.RESTORED


def test_fifo_is_not_opened_for_reading(tree: Path) -> None:
    """A FIFO at the declared path is refused without blocking on open."""
    fifo = tree / "fifo"
    os.mkfifo(fifo, 0o644)
    outcome = reconcile(_entry(fifo), write=True)
    assert outcome.status is Status.REFUSED
    assert outcome.reason == f"{fifo} is not a regular file"


def test_pinned_content_changed_by_mmap_loses_its_capabilities(tree: Path) -> None:
    """A shared-mmap write keeps the xattr; capkeeper then refuses and removes it."""
    import mmap

    binary = make_binary(tree / "app")
    digest = hashlib.sha256(binary.read_bytes()).hexdigest()
    entry = _entry(binary, sha256=digest)
    assert reconcile(entry, write=True).status is Status.RESTORED
    with open(binary, "r+b") as handle, mmap.mmap(handle.fileno(), 0) as mapped:
        mapped[-1] ^= 0xFF  # the kernel does not strip capabilities for mmap writes
        mapped.flush()
    assert XATTR_NAME in os.listxattr(binary), "precondition: the mmap write kept the caps"
    check = reconcile(entry, write=False)
    assert check.status is Status.REFUSED
    assert XATTR_NAME in os.listxattr(binary), "check mode changes nothing"
    outcome = reconcile(entry, write=True)
    assert outcome.status is Status.REFUSED
    assert outcome.reason.endswith("; its capabilities (cap_net_bind_service=ep) were removed")
    assert XATTR_NAME not in os.listxattr(binary)


def test_loosened_file_revokes_existing_capabilities(tree: Path) -> None:
    """Capabilities granted before the file became group-writable are taken away."""
    binary = make_binary(tree / "app")
    assert reconcile(_entry(binary), write=True).status is Status.RESTORED
    os.chmod(binary, 0o775)
    assert _refused(_entry(binary)) == (
        f"{binary} is writable by group (mode 0775) (hint: chmod go-w {binary})"
        "; its capabilities (cap_net_bind_service=ep) were removed"
    )


def test_loosened_directory_changes_nothing(tree: Path) -> None:
    """Once a directory on the route is group-writable, the file there may be anybody's:
    it is refused and left as it is (the group could have moved any capable binary in)."""
    directory = tree / "bin"
    directory.mkdir(mode=0o755)
    binary = make_binary(directory / "app")
    assert reconcile(_entry(binary), write=True).status is Status.RESTORED
    os.chmod(directory, 0o775)
    outcome = reconcile(_entry(binary), write=True)
    assert outcome.status is Status.REFUSED
    assert outcome.reason == (
        f"directory {directory} is writable by group (mode 0775) (hint: chmod go-w {directory})"
        f"; nothing was changed on {binary} (it keeps cap_net_bind_service=ep): the route to "
        "it is not trusted"
    )
    assert getcap(binary) == "cap_net_bind_service=ep"


def test_declared_owner_file_loosened_on_a_root_route_fails_closed(tree: Path) -> None:
    """A declared owner other than root still loses the capabilities of its own file once
    it is refused, when only root owns the route: the path names that very file."""
    binary = make_binary(tree / "app")
    os.chown(binary, NOBODY, NOBODY)
    entry = _entry(binary, owner="nobody", owner_uid=NOBODY)
    assert reconcile(entry, write=True).status is Status.RESTORED
    os.chmod(binary, 0o775)
    assert _refused(entry).endswith("; its capabilities (cap_net_bind_service=ep) were removed")


def test_route_through_the_declared_owners_directory_changes_nothing(tree: Path) -> None:
    """A directory owned by the entry's (non-root) owner is a route that owner controls:
    the file it reaches is that owner's choice (a symlink to any binary), so a refused
    file there keeps its capabilities, whatever rule refused it."""
    directory = tree / "home"
    directory.mkdir(mode=0o755)
    os.chown(directory, NOBODY, NOBODY)
    binary = make_binary(directory / "app")
    os.chown(binary, NOBODY, NOBODY)
    entry = _entry(binary, owner="nobody", owner_uid=NOBODY)
    assert reconcile(entry, write=True).status is Status.RESTORED
    os.chmod(binary, 0o775)
    outcome = reconcile(entry, write=True)
    assert outcome.status is Status.REFUSED
    assert outcome.reason.endswith(
        f"; nothing was changed on {binary} (it keeps cap_net_bind_service=ep): directory "
        f"{directory} on the route to it is owned by uid {NOBODY}, not by root"
    )
    assert getcap(binary) == "cap_net_bind_service=ep"


def test_path_through_proc_is_refused(tree: Path) -> None:
    """/proc/self/exe would grant capabilities to whatever runs capkeeper: refused."""
    outcome = reconcile(_entry(Path("/proc/self/exe")), write=False)
    assert outcome.status is Status.REFUSED
    assert "/proc/self/exe leads into /proc or /sys" in outcome.reason


def test_hard_linked_file_in_sticky_directory_is_refused(tree: Path) -> None:
    """A root-owned name in a sticky world-writable dir proves nothing if it is a hard link."""
    sticky = tree / "sticky"
    sticky.mkdir()
    os.chmod(sticky, 0o1777)
    binary = make_binary(tree / "real")
    os.link(binary, sticky / "app")
    assert _refused(_entry(sticky / "app")) == (
        f"{sticky / 'app'} has 2 hard links and sits in world-writable {sticky}, where anyone "
        "could have linked it (hint: keep managed binaries in directories only root can write)"
    )


def test_hard_link_in_sticky_directory_does_not_strip_the_linked_binary(tree: Path) -> None:
    """With fs.protected_hardlinks=0 anyone could link any capable binary to a declared
    name in a sticky directory: refused, and the linked binary keeps its capabilities."""
    sticky = tree / "sticky"
    sticky.mkdir()
    os.chmod(sticky, 0o1777)
    ping = make_binary(tree / "ping")
    setcap("cap_net_raw=ep", ping)
    os.link(ping, sticky / "app")  # as root: protected_hardlinks=1 stops users here
    outcome = reconcile(_entry(sticky / "app"), write=True)
    assert outcome.status is Status.REFUSED
    assert outcome.reason.endswith(
        f"; nothing was changed on {sticky / 'app'} (it keeps cap_net_raw=ep): the route to "
        "it is not trusted"
    )
    assert getcap(ping) == "cap_net_raw=ep"


def test_interpreter_is_refused_unless_allowed(tree: Path) -> None:
    """Capabilities on an interpreter go to every script it runs: refused by default."""
    python = make_binary(tree / "python3.11")
    assert _refused(_entry(python)) == (
        f"{python} runs other code: its name looks like an interpreter; every script it runs "
        "would get these capabilities "
        "(hint: give the one service that needs them AmbientCapabilities= in its unit, or "
        "declare allow_interpreter = true if you really mean it)"
    )
    allowed = _entry(python, allow_interpreter=True)
    assert reconcile(allowed, write=True).status is Status.RESTORED


def test_each_refusal_knows_whether_it_is_about_the_route() -> None:
    """Route rules (who controls the way there) and file rules (what is there) are told
    apart by the refusal itself: only a file refusal lets reconcile fail closed."""
    hops = (
        Hop("/", 0, 0o40755),
        Hop("/home", 0, 0o40777),  # writable by others, not sticky
        Hop("/home/u", NOBODY, 0o40755),  # owned by a user
        Hop("/home/u/link", NOBODY, 0o120777, is_symlink=True, target="/proc/1/root/x"),
        Hop("/proc", 0, 0o40555),
    )
    observation = Observation(
        path="/home/u/link",
        resolved="/proc/1/root/x",
        hops=hops,
        uid=NOBODY,
        gid=0,
        mode=0o106777,  # setuid, setgid, world-writable
        dev=1,
        ino=2,
        kind=Kind.SCRIPT,
        interpreter="/bin/sh",
        caps=None,
        caps_problem=None,
        sha256="1" * 64,
    )
    caps = parse("cap_net_raw=eip", last_cap=40)
    entry = Entry("/home/u/link", caps, "cap_net_raw=eip", sha256="0" * 64)
    refusals = assess(entry, observation, last_cap=12)
    assert {r.rule: r.about_route for r in refusals} == {
        "directory-writable": True,
        "directory-owner": True,
        "symlink": True,
        "pseudo-fs": True,
        "elf": False,
        "setuid": False,
        "owner": False,
        "file-writable": False,
        "sha256": False,
        "kernel": False,
        "inheritable": False,
    }
