"""Mounts over watched directories: the daemon follows the mount table.

inotify reports no mounts: a file system mounted over a watched directory (or
over one of its parents) hides the inode the watch is on, and an unmount
reveals another one. Each daemon here runs as a real ``python -m capkeeper
watch`` in a private mount namespace of its own (``unshare -m --propagation
private``); every mount is made inside that namespace (``nsenter``), never in
the host's, and vanishes with the daemon. Files are reached as the daemon sees
them through ``/proc/PID/root``. The periodic rescan is an hour away, so only
the mount handling can repair anything.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import make_binary, require_root, require_tool
from tests.idle import measure_idle
from tests.test_daemon import (
    SECLUDED,
    XATTR,
    DaemonProcess,
    caps_of,
    new_build,
    seen_by,
    spawn,
    spawn_secluded,
    wait_caps,
    write_state,
)

__all__ = ["spawn"]  # the fixture, imported for pytest

CAPS = "cap_net_raw=+ep"


def _private_namespace() -> tuple[str, ...]:
    require_root()
    return (require_tool("unshare"), "-m", "--propagation", "private")


def in_namespace(daemon: DaemonProcess, *argv: str | Path) -> None:
    """Run ``argv`` (a mount or umount) in the daemon's mount namespace."""
    nsenter = require_tool("nsenter")
    subprocess.run(
        [nsenter, "-t", str(daemon.pid), "-m", "--", *map(str, argv)],
        check=True,
        capture_output=True,
    )


def deploy(target: Path, tag: bytes) -> None:
    """A rename-over deploy of a new, capability-less build (rsync, dpkg, mv)."""
    staged = target.with_name(f".{target.name}.new")
    new_build(staged, tag)
    os.rename(staged, target)


def echoed(daemon: DaemonProcess, path: Path, since: int) -> None:
    """Wait until the daemon handled the IN_ATTRIB its own restore after ``since`` raised
    (otherwise it coalesces with the next deploy's events and names that batch's cause)."""
    daemon.wait_event(
        lambda e: (
            e.get("event") == "capability_in_sync"
            and e.get("path") == str(path)
            and e.get("cause") == "IN_ATTRIB"
        ),
        since,
    )


@pytest.fixture
def namespaced(
    tree: Path, spawn: Callable[..., DaemonProcess]
) -> Callable[[dict[Path, str]], DaemonProcess]:
    """Start a daemon on ``entries`` in a private mount namespace; wait until it settled."""
    wrapper = _private_namespace()

    def start(entries: dict[Path, str]) -> DaemonProcess:
        daemon = spawn(write_state(tree.parent / "state.toml", entries), prefix=wrapper)
        daemon.wait_ready()
        daemon.settled(*entries)
        return daemon

    return start


def test_tmpfs_mounted_over_the_binary_directory_is_watched(
    tree: Path, namespaced: Callable[[dict[Path, str]], DaemonProcess]
) -> None:
    """A tmpfs over the binary's directory, then a deploy into it: restored within seconds."""
    bindir = tree / "app" / "bin"
    bindir.mkdir(parents=True)
    os.chmod(bindir.parent, 0o755)
    binary = make_binary(bindir / "tool")
    daemon = namespaced({binary: CAPS})
    since = daemon.mark()
    in_namespace(daemon, "mount", "-t", "tmpfs", "-o", "mode=0755", "capkeeper-test", bindir)
    deploy(seen_by(daemon, binary), b"into-tmpfs")
    wait_caps(seen_by(daemon, binary), CAPS)
    # Seen as the deploy, or (if the deploy came first) by the rescan of the mount.
    assert daemon.restored(binary, since)["cause"] in ("IN_MOVED_TO", "mount")
    # The hidden original was never touched: it kept its capabilities in the host's view.
    assert caps_of(binary) is not None


def test_bind_mount_of_a_release_over_a_parent(
    tree: Path, namespaced: Callable[[dict[Path, str]], DaemonProcess]
) -> None:
    """A new release bind-mounted over a parent: its binary is restored, and so is the next
    rename-over deploy into the mounted directory."""
    app = tree / "app"
    (app / "bin").mkdir(parents=True)
    os.chmod(app, 0o755)
    binary = make_binary(app / "bin" / "tool")
    release = tree / "release2"
    (release / "bin").mkdir(parents=True)
    os.chmod(release, 0o755)
    released = new_build(release / "bin" / "tool", b"release2")
    daemon = namespaced({binary: CAPS})
    since = daemon.mark()
    in_namespace(daemon, "mount", "--bind", release, app)
    wait_caps(released, CAPS)  # the same inode as the daemon's view of the binary
    assert daemon.restored(binary, since)["cause"] == "mount"
    echoed(daemon, binary, since)
    since = daemon.mark()
    deploy(seen_by(daemon, binary), b"release2-hotfix")
    wait_caps(seen_by(daemon, binary), CAPS)
    assert daemon.restored(binary, since)["cause"] == "IN_MOVED_TO"
    assert caps_of(binary) is not None, "the hidden original was left alone"


def test_unmount_reveals_a_stripped_binary_which_is_restored(
    tree: Path, namespaced: Callable[[dict[Path, str]], DaemonProcess]
) -> None:
    """Stripped while hidden under a mount: restored as soon as the unmount reveals it."""
    bindir = tree / "app" / "bin"
    bindir.mkdir(parents=True)
    os.chmod(bindir.parent, 0o755)
    binary = make_binary(bindir / "tool")
    daemon = namespaced({binary: CAPS})
    in_namespace(daemon, "mount", "-t", "tmpfs", "-o", "mode=0755", "capkeeper-test", bindir)
    time.sleep(0.5)
    # The host's namespace still sees the original: strip it there. The daemon sees the
    # empty tmpfs at that path, so nothing it may do now can repair the original.
    os.removexattr(binary, XATTR)
    time.sleep(0.5)
    assert caps_of(binary) is None
    since = daemon.mark()
    in_namespace(daemon, "umount", bindir)
    wait_caps(binary, CAPS)
    assert daemon.restored(binary, since)["cause"] in ("mount", "IN_UNMOUNT", "IN_IGNORED")
    echoed(daemon, binary, since)
    # And the revealed directory is watched again.
    since = daemon.mark()
    deploy(seen_by(daemon, binary), b"after-umount")
    wait_caps(binary, CAPS)
    assert daemon.restored(binary, since)["cause"] == "IN_MOVED_TO"


def test_mount_table_wakes_the_daemon_only_when_it_changes(
    tree: Path, spawn: Callable[..., DaemonProcess]
) -> None:
    """The open mountinfo wakes the daemon once per mount, never while nothing changes."""
    daemon, binary = spawn_secluded(spawn, tree, CAPS)
    fds = Path(f"/proc/{daemon.pid}/fd")
    held = [os.readlink(fd) for fd in fds.iterdir()]
    assert any(link.endswith("/mountinfo") for link in held), held
    unrelated = SECLUDED / "elsewhere"
    os.mkdir(seen_by(daemon, unrelated))
    watched: list[str | Path] = ["/", seen_by(daemon, SECLUDED)]
    idle = measure_idle(daemon.pid, watched, 2.0)
    assert idle.wakeups <= idle.events, idle
    assert idle.cpu <= 0.05 + 0.001 * idle.events, idle
    since = daemon.mark()
    in_namespace(daemon, "mount", "-t", "tmpfs", "capkeeper-test", unrelated)
    changed = daemon.wait_event(lambda e: e.get("event") == "mounts_changed", since)
    assert changed["mount_points"] == [str(unrelated)]
    assert changed["entries"] == 0
    # The change was taken: the descriptor does not stay ready (no busy loop).
    idle = measure_idle(daemon.pid, watched, 2.0)
    assert idle.wakeups <= idle.events, idle
    assert idle.cpu <= 0.05 + 0.001 * idle.events, idle
    assert [e for e in daemon.events()[since:] if e.get("event") == "rescan"] == []
    assert caps_of(seen_by(daemon, binary)) is not None
