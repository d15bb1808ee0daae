"""The watch plan, event decoding and the inotify watcher, on real directories."""

from __future__ import annotations

import errno
import os
import posixpath
import select
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pyinotify
import pytest
from hypothesis import given
from hypothesis import strategies as st

from capkeeper.watcher import (
    DIRECTORY_MASK,
    Change,
    Link,
    Route,
    Watcher,
    WatchEvent,
    WatchPlan,
    decode_event,
    describe_watch_errno,
    parse_events,
    plan_route,
    plan_routes,
)


def _kernel_watches(watcher: Watcher) -> int:
    """inotify watches the kernel holds on the watcher's descriptor."""
    info = "".join(Path(f"/proc/self/fdinfo/{fd}").read_text() for fd in watcher.inotify_fds())
    return sum(1 for line in info.splitlines() if line.startswith("inotify wd:"))


def _read_until(watcher: Watcher, wanted: str, timeout: float = 2.0) -> list[WatchEvent]:
    """Read events until one named ``wanted`` arrives (bounded by ``timeout``)."""
    poller = select.poll()
    poller.register(watcher.fileno(), select.POLLIN)
    seen: list[WatchEvent] = []
    remaining = int(timeout * 1000)
    while remaining > 0:
        if not poller.poll(100):
            remaining -= 100
            continue
        seen.extend(watcher.read())
        if any(e.name == wanted or (not wanted and not e.name) for e in seen):
            return seen
    raise AssertionError(f"no event for {wanted!r} within {timeout}s: {seen}")


# -- plan_route ---------------------------------------------------------------------


def test_route_of_existing_file_goes_through_every_directory(tmp_path: Path) -> None:
    """Every directory from / to the binary is on the route; the binary is the final link."""
    (tmp_path / "a" / "bin").mkdir(parents=True)
    (tmp_path / "a" / "bin" / "tool").write_bytes(b"x")
    route = plan_route(str(tmp_path / "a" / "bin" / "tool"))
    assert route.complete
    assert route.links[0] == Link("/", tmp_path.parts[1], final=False)
    assert route.links[-1] == Link(str(tmp_path / "a" / "bin"), "tool", final=True)
    assert route.directories[-2:] == (str(tmp_path / "a"), str(tmp_path / "a" / "bin"))
    assert not any(link.final for link in route.links[:-1])


def test_route_of_missing_binary_ends_in_its_directory(tmp_path: Path) -> None:
    """A missing binary is still watched for by name in its (existing) directory."""
    route = plan_route(str(tmp_path / "later"))
    assert route.complete
    assert route.links[-1] == Link(str(tmp_path), "later", final=True)


def test_route_with_missing_directory_stops_at_deepest_existing(tmp_path: Path) -> None:
    """A missing intermediate directory is watched for by name in its existing parent."""
    route = plan_route(str(tmp_path / "no" / "such" / "tool"))
    assert not route.complete
    assert route.links[-1] == Link(str(tmp_path), "no", final=False)


def test_route_through_relative_symlink_continues_in_target(tmp_path: Path) -> None:
    """A release symlink is a link of its own; the route goes on in the release directory."""
    (tmp_path / "r1" / "bin").mkdir(parents=True)
    (tmp_path / "current").symlink_to("r1")
    route = plan_route(str(tmp_path / "current" / "bin" / "tool"))
    assert Link(str(tmp_path), "current", final=False) in route.links
    assert Link(str(tmp_path), "r1", final=False) in route.links
    assert route.links[-1] == Link(str(tmp_path / "r1" / "bin"), "tool", final=True)


def test_route_through_absolute_symlink_restarts_at_root(tmp_path: Path) -> None:
    """An absolute symlink target is resolved from / as the kernel does."""
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    route = plan_route(str(tmp_path / "link" / "tool"))
    assert route.links[-1] == Link(str(tmp_path / "real"), "tool", final=True)
    assert route.links.count(Link("/", tmp_path.parts[1], final=False)) == 2


def test_route_final_symlink_is_not_the_binary(tmp_path: Path) -> None:
    """A declared path that is itself a symlink: the link re-plans, its target is the binary."""
    (tmp_path / "tool-1.2").write_bytes(b"x")
    (tmp_path / "tool").symlink_to("tool-1.2")
    route = plan_route(str(tmp_path / "tool"))
    assert route.links[-2:] == (
        Link(str(tmp_path), "tool", final=False),
        Link(str(tmp_path), "tool-1.2", final=True),
    )


def test_routes_planned_together_are_those_planned_one_by_one(tmp_path: Path) -> None:
    """plan_routes looks each name up once for all paths and gives the same routes,
    through symlinks, loops and missing directories, with shared links."""
    (tmp_path / "r1" / "bin").mkdir(parents=True)
    (tmp_path / "r1" / "bin" / "tool").write_bytes(b"x")
    (tmp_path / "current").symlink_to("r1")
    (tmp_path / "loop").symlink_to("loop")
    (tmp_path / "r1" / "bin" / "link").symlink_to("tool")
    (tmp_path / "r1" / "bin-link").symlink_to("bin")
    paths = [
        str(tmp_path / "r1" / "bin" / "tool"),
        str(tmp_path / "r1" / "bin" / "other"),
        str(tmp_path / "r1" / "bin" / "link"),
        str(tmp_path / "r1" / "bin" / ".." / "bin" / "tool"),
        str(tmp_path / "r1" / "bin" / ".." / "tool"),
        str(tmp_path / "r1" / "bin" / ".."),
        str(tmp_path / "r1" / "bin-link" / "tool"),
        str(tmp_path / "r1" / "bin-link" / "other"),
        str(tmp_path / "current" / "bin" / "tool"),
        str(tmp_path / "current" / "bin" / "other"),
        str(tmp_path / "loop" / "tool"),
        str(tmp_path / "loop" / "other"),
        str(tmp_path / "no" / "such" / "tool"),
        str(tmp_path / "no" / "such" / "other"),
        str(tmp_path / "r1" / "bin" / "tool" / "below"),
        str(tmp_path / "r1" / "bin" / "tool" / "other"),
        str(tmp_path / "r1" / "bin" / "link" / "below"),
        str(tmp_path / "r1" / "bin" / "tool") + "/",
        str(tmp_path / ("x" * 300)) + "/tool",
        str(tmp_path / ("x" * 300)) + "/other",
        "/tool-not-there",
    ]
    together = list(plan_routes(paths))
    assert together == [plan_route(path) for path in paths]
    assert together[0].links[0] is together[1].links[0]


def test_route_of_symlink_loop_ends(tmp_path: Path) -> None:
    """A symlink loop ends the route (the kernel gives ELOOP) instead of spinning."""
    (tmp_path / "a").symlink_to("b")
    (tmp_path / "b").symlink_to("a")
    route = plan_route(str(tmp_path / "a" / "tool"))
    assert not route.complete
    assert len(route.links) < 100


def test_route_through_file_where_directory_expected(tmp_path: Path) -> None:
    """A regular file in place of a directory ends the route there, watched by name."""
    (tmp_path / "bin").write_bytes(b"not a directory")
    route = plan_route(str(tmp_path / "bin" / "tool"))
    assert not route.complete
    assert route.links[-1] == Link(str(tmp_path), "bin", final=False)


def test_route_with_dotdot_follows_resolved_parent(tmp_path: Path) -> None:
    """'..' after a symlink goes to the parent of the symlink's target, like the kernel."""
    (tmp_path / "x" / "y").mkdir(parents=True)
    (tmp_path / "l").symlink_to("x/y")
    route = plan_route(str(tmp_path / "l" / ".." / "tool"))
    assert route.links[-1] == Link(str(tmp_path / "x"), "tool", final=True)


# -- WatchPlan ------------------------------------------------------------------------


def _route(path: str, *links: tuple[str, str, bool]) -> Route:
    return Route(path, tuple(Link(d, n, f) for d, n, f in links), complete=True)


def test_plan_shares_directories_between_entries() -> None:
    """Two binaries in one directory cost one watch per directory, not two."""
    plan = WatchPlan()
    plan.set_route(_route("/d/a", ("/", "d", False), ("/d", "a", True)))
    plan.set_route(_route("/d/b", ("/", "d", False), ("/d", "b", True)))
    assert plan.directories() == {"/", "/d"}
    assert plan.through("/") == {"/d/a", "/d/b"}
    assert dict(plan.lookup("/d", "a")) == {"/d/a": Link("/d", "a", True)}
    assert dict(plan.lookup("/", "d")) == {
        "/d/a": Link("/", "d", False),
        "/d/b": Link("/", "d", False),
    }
    assert not plan.lookup("/d", "other")


def test_plan_replaces_and_removes_routes() -> None:
    """An unchanged route is a no-op; a changed one moves its directories; removal frees them."""
    plan = WatchPlan()
    first = _route("/d/a", ("/", "d", False), ("/d", "a", True))
    assert plan.set_route(first)
    assert not plan.set_route(first)
    assert plan.set_route(_route("/d/a", ("/", "e", False), ("/e", "a", True)))
    assert plan.directories() == {"/", "/e"}
    assert not plan.lookup("/d", "a")
    plan.remove("/d/a")
    assert plan.directories() == frozenset()
    assert len(plan) == 0


_DIRS = ("/", "/a", "/a/b", "/c")
_NAMES = ("a", "b", "x")
_links = st.builds(Link, st.sampled_from(_DIRS), st.sampled_from(_NAMES), st.just(False))
_routes = st.builds(
    lambda path, way, last, final, complete: Route(
        path, (*way, *([Link(last[0], last[1], final)] if last else [])), complete
    ),
    st.sampled_from(("/p1", "/p2", "/p3", "/a/b/x")),
    st.lists(_links, max_size=4).map(tuple),
    st.one_of(st.none(), st.tuples(st.sampled_from(_DIRS), st.sampled_from(_NAMES))),
    st.booleans(),
    st.booleans(),
)
_operations = st.lists(st.one_of(_routes, st.sampled_from(("/p1", "/p2", "/p3"))), max_size=12)


@given(_operations)
def test_plan_index_answers_as_a_scan_of_its_routes(operations: list[Route | str]) -> None:
    """Whatever routes are set and removed, every question to the plan's index gets
    the answer a scan of the installed routes gives (the last link through a name
    is an entry's link there)."""
    plan = WatchPlan()
    routes: dict[str, Route] = {}
    for operation in operations:
        version = plan.version
        if isinstance(operation, Route):
            changed = routes.get(operation.path) != operation
            assert plan.set_route(operation) == changed
            routes[operation.path] = operation
        else:
            changed = operation in routes
            plan.remove(operation)
            routes.pop(operation, None)
        assert (plan.version != version) == changed
        assert len(plan) == len(routes)
        assert plan.paths == routes.keys()
        links = [(path, link) for path, route in routes.items() for link in route.links]
        assert plan.directories() == {link.directory for _, link in links}
        for directory in {*_DIRS, "/p1", "/a/b/x"}:
            assert plan.through(directory) == {
                p for p, link in links if link.directory == directory
            }
            assert set(plan.links_in(directory)) == {
                (p, link) for p, link in links if link.directory == directory
            }
            assert plan.names_in(directory) == {
                link.name for _, link in links if link.directory == directory
            }
            assert plan.at_or_below(directory) == {
                p
                for p, link in links
                if link.directory == directory
                or link.directory.startswith(directory.rstrip("/") + "/")
                or (directory != "/" and (link.directory, link.name) == posixpath.split(directory))
            }
            for name in _NAMES:
                expected = {
                    p: link for p, link in links if (link.directory, link.name) == (directory, name)
                }
                assert dict(plan.lookup(directory, name)) == expected
                assert plan.concerns(directory, name) == bool(expected)


# -- decoding -------------------------------------------------------------------------


def test_decode_event_predicates() -> None:
    """Raw masks decode into typed predicates; IN_ISDIR becomes is_dir."""
    moved = decode_event(pyinotify.IN_MOVED_TO, "tool", "/d")
    assert (moved.is_namespace, moved.is_write, moved.cause) == (True, False, "IN_MOVED_TO")
    assert moved.path == "/d/tool"
    write = decode_event(pyinotify.IN_MODIFY, "tool", "/d")
    assert (write.is_write, write.is_write_closed, write.is_namespace) == (True, False, False)
    closed = decode_event(pyinotify.IN_CLOSE_WRITE, "tool", "/d")
    assert (closed.is_write_closed, closed.cause) == (True, "IN_CLOSE_WRITE")
    attrib = decode_event(pyinotify.IN_ATTRIB, "tool", "/d")
    assert (attrib.is_attrib, attrib.is_namespace) == (True, False)
    created = decode_event(pyinotify.IN_CREATE | pyinotify.IN_ISDIR, "sub", "/d")
    assert (created.is_created, created.is_dir, created.is_namespace) == (True, True, True)
    gone = decode_event(pyinotify.IN_DELETE_SELF, "", "/d")
    assert (gone.is_directory_gone, gone.path) == (True, "/d")
    ignored = decode_event(pyinotify.IN_IGNORED, "", "/d")
    assert (ignored.is_watch_ended, ignored.is_directory_gone) == (True, True)
    overflow = decode_event(pyinotify.IN_Q_OVERFLOW, "", "")
    assert (overflow.is_overflow, overflow.cause) == (True, "IN_Q_OVERFLOW")
    assert decode_event(0x10, "x", "/d").changes == Change(0)  # IN_CLOSE_NOWRITE: not ours


def test_decode_event_predicates_agree_with_the_flags_for_every_mask() -> None:
    """Every combination of the known bits (and IN_ISDIR, and a bit we do not know):
    each predicate and the cause say what the Change flags say."""
    members = list(Change)
    order = [Change.Q_OVERFLOW, Change.MOVED_TO, Change.MOVED_FROM, Change.DELETE]
    order += [Change.CREATE, Change.CLOSE_WRITE, Change.MODIFY, Change.ATTRIB]
    order += [Change.DELETE_SELF, Change.MOVE_SELF, Change.UNMOUNT, Change.IGNORED]
    assert sorted(order) == sorted(members)
    gone = Change.DELETE_SELF | Change.MOVE_SELF | Change.UNMOUNT | Change.IGNORED
    namespace = Change.CREATE | Change.DELETE | Change.MOVED_FROM | Change.MOVED_TO
    for combination in range(1 << len(members)):
        changes = Change(0)
        for bit, member in enumerate(members):
            if combination >> bit & 1:
                changes |= member
        for name in ("", "tool"):
            event = decode_event(
                int(changes) | pyinotify.IN_ISDIR | pyinotify.IN_CLOSE_NOWRITE, name, "/d"
            )
            assert event.changes == changes
            assert event.is_dir
            assert event.is_overflow == bool(changes & Change.Q_OVERFLOW)
            assert event.is_directory_gone == (not name and bool(changes & gone))
            assert event.is_watch_ended == bool(changes & Change.IGNORED)
            assert event.is_namespace == bool(changes & namespace)
            assert event.is_created == bool(changes & Change.CREATE)
            assert event.is_write == bool(changes & Change.MODIFY)
            assert event.is_write_closed == bool(changes & Change.CLOSE_WRITE)
            assert event.is_attrib == bool(changes & Change.ATTRIB)
            first = next((m for m in order if changes & m), None)
            assert event.cause == (f"IN_{first.name}" if first is not None else "inotify")


def test_parse_events_splits_buffer_and_keeps_undecodable_names() -> None:
    """The kernel's packed records split correctly; a non-UTF-8 name survives (fsdecode)."""
    name = b"caf\xe9\0\0\0\0"  # Latin-1 name, NUL padded as the kernel does
    data = struct.pack("iIII", 3, pyinotify.IN_CREATE, 0, len(name)) + name
    data += struct.pack("iIII", -1, pyinotify.IN_Q_OVERFLOW, 0, 0)
    records = list(parse_events(data))
    assert records == [
        (3, pyinotify.IN_CREATE, 0, os.fsdecode(b"caf\xe9")),
        (-1, pyinotify.IN_Q_OVERFLOW, 0, ""),
    ]


def test_watch_errno_sentences_say_what_to_do() -> None:
    """Failed watches become sentences naming the limit to raise."""
    assert "fs.inotify.max_user_watches" in describe_watch_errno(errno.ENOSPC)
    assert "sysctl" in describe_watch_errno(errno.ENOSPC)
    assert "fs.inotify.max_user_instances" in describe_watch_errno(errno.EMFILE)
    assert "read access" in describe_watch_errno(errno.EACCES)
    assert describe_watch_errno(errno.EIO) == os.strerror(errno.EIO)


# -- the watcher on real directories -------------------------------------------------


def test_watcher_watches_directories_once_and_syncs(tmp_path: Path) -> None:
    """sync adds and removes kernel watches; the count matches /proc fdinfo."""
    for name in ("a", "b", "c"):
        (tmp_path / name).mkdir()
    with Watcher() as watcher:
        assert watcher.sync([str(tmp_path / "a"), str(tmp_path / "b")]) == []
        assert watcher.watch_count == 2 == _kernel_watches(watcher)
        assert watcher.sync([str(tmp_path / "b"), str(tmp_path / "c")]) == []
        assert watcher.directories == {str(tmp_path / "b"), str(tmp_path / "c")}
        assert watcher.watch_count == 2 == _kernel_watches(watcher)


def test_added_since_names_the_watches_added_after_a_mark(tmp_path: Path) -> None:
    """added_since(mark): the directories whose watch came after the mark, a watch dropped
    and added again included (a look before then was not watched), none dropped since,
    by capkeeper or by the kernel."""
    for name in ("a", "b", "c"):
        (tmp_path / name).mkdir()
    a, b, c = (str(tmp_path / name) for name in ("a", "b", "c"))
    with Watcher() as watcher:
        watcher.sync([a, b])
        mark = watcher.mark()
        assert watcher.added_since(mark) == set()
        watcher.sync([a, b, c])
        assert watcher.added_since(mark) == {c}
        assert watcher.invalidate(a)
        assert watcher.added_since(mark) == {c}
        watcher.sync([a, b, c])
        assert watcher.added_since(mark) == {a, c}
        watcher.sync([b])
        assert watcher.added_since(mark) == set()
        assert watcher.added_since(watcher.mark()) == set()
        watcher.sync([b, c])
        os.rmdir(c)  # the kernel ends its watch (IN_IGNORED)
        events = _read_until(watcher, "")
        while not any(e.is_watch_ended for e in events):
            events += _read_until(watcher, "")
        assert watcher.directories == {b}
        assert watcher.added_since(mark) == set()


def test_watcher_decodes_real_events(tmp_path: Path) -> None:
    """A rename-over arrives as IN_MOVED_TO for the name, in the watched directory."""
    directory = tmp_path / "bin"
    directory.mkdir()
    (tmp_path / "new").write_bytes(b"x")
    with Watcher() as watcher:
        watcher.sync([str(directory)])
        os.rename(tmp_path / "new", directory / "tool")
        events = _read_until(watcher, "tool")
    moved = [e for e in events if e.name == "tool"]
    assert moved == [WatchEvent(str(directory), "tool", Change.MOVED_TO)]


def test_watcher_mask_sees_in_place_write_and_attrib(tmp_path: Path) -> None:
    """An in-place write shows as IN_MODIFY then IN_CLOSE_WRITE; a chmod as IN_ATTRIB."""
    (tmp_path / "tool").write_bytes(b"x")
    with Watcher(mask=DIRECTORY_MASK) as watcher:
        watcher.sync([str(tmp_path)])
        with open(tmp_path / "tool", "ab") as handle:
            handle.write(b"y")
        os.chmod(tmp_path / "tool", 0o700)
        events = _read_until(watcher, "tool")
        while not any(e.is_attrib for e in events):
            events += _read_until(watcher, "tool")
    kinds = [e.cause for e in events if e.name == "tool"]
    assert kinds == ["IN_MODIFY", "IN_CLOSE_WRITE", "IN_ATTRIB"]


def test_watcher_reports_removed_directory_and_forgets_it(tmp_path: Path) -> None:
    """rmdir of a watched directory ends its watch (IN_IGNORED) and the watcher forgets it."""
    directory = tmp_path / "gone"
    directory.mkdir()
    with Watcher() as watcher:
        watcher.sync([str(directory)])
        directory.rmdir()
        events = _read_until(watcher, "")
        while not any(e.is_watch_ended for e in events):
            events += _read_until(watcher, "")
        assert all(e.directory == str(directory) for e in events)
        assert any(e.is_directory_gone for e in events)
        assert watcher.directories == frozenset()
        assert watcher.watch_count == 0 == _kernel_watches(watcher)


def test_watcher_invalidate_drops_subtree(tmp_path: Path) -> None:
    """invalidate forgets a renamed directory and everything watched below it."""
    (tmp_path / "p" / "q").mkdir(parents=True)
    (tmp_path / "pq").mkdir()
    with Watcher() as watcher:
        wanted = [
            str(tmp_path),
            str(tmp_path / "p"),
            str(tmp_path / "p" / "q"),
            str(tmp_path / "pq"),
        ]
        watcher.sync(wanted)
        assert watcher.invalidate(str(tmp_path / "p"))
        assert watcher.directories == {str(tmp_path), str(tmp_path / "pq")}
        assert not watcher.invalidate(str(tmp_path / "p"))
        assert watcher.sync(wanted) == []
        assert watcher.watch_count == 4 == _kernel_watches(watcher)


def test_watcher_failed_watches_are_readable(tmp_path: Path) -> None:
    """A vanished directory and a file where a directory was fail with errno and a reason."""
    (tmp_path / "file").write_bytes(b"x")
    with Watcher() as watcher:
        failures = watcher.sync([str(tmp_path / "missing"), str(tmp_path / "file")])
    by_dir = {f.directory: f for f in failures}
    assert by_dir[str(tmp_path / "missing")].errno == errno.ENOENT
    assert by_dir[str(tmp_path / "missing")].vanished
    assert by_dir[str(tmp_path / "file")].errno == errno.ENOTDIR
    assert by_dir[str(tmp_path / "file")].reason == "not a directory (any more)"


def test_watcher_reports_queue_overflow(tmp_path: Path) -> None:
    """More events than max_queued_events yield one overflow event through default_proc_fun."""
    limit = int(Path("/proc/sys/fs/inotify/max_queued_events").read_text())
    with Watcher() as watcher:
        watcher.sync([str(tmp_path)])
        for number in range(limit // 2 + 50):  # IN_CREATE + IN_CLOSE_WRITE per file
            os.close(os.open(tmp_path / f"f{number}", os.O_CREAT | os.O_WRONLY, 0o600))
        events = watcher.read()
    assert sum(e.is_overflow for e in events) == 1
    assert len(events) == limit + 1


def test_watcher_descriptor_is_close_on_exec(tmp_path: Path) -> None:
    """The inotify descriptor does not leak into programs capkeeper might run."""
    import fcntl

    with Watcher() as watcher:
        assert fcntl.fcntl(watcher.fileno(), fcntl.F_GETFD) & fcntl.FD_CLOEXEC


def test_watcher_survives_non_utf8_names(tmp_path: Path) -> None:
    """A non-UTF-8 file name in a watched directory is decoded, not a crash (pyinotify's is)."""
    with Watcher() as watcher:
        watcher.sync([str(tmp_path)])
        os.close(os.open(os.path.join(os.fsencode(tmp_path), b"caf\xe9"), os.O_CREAT, 0o600))
        name = os.fsdecode(b"caf\xe9")
        events = _read_until(watcher, name)
    assert WatchEvent(str(tmp_path), name, Change.CREATE) in events


def _queued(fd: int) -> int:
    """Watches the kernel holds on one inotify descriptor."""
    info = Path(f"/proc/self/fdinfo/{fd}").read_text()
    return sum(1 for line in info.splitlines() if line.startswith("inotify wd:"))


def test_directories_others_can_write_get_their_own_instance(tmp_path: Path) -> None:
    """A root-owned 0755 directory goes on the trusted instance; a sticky 1777 one, a
    group-writable one and one owned by another user on the exposed one."""
    trusted, sticky, group, owned = (tmp_path / n for n in ("trusted", "sticky", "group", "owned"))
    for directory in (trusted, sticky, group, owned):
        directory.mkdir()
    os.chmod(trusted, 0o755)
    os.chmod(sticky, 0o1777)
    os.chmod(group, 0o775)
    os.chmod(owned, 0o755)
    os.chown(owned, 4242, 4242)
    with Watcher() as watcher:
        assert watcher.sync(map(str, (trusted, sticky, group, owned))) == []
        assert watcher.exposed_directories == {str(sticky), str(group), str(owned)}
        main, exposed = watcher.inotify_fds()
        assert (_queued(main), _queued(exposed)) == ((1, 3) if os.geteuid() == 0 else (0, 0))


def test_overflow_of_the_exposed_instance_is_told_apart(tmp_path: Path) -> None:
    """Flooding a world-writable directory overflows only the exposed instance's queue;
    events of the trusted directory in the same read are intact."""
    flooded, calm = tmp_path / "flooded", tmp_path / "calm"
    flooded.mkdir()
    calm.mkdir()
    os.chmod(flooded, 0o1777)
    limit = int(Path("/proc/sys/fs/inotify/max_queued_events").read_text())
    with Watcher() as watcher:
        watcher.sync([str(flooded), str(calm)])
        for index in range(limit // 2 + 10):  # IN_CREATE + IN_CLOSE_WRITE each
            (flooded / f"f{index}").write_bytes(b"")
        (calm / "tool").write_bytes(b"x")
        events = watcher.read()
    overflows = [e for e in events if e.is_overflow]
    assert len(overflows) == 1
    assert overflows[0].exposed
    assert [e.cause for e in events if e.name == "tool"] == [
        "IN_CREATE",
        "IN_MODIFY",
        "IN_CLOSE_WRITE",
    ]
    assert not any(e.exposed for e in events if e.name == "tool")


def test_read_filters_names_nobody_asked_about(tmp_path: Path) -> None:
    """Events on other names are dropped before decoding; the directory's own are kept."""
    (tmp_path / "bin").mkdir()
    with Watcher() as watcher:
        watcher.sync([str(tmp_path / "bin")])
        for name in ("noise1", "tool", "noise2"):
            (tmp_path / "bin" / name).write_bytes(b"")
        os.chmod(tmp_path / "bin", 0o700)
        time.sleep(0.05)
        events = watcher.read(lambda directory, name: name == "tool")
    assert {e.name for e in events} == {"tool", ""}


def test_revalidate_drops_watches_on_directories_replaced_unseen(tmp_path: Path) -> None:
    """A watch whose path now reaches another inode, or whose mode changed, is dropped;
    an unchanged one is kept."""
    for name in ("same", "replaced", "loosened"):
        (tmp_path / name).mkdir(mode=0o755)
    with Watcher() as watcher:
        watcher.sync([str(tmp_path / n) for n in ("same", "replaced", "loosened")])
        os.rename(tmp_path / "replaced", tmp_path / "old")
        (tmp_path / "replaced").mkdir()
        os.chmod(tmp_path / "loosened", 0o1777)
        stale = watcher.revalidate()
        assert sorted(stale) == [str(tmp_path / "loosened"), str(tmp_path / "replaced")]
        assert watcher.directories == {str(tmp_path / "same")}
        assert watcher.sync([str(tmp_path / n) for n in ("same", "replaced", "loosened")]) == []
        assert watcher.exposed_directories == {str(tmp_path / "loosened")}
        assert watcher.revalidate() == []


def test_routes_from_a_listing_are_those_planned_one_by_one(
    tree: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Many names in one directory are answered from one listing of it, and the routes
    are those of plan_route: files, hard links, symlinks (relative, absolute, dangling,
    a loop, to a directory), directories, a FIFO, missing and overlong names, a path
    past PATH_MAX. A directory others can write to (group-writable, another user's)
    is never listed, whatever it holds."""
    listed: list[str] = []
    real_scandir = os.scandir

    def spying(path: str) -> Iterator[os.DirEntry[str]]:
        listed.append(path)
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", spying)
    many = tree / "many"
    many.mkdir(mode=0o755)
    (many / "sub").mkdir(mode=0o755)
    (many / "sub" / "tool").write_bytes(b"x")
    for n in range(20):
        (many / f"file{n}").write_bytes(b"x")
    os.link(many / "file0", many / "hard")
    os.mkfifo(many / "fifo")
    (many / "rel").symlink_to("file1")
    (many / "abs").symlink_to(many / "file2")
    (many / "dangling").symlink_to("nowhere")
    (many / "loop").symlink_to("loop")
    (many / "dirlink").symlink_to("sub")
    deep = many
    fd = os.open(many, os.O_PATH)
    try:
        while len(str(deep)) + 201 < 4085:  # short names fit below PATH_MAX, long ones not
            os.mkdir("d" * 200, 0o755, dir_fd=fd)
            inner = os.open("d" * 200, os.O_PATH, dir_fd=fd)
            os.close(fd)
            fd = inner
            deep = deep / ("d" * 200)
        long_names = [f"{n}" * (4100 - len(str(deep))) for n in range(3)]  # past PATH_MAX
        for name in long_names + [f"s{n}" for n in range(20)]:
            os.close(os.open(name, os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=fd))
    finally:
        os.close(fd)
    shared = tree / "shared"
    shared.mkdir()
    os.chmod(shared, 0o775)
    others = tree / "others"
    others.mkdir(mode=0o755)
    os.chown(others, 4242, 4242)
    for directory in (shared, others):
        for n in range(20):
            (directory / f"file{n}").write_bytes(b"x")
        (directory / "rel").symlink_to("file1")
    names = [f"file{n}" for n in range(20)] + ["hard", "fifo", "rel", "abs", "dangling"]
    names += ["loop", "dirlink", "sub", "missing", "n" * 300]
    paths = [str(many / name) for name in names]
    paths += [str(many / "dirlink" / "tool"), str(many / "sub" / "tool")]
    paths += [str(deep / f"s{n}") for n in range(20)]
    paths += [str(deep / name) for name in long_names]
    paths += [str(d / name) for d in (shared, others) for name in names]
    together = list(plan_routes(paths))
    assert together == [plan_route(path) for path in paths]
    assert any(not route.complete for route in together)
    assert any(route.problem for route in together)
    assert str(many) in listed
    assert str(deep) in listed
    assert str(shared) not in listed
    assert str(others) not in listed
