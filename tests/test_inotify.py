"""capkeeper.inotify: the pure record decoder, its name filter, and the instance on real inotify."""

from __future__ import annotations

import ast
import errno
import os
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from capkeeper import inotify
from capkeeper.inotify import OVERFLOW, Event, Instance, decode, encode_names
from capkeeper.kernel import inotify_limits
from capkeeper.watcher import Route, Watcher, WatchPlan, plan_route
from tests.conftest import require_root

PACKAGE = Path(inotify.__file__).parent
HEADER = struct.Struct("iIII")


def record(
    wd: int, mask: int, name: bytes = b"", *, cookie: int = 0, pad: int | None = None
) -> bytes:
    """One ``struct inotify_event`` as the kernel writes it: the name NUL-padded to 16 bytes."""
    if not name:
        return HEADER.pack(wd, mask, cookie, 0)
    length = (len(name) // 16 + 1) * 16 if pad is None else len(name) + pad
    return HEADER.pack(wd, mask, cookie, length) + name.ljust(length, b"\0")


# -- the decoder: a table --------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "names", "expected"),
    [
        (b"", None, []),
        (record(1, inotify.IN_CREATE, b"tool"), None, [Event(1, inotify.IN_CREATE, 0, "tool")]),
        # exactly one NUL, no further padding; and a long padding
        (
            record(1, inotify.IN_MODIFY, b"tool", pad=1),
            None,
            [Event(1, inotify.IN_MODIFY, 0, "tool")],
        ),
        (record(1, inotify.IN_MODIFY, b"a", pad=63), None, [Event(1, inotify.IN_MODIFY, 0, "a")]),
        # a non-UTF-8 name survives (os.fsdecode)
        (
            record(2, inotify.IN_CREATE, b"caf\xe9"),
            None,
            [Event(2, inotify.IN_CREATE, 0, "caf\udce9")],
        ),
        (record(-1, inotify.IN_Q_OVERFLOW), None, [OVERFLOW]),
        (record(3, inotify.IN_IGNORED), None, [Event(3, inotify.IN_IGNORED, 0, "")]),
        (
            record(4, inotify.IN_MOVED_FROM, b"a", cookie=7)
            + record(4, inotify.IN_MOVED_TO, b"b", cookie=7),
            None,
            [Event(4, inotify.IN_MOVED_FROM, 7, "a"), Event(4, inotify.IN_MOVED_TO, 7, "b")],
        ),
        # the filter: other names and unknown descriptors are dropped; the directory's
        # own events, ended watches and overflows always pass
        (
            record(1, inotify.IN_CREATE, b"noise")
            + record(1, inotify.IN_CREATE, b"tool")
            + record(9, inotify.IN_CREATE, b"tool")
            + record(1, inotify.IN_ATTRIB)
            + record(1, inotify.IN_IGNORED)
            + record(-1, inotify.IN_Q_OVERFLOW),
            {1: encode_names(["tool"])},
            [
                Event(1, inotify.IN_CREATE, 0, "tool"),
                Event(1, inotify.IN_ATTRIB, 0, ""),
                Event(1, inotify.IN_IGNORED, 0, ""),
                OVERFLOW,
            ],
        ),
        # a name that only starts like a wanted one is another name
        (record(1, inotify.IN_CREATE, b"tool.new"), {1: encode_names(["tool"])}, []),
        # truncated: in the header, in the name (whole records before are kept)
        (record(1, inotify.IN_CREATE, b"tool")[:10], None, [OVERFLOW]),
        (
            record(1, inotify.IN_ATTRIB) + record(1, inotify.IN_CREATE, b"tool")[:20],
            None,
            [Event(1, inotify.IN_ATTRIB, 0, ""), OVERFLOW],
        ),
    ],
)
def test_decode_table(
    data: bytes, names: dict[int, frozenset[bytes]] | None, expected: list[Event]
) -> None:
    assert decode(data, names) == expected


# -- the decoder: properties -----------------------------------------------------------

_names = st.binary(min_size=1, max_size=40).filter(lambda b: b"\0" not in b and b"/" not in b)
_records = st.lists(
    st.tuples(
        st.integers(min_value=-1, max_value=50),  # wd
        st.sampled_from(
            [
                inotify.IN_CREATE,
                inotify.IN_DELETE,
                inotify.IN_MOVED_TO,
                inotify.IN_CLOSE_WRITE,
                inotify.IN_ATTRIB | inotify.IN_ISDIR,
                inotify.IN_IGNORED,
                inotify.IN_Q_OVERFLOW,
            ]
        ),
        st.integers(min_value=0, max_value=2**32 - 1),  # cookie
        st.one_of(st.just(b""), _names),
        st.integers(min_value=1, max_value=40),  # NUL padding (at least the terminator)
    ),
    max_size=20,
)


def _pack(records: list[tuple[int, int, int, bytes, int]]) -> tuple[bytes, list[int]]:
    data, ends = b"", []
    for wd, mask, cookie, name, pad in records:
        data += record(wd, mask, name, cookie=cookie, pad=pad if name else None)
        ends.append(len(data))
    return data, ends


@given(_records)
def test_decode_round_trips_every_record(records: list[tuple[int, int, int, bytes, int]]) -> None:
    """Without a filter every record comes back, names without their NUL padding."""
    data, _ = _pack(records)
    assert decode(data) == [Event(w, m, c, os.fsdecode(n)) for w, m, c, n, _ in records]


@given(_records, st.data())
def test_decode_truncated_buffer_keeps_whole_records_then_overflows(
    records: list[tuple[int, int, int, bytes, int]], data: st.DataObject
) -> None:
    """A buffer cut anywhere gives the whole records before the cut, then OVERFLOW
    (never a made-up record, never an exception); cut at a boundary, no OVERFLOW."""
    buffer, ends = _pack(records)
    cut = data.draw(st.integers(min_value=0, max_value=len(buffer)))
    whole = sum(1 for end in ends if end <= cut)
    expected = [Event(w, m, c, os.fsdecode(n)) for w, m, c, n, _ in records[:whole]]
    if cut not in (0, *ends):
        expected.append(OVERFLOW)
    assert decode(buffer[:cut]) == expected


@given(_records, st.dictionaries(st.integers(-1, 50), st.frozensets(_names, max_size=4)))
def test_filter_keeps_exactly_the_wanted_and_the_unfiltered(
    records: list[tuple[int, int, int, bytes, int]], names: dict[int, frozenset[bytes]]
) -> None:
    """The filter is the unfiltered decode minus named events nobody asked about."""
    data, _ = _pack(records)

    def kept(event: Event) -> bool:
        if not event.name or event.mask & (inotify.IN_Q_OVERFLOW | inotify.IN_IGNORED):
            return True
        return os.fsencode(event.name) in names.get(event.wd, frozenset())

    assert decode(data, names) == [e for e in decode(data) if kept(e)]


# -- the filter through the watcher, on real inotify --------------------------------------


def _settle(watcher: Watcher) -> None:
    """Wait (bounded) until the watcher's descriptor is readable."""
    import select

    select.select([watcher], [], [], 5.0)


def test_events_for_unwatched_names_never_reach_the_caller(tmp_path: Path) -> None:
    """With the plan, a flood of other names in a watched directory yields no object at all;
    the declared name's events, and the directory's own, arrive."""
    directory = tmp_path / "bin"
    directory.mkdir()
    plan = WatchPlan()
    plan.set_route(plan_route(str(directory / "tool")))
    with Watcher() as watcher:
        assert watcher.sync(plan.directories()) == []
        for number in range(500):
            noise = directory / f"noise{number}"
            noise.write_bytes(b"")
            noise.unlink()
        (directory / "tool").write_bytes(b"x")
        os.chmod(directory, 0o700)
        _settle(watcher)
        events = watcher.read(plan)
    mine = [e for e in events if e.directory == str(directory)]
    assert {e.name for e in mine} == {"tool", ""}
    assert [e.cause for e in mine if e.name == "tool"] == [
        "IN_CREATE",
        "IN_MODIFY",
        "IN_CLOSE_WRITE",
    ]
    assert not any(e.name.startswith("noise") for e in events)


def test_filter_follows_the_plan_as_it_changes(tmp_path: Path) -> None:
    """A name that becomes declared (or a directory watched anew) passes at the next read;
    a name no longer declared is dropped."""
    directory = tmp_path / "bin"
    directory.mkdir()
    plan = WatchPlan()
    plan.set_route(plan_route(str(directory / "one")))
    with Watcher() as watcher:
        watcher.sync(plan.directories())
        (directory / "two").write_bytes(b"")
        _settle(watcher)
        assert not any(e.name == "two" for e in watcher.read(plan))
        plan.set_route(plan_route(str(directory / "two")))
        plan.remove(str(directory / "one"))
        watcher.sync(plan.directories())
        (directory / "two").write_bytes(b"y")
        (directory / "one").write_bytes(b"y")
        _settle(watcher)
        names = {e.name for e in watcher.read(plan)}
        assert "two" in names
        assert "one" not in names
        # the directory's watch ended and was added again: a new descriptor, still filtered right
        assert watcher.invalidate(str(directory))
        assert watcher.sync(plan.directories()) == []
        (directory / "two").write_bytes(b"z")
        (directory / "one").write_bytes(b"z")
        _settle(watcher)
        names = {e.name for e in watcher.read(plan)}
        assert "two" in names
        assert "one" not in names


def test_plan_names_are_reference_counted() -> None:
    """names_in lists a name while some route goes through it, and its version moves."""
    plan = WatchPlan()
    version = plan.version
    plan.set_route(Route("/d/a", (), complete=True))
    from capkeeper.watcher import Link

    plan.set_route(Route("/d/a", (Link("/", "d", False), Link("/d", "a", True)), complete=True))
    plan.set_route(Route("/e/a", (Link("/", "e", False), Link("/e", "a", True)), complete=True))
    assert plan.names_in("/") == {"d", "e"}
    assert plan.version > version
    plan.remove("/d/a")
    assert plan.names_in("/") == {"e"}
    assert plan.names_in("/d") == frozenset()


# -- the instance on real inotify ------------------------------------------------------


def test_instance_is_close_on_exec_and_nonblocking(tmp_path: Path) -> None:
    import fcntl

    instance = Instance()
    try:
        assert fcntl.fcntl(instance.fileno(), fcntl.F_GETFD) & fcntl.FD_CLOEXEC
        assert fcntl.fcntl(instance.fileno(), fcntl.F_GETFL) & os.O_NONBLOCK
        assert instance.read() == b""
    finally:
        instance.close()


def test_instance_add_reports_the_kernel_errno(tmp_path: Path) -> None:
    """ENOENT and ENOTDIR come back as OSError with the errno, not a negative number."""
    (tmp_path / "file").write_bytes(b"")
    instance = Instance()
    try:
        with pytest.raises(OSError, match="No such file") as missing:
            instance.add(str(tmp_path / "missing"), inotify.IN_CREATE)
        assert missing.value.errno == errno.ENOENT
        with pytest.raises(OSError, match="Not a directory") as not_dir:
            instance.add(str(tmp_path / "file"), inotify.IN_CREATE | inotify.IN_ONLYDIR)
        assert not_dir.value.errno == errno.ENOTDIR
        wd = instance.add(str(tmp_path), inotify.IN_CREATE)
        assert instance.add(str(tmp_path), inotify.IN_CREATE) == wd  # same inode, same wd
    finally:
        instance.close()


_PROBE = """
import sys
from capkeeper.watcher import Watcher, WatchError
try:
    watcher = Watcher()
except WatchError as exc:
    print("start", exc)
    sys.exit(0)
for failure in watcher.sync([sys.argv[1]]):
    print(failure.errno, failure.reason)
"""


def _probe(prefix: list[str], directory: Path) -> str:
    result = subprocess.run(
        [*prefix, sys.executable, "-c", _PROBE, str(directory)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_watch_limit_reached_gives_a_readable_failure(tmp_path: Path) -> None:
    """A real ENOSPC (a user namespace whose inotify watch limit is 0) is reported with
    the limit to raise; so is a real EMFILE (no instances allowed)."""
    require_root()
    shell = 'echo 0 > /proc/sys/user/max_inotify_{0} && exec "$@"'
    watches = ["unshare", "-U", "-r", "sh", "-c", shell.format("watches"), "-"]
    out = _probe(watches, tmp_path)
    assert out.startswith(f"{errno.ENOSPC} the inotify watch limit is reached"), out
    assert "fs.inotify.max_user_watches = " in out
    assert "sysctl -w fs.inotify.max_user_watches=" in out
    instances = ["unshare", "-U", "-r", "sh", "-c", shell.format("instances"), "-"]
    out = _probe(instances, tmp_path)
    assert out.startswith("start cannot start inotify:"), out
    assert "Too many open files" in out


def test_permission_denied_gives_a_readable_failure() -> None:
    """A real EACCES from inotify_add_watch: an unprivileged user watching a root-only
    directory it can reach (lstat) but not read."""
    require_root()
    base = Path(tempfile.mkdtemp(prefix="capkeeper-inotify-"))  # /tmp: reachable by anyone
    try:
        os.chmod(base, 0o755)
        private = base / "private"
        private.mkdir(mode=0o700)
        unprivileged = ["setpriv", "--reuid=4242", "--regid=4242", "--clear-groups"]
        out = _probe(unprivileged, private)
    finally:
        shutil.rmtree(base)
    assert out == f"{errno.EACCES} permission denied: capkeeper needs read access to the directory"


def test_inotify_limits_reads_the_sysctls(tmp_path: Path) -> None:
    limits = inotify_limits()
    assert limits.max_queued_events == int(
        Path("/proc/sys/fs/inotify/max_queued_events").read_text()
    )
    (tmp_path / "max_user_watches").write_text("8192\n")
    (tmp_path / "max_user_instances").write_text("bogus\n")
    assert inotify_limits(str(tmp_path)).max_user_watches == 8192
    assert inotify_limits(str(tmp_path)).max_user_instances is None
    assert inotify_limits(str(tmp_path)).max_queued_events is None


# -- pyinotify through its public API only ---------------------------------------------


# Names with a leading underscore that are public API all the same.
_PUBLIC = frozenset({"os._exit"})


def test_only_the_adapter_imports_pyinotify_and_nothing_touches_its_private_names() -> None:
    """ast over capkeeper/: pyinotify is imported by capkeeper/inotify.py alone, and no
    module reaches a private name of another object: every ``x._name`` is ``self._name``
    or ``cls._name`` (its own state, never a pyinotify object's), and the adapter has no
    ``getattr(…, "_…")``."""
    importers = []
    for module in sorted(PACKAGE.glob("*.py")):
        tree = ast.parse(module.read_text(), filename=str(module))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import) and any(
                a.name.split(".")[0] == "pyinotify" for a in node.names
            ):
                importers.append(module.name)
            if (
                isinstance(node, ast.ImportFrom)
                and (node.module or "").split(".")[0] == "pyinotify"
            ):
                importers.append(module.name)
            if isinstance(node, ast.Attribute) and node.attr.startswith("_"):
                base = node.value
                assert not (isinstance(base, ast.Name) and base.id == "pyinotify"), (
                    f"{module.name}:{node.lineno}: pyinotify.{node.attr}"
                )
                where = f"{module.name}:{node.lineno}: {ast.unparse(node)}"
                if not node.attr.startswith("__") and ast.unparse(node) not in _PUBLIC:
                    assert isinstance(base, ast.Name), where
                    assert base.id in ("self", "cls"), where
            if (
                module.name == "inotify.py"
                and isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id in ("getattr", "setattr", "hasattr")
                and len(node.args) > 1
                and isinstance(node.args[1], ast.Constant)
                and str(node.args[1].value).startswith("_")
            ):
                pytest.fail(f"inotify.py:{node.lineno}: {ast.unparse(node)}")
    assert set(importers) == {"inotify.py"}
