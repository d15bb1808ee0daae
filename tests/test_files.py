"""The fd-pinned adapter (capkeeper.files) and the one path resolver (capkeeper.paths).

Real files with real ``security.capability`` values in temporary directories,
``getcap``/``setcap`` as the reference, a real file system without extended
attributes (ramfs, mounted in a private mount namespace). Only errors the
kernel will not produce on demand are injected, at the adapter's own OS call
(``files._getxattr``/``_setxattr``/``_removexattr``/``_listxattr``) or through
:class:`capkeeper.paths.FdCalls` for a race at an exact point of the walk.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from capkeeper import files
from capkeeper.capabilities import parse
from capkeeper.errors import CapabilitiesNotKept, FileAccessError
from capkeeper.files import (
    REFUSED,
    REPLACED,
    Pins,
    RawCaps,
    caps_at,
    observe,
    observe_fd,
    open_declared,
    read_caps,
    remove_caps,
    write_caps,
)
from capkeeper.model import Hop, Kind
from capkeeper.paths import MAX_SYMLINKS, FdCalls, Walk, components
from tests.conftest import getcap, make_binary, require_root, require_tool, setcap

NET_RAW = parse("cap_net_raw=ep")


def _oserror(code: int) -> OSError:
    return OSError(code, os.strerror(code))


# -- observe / observe_fd --------------------------------------------------------------


def test_observe_reports_the_facts_of_a_real_binary(tree: Path) -> None:
    """Every field of the observation is what the kernel says about the file."""
    binary = make_binary(tree / "tool")
    setcap("cap_net_raw=ep", binary)
    seen = observe(str(binary), hash=True)
    st = os.stat(binary)
    assert (seen.path, seen.resolved) == (str(binary), str(binary))
    assert (seen.uid, seen.gid, seen.mode, seen.dev, seen.ino, seen.nlink) == (
        st.st_uid,
        st.st_gid,
        st.st_mode,
        st.st_dev,
        st.st_ino,
        st.st_nlink,
    )
    assert (seen.size, seen.mtime_ns) == (st.st_size, st.st_mtime_ns)
    assert seen.kind is Kind.ELF
    assert seen.elf is not None
    assert (seen.caps, seen.caps_problem, seen.xattr_supported) == (NET_RAW, None, True)
    assert seen.sha256 == hashlib.sha256(binary.read_bytes()).hexdigest()
    # The route: "/" first, then every directory down to the binary's, with its owner.
    assert seen.hops[0] == Hop("/", 0, os.stat("/").st_mode)
    assert [hop.path for hop in seen.hops] == ["/", *map(str, reversed(binary.parents[:-1]))]
    assert seen.hops[-1] == Hop(str(tree), 0, os.stat(tree).st_mode)


def test_observe_without_hash_and_without_caps(tree: Path) -> None:
    binary = make_binary(tree / "tool")
    seen = observe(str(binary))
    assert (seen.caps, seen.caps_problem, seen.sha256) == (None, None, None)


def test_observe_fd_tells_scripts_other_files_and_non_regular_files(tree: Path) -> None:
    """A script names its interpreter; a FIFO is opened with O_PATH, never read."""
    (tree / "script").write_bytes(b"#!/bin/sh -e\necho hi\n")
    (tree / "data").write_bytes(b"just data")
    os.mkfifo(tree / "fifo")
    kinds = {}
    for name in ("script", "data", "fifo"):
        with open_declared(str(tree / name)) as (fd, hops, resolved):
            seen = observe_fd(str(tree / name), fd, hops, resolved, hash=True)
            kinds[name] = (seen.kind, seen.interpreter, seen.sha256 is None)
    assert kinds == {
        "script": (Kind.SCRIPT, "/bin/sh -e", False),
        "data": (Kind.OTHER, "", False),
        "fifo": (Kind.NOT_REGULAR, "", True),
    }


def test_observe_inspects_again_content_changed_under_the_same_size_and_mtime(
    tree: Path,
) -> None:
    """The ELF facts are cached by identity: new content of the same size with its
    mtime set back (utimensat) still moves ctime, so it is inspected afresh, and
    the facts carried over our own setxattr are those of the unchanged file."""
    binary = make_binary(tree / "tool")
    first = observe(str(binary))
    assert first.elf is not None
    with open_declared(str(binary)) as (fd, _hops, _resolved):
        write_caps(fd, NET_RAW, path=str(binary))
    assert observe(str(binary)).elf == first.elf
    before = os.stat(binary)
    content = bytearray(binary.read_bytes())
    content[4] = 7  # EI_CLASS: neither ELFCLASS32 nor ELFCLASS64, no longer readable ELF
    with open(binary, "r+b") as handle:
        handle.write(content)
    os.utime(binary, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = os.stat(binary)
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    seen = observe(str(binary))
    assert seen.kind is Kind.ELF
    assert seen.elf is None


# -- write, read back, remove ------------------------------------------------------------


def test_write_caps_is_what_getcap_reads(tree: Path) -> None:
    binary = make_binary(tree / "tool")
    with open_declared(str(binary)) as (fd, _, _):
        write_caps(fd, parse("cap_net_bind_service,cap_net_raw=ep"), path=str(binary))
        assert read_caps(fd) == (parse("cap_net_bind_service,cap_net_raw=ep"), None)
    assert getcap(binary) == "cap_net_bind_service,cap_net_raw=ep"


def test_remove_caps_removes_and_absent_is_fine(tree: Path) -> None:
    binary = make_binary(tree / "tool")
    setcap("cap_net_raw=ep", binary)
    with open_declared(str(binary)) as (fd, _, _):
        remove_caps(fd, path=str(binary))
        remove_caps(fd, path=str(binary))  # ENODATA: already gone is not an error
        assert read_caps(fd) == (None, None)
    assert getcap(binary) == ""


def test_write_that_does_not_stick_is_reported(tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    binary = make_binary(tree / "tool")
    monkeypatch.setattr(files, "_setxattr", lambda fd, value: None)
    with open_declared(str(binary)) as (fd, _, _), pytest.raises(CapabilitiesNotKept) as info:
        write_caps(fd, NET_RAW, path=str(binary))
    assert "read back nothing" in info.value.message


# -- the errno policy ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "reason", "hint"),
    [
        (errno.EOPNOTSUPP, "extended attributes not supported", "does not support extended"),
        (errno.ENOSPC, "No space left on device", "other extended attributes fill the space"),
        (errno.E2BIG, "Argument list too long", "larger than this file system allows"),
        (errno.ERANGE, "Numerical result out of range", "too large for the kernel"),
        (errno.EPERM, "Operation not permitted", "CAP_SETFCAP"),
        (errno.EROFS, "Read-only file system", "ReadWritePaths="),
    ],
)
def test_write_errors_become_one_sentence_with_a_hint(
    tree: Path, monkeypatch: pytest.MonkeyPatch, code: int, reason: str, hint: str
) -> None:
    binary = make_binary(tree / "tool")

    def failing(fd: int, value: bytes) -> None:
        raise _oserror(code)

    monkeypatch.setattr(files, "_setxattr", failing)
    with open_declared(str(binary)) as (fd, _, _), pytest.raises(FileAccessError) as info:
        write_caps(fd, NET_RAW, path=str(binary))
    assert info.value.message == f"cannot write security.capability: {reason}"
    assert info.value.errno == code
    assert hint in (info.value.hint or "")
    assert getcap(binary) == ""


def test_remove_error_is_a_sentence(tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    binary = make_binary(tree / "tool")

    def failing(fd: int) -> None:
        raise _oserror(errno.EPERM)

    monkeypatch.setattr(files, "_removexattr", failing)
    with open_declared(str(binary)) as (fd, _, _), pytest.raises(FileAccessError) as info:
        remove_caps(fd, path=str(binary))
    assert info.value.message == "cannot remove security.capability: Operation not permitted"


@pytest.mark.parametrize("code", sorted(REFUSED))
def test_value_the_kernel_refuses_is_present_not_absent(
    tree: Path, monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    """EINVAL (v1, malformed) and EOVERFLOW (foreign v3): the kernel writes neither on
    demand today, so the read is injected; the file still counts as carrying a value."""
    binary = make_binary(tree / "tool")

    def refusing(target: int | str, *, follow_symlinks: bool = False) -> bytes:
        raise _oserror(code)

    monkeypatch.setattr(files, "_getxattr", refusing)
    seen = observe(str(binary))
    assert (seen.caps, seen.caps_problem) == (None, REFUSED[code])
    assert RawCaps(None, code).decode() == (None, REFUSED[code])


def test_malformed_value_is_a_problem_not_an_error() -> None:
    caps, problem = RawCaps(b"\x00\x00\x00\x02").decode()
    assert caps is None
    assert problem


def test_unsupported_read_means_no_xattrs_not_no_caps(
    tree: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    binary = make_binary(tree / "tool")

    def unsupported(target: int | str, *, follow_symlinks: bool = False) -> bytes:
        raise _oserror(errno.ENOTSUP)

    monkeypatch.setattr(files, "_getxattr", unsupported)
    seen = observe(str(binary))
    assert (seen.xattr_supported, seen.caps, seen.caps_problem) == (False, None, None)


def test_other_read_errors_are_sentences(tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    binary = make_binary(tree / "tool")

    def failing(target: int | str, *, follow_symlinks: bool = False) -> bytes:
        raise _oserror(errno.EACCES)

    monkeypatch.setattr(files, "_getxattr", failing)
    with pytest.raises(FileAccessError) as info:
        observe(str(binary))
    assert info.value.message == "cannot read: Permission denied"
    assert info.value.context == str(binary)


_RAMFS_PROBE = textwrap.dedent(
    """
    import json, sys
    from capkeeper.capabilities import parse
    from capkeeper.errors import FileAccessError
    from capkeeper.files import NO_XATTR, observe, open_declared, write_caps
    path = sys.argv[1]
    seen = observe(path)
    try:
        with open_declared(path) as (fd, _, _):
            write_caps(fd, parse("cap_net_raw=ep"), path=path)
        written = None
    except FileAccessError as exc:
        written = [exc.message, exc.hint, exc.errno]
    print(json.dumps({"supported": seen.xattr_supported, "caps": seen.caps is None,
                      "kind": seen.kind.value, "written": written}))
    """
)


def test_file_system_without_xattrs_is_told_apart(tree: Path) -> None:
    """ramfs keeps no extended attributes at all: observed as unsupported, and the
    write fails with the EOPNOTSUPP sentence (mounted in a private mount namespace)."""
    require_root()
    unshare = require_tool("unshare")
    mount = require_tool("mount")
    point = tree / "ramfs"
    point.mkdir()
    script = (
        f'{mount} -t ramfs -o mode=0755 none "$1" && cp "$2" "$1/tool" && '
        f'exec "$3" -c "$4" "$1/tool"'
    )
    result = subprocess.run(
        [unshare, "--mount", "--propagation", "private", "sh", "-c", script, "sh",
         str(point), shutil.which("true") or "/bin/true", sys.executable, _RAMFS_PROBE],
        capture_output=True, text=True, check=False, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    facts = json.loads(result.stdout)
    assert facts == {
        "supported": False,
        "caps": True,
        "kind": "elf",
        "written": [
            "cannot write security.capability: extended attributes not supported",
            "this file system does not support extended attributes",
            errno.EOPNOTSUPP,
        ],
    }
    assert not any(point.iterdir())  # the mount stayed in its namespace


# -- caps_at: the audit walker's read ----------------------------------------------------


def test_caps_at_reads_by_name_and_does_not_follow_symlinks(
    tree: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    capable = make_binary(tree / "capable")
    setcap("cap_net_raw=ep", capable)
    make_binary(tree / "plain")
    (tree / "link").symlink_to("capable")
    monkeypatch.chdir(tree)
    raw = caps_at("capable")
    assert raw is not None
    assert raw.decode() == (NET_RAW, None)
    assert caps_at(str(capable)) == raw
    assert caps_at("plain") is None
    assert caps_at("link") is None  # the symlink itself carries nothing
    assert caps_at("gone") is None  # removed since the directory was read


@pytest.mark.parametrize("code", [errno.ENOTSUP, errno.ENODATA, errno.ENOENT])
def test_caps_at_nothing_there(tree: Path, monkeypatch: pytest.MonkeyPatch, code: int) -> None:
    """No xattrs on this file system, or the file went away: nothing found, no error."""
    capable = make_binary(tree / "capable")
    setcap("cap_net_raw=ep", capable)

    def failing(target: int | str, *, follow_symlinks: bool = False) -> bytes:
        raise _oserror(code)

    monkeypatch.setattr(files, "_getxattr", failing)
    assert caps_at(str(capable)) is None


def test_caps_at_errors_name_the_call(tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    capable = make_binary(tree / "capable")
    setcap("cap_net_raw=ep", capable)

    def refused(target: int | str, *, follow_symlinks: bool = False) -> bytes:
        raise _oserror(errno.EINVAL)

    monkeypatch.setattr(files, "_getxattr", refused)
    assert caps_at(str(capable)) == RawCaps(None, errno.EINVAL)

    def denied(target: int | str, *, follow_symlinks: bool = False) -> bytes:
        raise _oserror(errno.EACCES)

    monkeypatch.setattr(files, "_getxattr", denied)
    with pytest.raises(FileAccessError) as info:
        caps_at(str(capable))
    assert info.value.message == "cannot read security.capability: Permission denied"

    def unlistable(name: str) -> list[str]:
        raise _oserror(errno.EACCES)

    monkeypatch.setattr(files, "_listxattr", unlistable)
    with pytest.raises(FileAccessError) as info:
        caps_at(str(capable))
    assert info.value.message == "cannot list attributes: Permission denied"


# -- the walk: symlink hops, O_NOFOLLOW, races ---------------------------------------------


def test_symlink_hops_are_recorded_and_followed(tree: Path) -> None:
    """A relative release symlink and an absolute one are hops of their own; the file
    reached is the target's, and '..' after a symlink goes to the target's parent."""
    release = tree / "releases" / "v1" / "bin"
    release.mkdir(parents=True)
    binary = make_binary(release / "tool")
    (tree / "current").symlink_to("releases/v1")
    (tree / "abs").symlink_to(release)
    for declared in (
        f"{tree}/current/bin/tool",
        f"{tree}/abs/tool",
        f"{tree}/current/bin/../bin/./tool",
    ):
        with open_declared(declared) as (fd, hops, resolved):
            assert resolved == str(binary)
            assert os.fstat(fd).st_ino == binary.stat().st_ino
        links = [hop for hop in hops if hop.is_symlink]
        assert len(links) == 1
        assert links[0].uid == 0
        assert links[0].target in ("releases/v1", str(release))
        assert hops[-1].path == str(release)


def test_declared_symlink_is_a_hop_and_its_target_is_the_file(tree: Path) -> None:
    binary = make_binary(tree / "tool-1.2")
    (tree / "tool").symlink_to("tool-1.2")
    seen = observe(str(tree / "tool"))
    assert seen.resolved == str(binary)
    assert seen.hops[-1] == Hop(
        str(tree / "tool"), 0, os.lstat(tree / "tool").st_mode, is_symlink=True, target="tool-1.2"
    )


@pytest.mark.parametrize(
    ("setup", "code"),
    [
        ("missing", errno.ENOENT),
        ("file-as-directory", errno.ENOTDIR),
        ("loop", errno.ELOOP),
        ("dotdot-last", errno.EISDIR),  # ends on a directory already entered
    ],
)
def test_walk_failures_carry_their_errno(tree: Path, setup: str, code: int) -> None:
    if setup == "file-as-directory":
        make_binary(tree / "bin")
        declared = f"{tree}/bin/tool"
    elif setup == "loop":
        (tree / "a").symlink_to("b")
        (tree / "b").symlink_to("a")
        declared = f"{tree}/a/tool"
    elif setup == "dotdot-last":
        declared = f"{tree}/../../.."
    else:
        declared = f"{tree}/missing"
    with pytest.raises(FileAccessError) as info, open_declared(declared):
        pass
    assert info.value.errno == code


def test_forty_symlinks_are_followed_and_the_forty_first_is_a_loop(tree: Path) -> None:
    """The kernel's MAXSYMLINKS: the same count as open(2) itself."""
    make_binary(tree / "tool")
    (tree / "l0").symlink_to("tool")
    for number in range(1, MAX_SYMLINKS + 1):
        (tree / f"l{number}").symlink_to(f"l{number - 1}")
    with open_declared(f"{tree}/l{MAX_SYMLINKS - 1}") as (_, hops, resolved):
        assert resolved == str(tree / "tool")
        assert sum(hop.is_symlink for hop in hops) == MAX_SYMLINKS
    os.stat(tree / f"l{MAX_SYMLINKS - 1}")  # the kernel agrees: 40 is fine
    with pytest.raises(OSError, match="symbolic links") as kernel:
        os.stat(tree / f"l{MAX_SYMLINKS}")
    with pytest.raises(FileAccessError) as ours, open_declared(f"{tree}/l{MAX_SYMLINKS}"):
        pass
    assert (ours.value.errno, kernel.value.errno) == (errno.ELOOP, errno.ELOOP)


class _SwapBeforeFinalOpen(FdCalls):
    """Runs ``swap`` once, just before the final component is opened (after its stat)."""

    def __init__(self, name: str, swap: object) -> None:
        self.name = name
        self.swap = swap
        self.swapped = 0

    def open(self, path: str, flags: int, *, dir_fd: int | None = None) -> int:
        if path == self.name and not flags & os.O_DIRECTORY and not self.swapped:
            self.swapped += 1
            self.swap()  # type: ignore[operator]
        return super().open(path, flags, dir_fd=dir_fd)


def test_final_component_turned_symlink_is_not_followed(tree: Path) -> None:
    """A symlink put in place of the file between its stat and its open is not
    followed (O_NOFOLLOW: ELOOP), so the walk never opens the symlink's target."""
    binary = make_binary(tree / "tool")
    elsewhere = make_binary(tree / "elsewhere")
    setcap("cap_net_raw=ep", elsewhere)

    def swap() -> None:
        (tree / "tmp-link").symlink_to(elsewhere)
        os.replace(tree / "tmp-link", binary)

    calls = _SwapBeforeFinalOpen("tool", swap)
    with pytest.raises(FileAccessError) as info, open_declared(str(binary), calls=calls):
        pass
    assert calls.swapped == 1
    assert info.value.errno == errno.ELOOP
    assert getcap(elsewhere) == "cap_net_raw=ep"


def test_file_replaced_between_stat_and_open_is_refused(tree: Path) -> None:
    """Another inode renamed over the name between stat and open: EAGAIN, REPLACED,
    and the descriptor of the newcomer is closed, never handed out."""
    binary = make_binary(tree / "tool")
    newcomer = make_binary(tree / "new")

    def swap() -> None:
        os.replace(newcomer, binary)

    before = len(os.listdir("/proc/self/fd"))
    calls = _SwapBeforeFinalOpen("tool", swap)
    with pytest.raises(FileAccessError) as info, open_declared(str(binary), calls=calls):
        pass
    assert calls.swapped == 1
    assert info.value.errno == errno.EAGAIN
    assert info.value.message.startswith(REPLACED)
    assert len(os.listdir("/proc/self/fd")) == before  # every descriptor closed


def test_directory_renamed_after_it_was_opened_keeps_the_walk_pinned(tree: Path) -> None:
    """The walk goes on from the directory's descriptor: renaming an attacker's
    directory over the path after it was entered does not redirect the open."""
    real = tree / "bin"
    real.mkdir()
    binary = make_binary(real / "tool")
    decoy = tree / "decoy"
    decoy.mkdir()
    make_binary(decoy / "tool")

    class SwapDirectories(FdCalls):
        def stat(self, name: str, *, dir_fd: int) -> os.stat_result:
            if name == "tool" and not (tree / "old").exists():
                os.rename(real, tree / "old")
                os.rename(decoy, real)
            return super().stat(name, dir_fd=dir_fd)

    with open_declared(str(binary), calls=SwapDirectories()) as (fd, _, resolved):
        assert resolved == str(binary)
        assert os.fstat(fd).st_ino == (tree / "old" / "tool").stat().st_ino


class _CountingCalls(FdCalls):
    """The real calls, counting the opens."""

    def __init__(self) -> None:
        self.opens = 0

    def open(self, path: str, flags: int, *, dir_fd: int | None = None) -> int:
        self.opens += 1
        return super().open(path, flags, dir_fd=dir_fd)


def test_pins_share_the_walk_of_a_directory_and_see_its_mode_now(tree: Path) -> None:
    """The second entry of a batch in a directory is opened from the pinned
    descriptor (one open, not one per component), with the same route; the
    directory's own mode is read again at each use; every descriptor is closed."""
    (tree / "bin").mkdir(mode=0o755)
    first, second = make_binary(tree / "bin" / "one"), make_binary(tree / "bin" / "two")
    before = len(os.listdir("/proc/self/fd"))
    calls = _CountingCalls()
    with Pins(calls=calls) as pins:
        with open_declared(str(first), calls=calls, pins=pins) as (_fd, hops_one, _):
            pass
        walked = calls.opens
        os.chmod(tree / "bin", 0o757)
        with open_declared(str(second), calls=calls, pins=pins) as (fd, hops_two, resolved):
            assert os.fstat(fd).st_ino == second.stat().st_ino
            assert resolved == str(second)
        assert calls.opens == walked + 1
        assert walked == len(components(str(first))) + 1  # "/" and every component
    assert [hop.path for hop in hops_two] == [hop.path for hop in hops_one]
    assert hops_two[:-1] == hops_one[:-1]
    assert stat.S_IMODE(hops_one[-1].mode) == 0o755
    assert stat.S_IMODE(hops_two[-1].mode) == 0o757
    assert len(os.listdir("/proc/self/fd")) == before


def test_pins_walk_from_the_root_for_a_final_symlink_and_a_missing_name(tree: Path) -> None:
    """A final symlink is never resolved from a pin: the full walk records it as a
    hop, as without pins; a missing name is ENOENT as without pins."""
    (tree / "bin").mkdir(mode=0o755)
    target = make_binary(tree / "target")
    first = make_binary(tree / "bin" / "one")
    (tree / "bin" / "link").symlink_to(target)
    with Pins() as pins:
        with open_declared(str(first), pins=pins):
            pass
        with open_declared(str(tree / "bin" / "link"), pins=pins) as (fd, hops, resolved):
            assert os.fstat(fd).st_ino == target.stat().st_ino
        with open_declared(str(tree / "bin" / "link")) as (_fd, unpinned, _resolved):
            pass
        with (
            pytest.raises(FileAccessError) as info,
            open_declared(str(tree / "bin" / "gone"), pins=pins),
        ):
            pass
    assert resolved == str(target)
    assert hops == unpinned
    assert any(hop.is_symlink and hop.target == str(target) for hop in hops)
    assert info.value.errno == errno.ENOENT


def test_pins_keep_a_bounded_number_of_directories_open(tree: Path) -> None:
    binaries = []
    for index in range(5):
        (tree / f"d{index}").mkdir(mode=0o755)
        binaries.append(make_binary(tree / f"d{index}" / "tool"))
    before = len(os.listdir("/proc/self/fd"))
    with Pins(limit=2) as pins:
        for binary in binaries:
            with open_declared(str(binary), pins=pins):
                pass
            assert len(os.listdir("/proc/self/fd")) <= before + 2
    assert len(os.listdir("/proc/self/fd")) == before


def test_directory_mode_opens_a_directory_for_listing(tree: Path) -> None:
    (tree / "d").mkdir()
    (tree / "d" / "x.toml").write_text("")
    with open_declared(str(tree / "d"), directory=True) as (fd, hops, resolved):
        assert stat.S_ISDIR(os.fstat(fd).st_mode)
        assert os.listdir(fd) == ["x.toml"]
        assert resolved == str(tree / "d")
        assert hops[-1].path == str(tree)


# -- paths.Walk, the algorithm itself ------------------------------------------------------


def test_components_drop_empty_names_and_dots() -> None:
    assert components("//a/./b//../c/") == ["a", "b", "..", "c"]


def test_walk_releases_handles_on_dotdot_absolute_symlink_and_close() -> None:
    released: list[str] = []
    walk: Walk[str] = Walk("/a/../b/c/d", "root", release=released.append)
    assert walk.next_name() == "a"
    walk.enter("A", "/a")
    assert walk.next_name() == "b"  # ".." released A
    assert released == ["A"]
    walk.enter("B", "/b")
    assert walk.next_name() == "c"
    assert walk.follow("/x/y")
    assert released == ["A", "B"]  # an absolute target restarts at "/"
    assert walk.directory == ("root", "/")
    assert [walk.next_name(), walk.next_name()] == ["x", "y"]
    assert not walk.last
    assert walk.next_name() == "d"
    assert walk.last
    assert walk.next_name() is None
    walk.close()
    assert released == ["A", "B", "root"]


def test_walk_dotdot_of_root_is_root() -> None:
    walk: Walk[str] = Walk("/../../a", "/")
    assert walk.next_name() == "a"
    assert walk.directory == ("/", "/")


def test_walk_counts_symlinks_to_the_kernel_limit() -> None:
    walk: Walk[str] = Walk("/a", "/")
    assert all(walk.follow("a") for _ in range(MAX_SYMLINKS))
    assert not walk.follow("a")
