"""The trusted on-disk cache (capkeeper.cache): the validated state and the ELF facts.

Every test compares what a load or a verdict gives with the cache against the full
path without it, on real files: a hit must be equal, and anything that is not exactly
what the daemon wrote into a directory only it can write (another owner, other
writers, a symlink, garbage, another version) must be a miss.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import structlog
from structlog.testing import capture_logs

from capkeeper import files
from capkeeper import state as state_module
from capkeeper.cache import ELF_CACHE, MAX_CACHE_BYTES, Cache
from capkeeper.cache import _version as cache_version
from capkeeper.capabilities import format_text, parse
from capkeeper.cli import main
from capkeeper.daemon import Daemon
from capkeeper.enforce import reconcile
from capkeeper.errors import SettingsError, StateError
from capkeeper.interpreters import MARKER_SYMBOLS
from capkeeper.model import Entry
from capkeeper.settings import DEFAULT_CACHE_DIRECTORY, Settings, load_settings
from capkeeper.state import STATE_CACHE, State, load_state
from tests.conftest import make_binary, require_root, require_tool, setcap
from tests.test_attacks import ATTACKER, arena, as_attacker, exchanging, make_dir, setpriv

__all__ = ["arena"]  # the fixture, imported for pytest

DIGEST = "ab" * 32
MAIN = """\
[[binary]]
path = "{tree}/a"
caps = "cap_net_raw=ep"

[[binary]]
path = "{tree}/b"
caps = "cap_net_bind_service,cap_chown+ep"
sha256 = "{digest}"
owner = "0"
"""
WEB = """\
[[binary]]
path = "{tree}/c"
caps = "cap_sys_nice+eip"
allow_inheritable = true
allow_interpreter = true
owner = "root"
"""
DB = """\
[[binary]]
path = "{tree}/d"
caps = "cap_ipc_lock=p"
"""


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    """A root-owned 0700 cache directory, as systemd's CacheDirectoryMode=0700 makes it."""
    require_root()
    os.chmod(tmp_path, 0o755)
    path = tmp_path / "cache"
    path.mkdir(mode=0o700)
    return path


@pytest.fixture
def state(tmp_path: Path) -> Path:
    """A state with a main file and two drop-ins, every kind of key used."""
    root = tmp_path / "etc"
    (root / "state.d").mkdir(parents=True)
    tree = tmp_path / "tree"
    main = root / "state.toml"
    main.write_text(MAIN.format(tree=tree, digest=DIGEST))
    (root / "state.d" / "10-web.toml").write_text(WEB.format(tree=tree))
    (root / "state.d" / "20-db.toml").write_text(DB.format(tree=tree))
    return main


def fresh(main: Path) -> State:
    return load_state(main)


def exact(state: State) -> list[tuple[object, ...]]:
    """Every field of every entry, ``source`` too (``==`` on an Entry leaves it out)."""
    return [(*_fields(entry), entry.source) for entry in state.entries] + [state.files]


def _fields(entry: Entry) -> tuple[object, ...]:
    return (
        entry.path,
        entry.caps,
        entry.caps_text,
        entry.owner,
        entry.owner_uid,
        entry.sha256,
        entry.allow_inheritable,
        entry.allow_interpreter,
    )


@pytest.fixture
def parsed(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the state files parsed (plain reader or tomllib): 0 on a cache hit."""

    calls: list[int] = []
    real = state_module._parse

    def counting(text: str) -> dict[str, object]:
        calls.append(1)
        return real(text)

    monkeypatch.setattr(state_module, "_parse", counting)
    return calls


def daemons(directory: Path) -> Cache:
    """The daemon's cache: consulted for any state (a one-shot's only for a large one)."""
    return Cache(directory, writable=True)


def warm(main: Path, cache_dir: Path) -> Cache:
    """Load ``main`` once with a writable cache, so the next load can hit."""
    writer = Cache(cache_dir, writable=True)
    load_state(main, cache=writer)
    assert (cache_dir / STATE_CACHE).is_file()
    assert (cache_dir / STATE_CACHE).stat().st_mode & 0o777 == 0o600
    return daemons(cache_dir)


# -- the validated-state cache -----------------------------------------------------------


def test_state_cache_hit_equals_a_fresh_load(
    state: Path, cache_dir: Path, parsed: list[int]
) -> None:
    """A hit parses nothing and gives entries equal to a fresh load, source and files too."""
    reader = warm(state, cache_dir)
    expected = fresh(state)
    parsed.clear()
    hit = load_state(state, cache=reader)
    assert parsed == []
    assert hit == expected
    assert exact(hit) == exact(expected)
    assert len(hit.entries) == 4


def test_deferred_state_document_is_built_at_the_flush(
    state: Path, cache_dir: Path, parsed: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The daemon's cache defers its writes: the state's document is not even built
    before the flush (after READY=1), and once flushed a reader hits it."""
    built: list[int] = []
    real = state_module._document

    def counting(key: str, entries: Any) -> dict[str, object]:
        built.append(len(entries))
        return real(key, entries)

    monkeypatch.setattr(state_module, "_document", counting)
    daemon_cache = Cache(cache_dir, writable=True, defer=True)
    expected = load_state(state, cache=daemon_cache)
    assert built == []
    assert not (cache_dir / "state.json").exists()
    daemon_cache.flush()
    assert built == [4]
    parsed.clear()
    assert exact(load_state(state, cache=daemons(cache_dir))) == exact(expected)
    assert parsed == []


def _edit_byte(main: Path) -> None:
    main.write_text(main.read_text().replace('/a"', '/x"'))  # same size


def _same_size_same_mtime(main: Path) -> None:
    before = main.stat()
    _edit_byte(main)
    os.utime(main, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = main.stat()
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)


def _add_dropin(main: Path) -> None:
    tree = main.parent.parent / "tree"
    (main.parent / "state.d" / "30-new.toml").write_text(DB.format(tree=tree).replace("/d", "/e"))


def _remove_dropin(main: Path) -> None:
    (main.parent / "state.d" / "20-db.toml").unlink()


def _rename_dropin(main: Path) -> None:
    directory = main.parent / "state.d"
    (directory / "20-db.toml").rename(directory / "05-db.toml")


def _empty_dropin(main: Path) -> None:
    (main.parent / "state.d" / "00-empty.toml").write_text("")


@pytest.mark.parametrize(
    "change",
    [_edit_byte, _same_size_same_mtime, _add_dropin, _remove_dropin, _rename_dropin, _empty_dropin],
)
def test_every_state_change_misses(
    state: Path, cache_dir: Path, parsed: list[int], change: object
) -> None:
    """Editing a byte (even with size and mtime put back), adding, removing or renaming a
    drop-in (even an empty one): the next load parses again and equals a fresh load."""
    reader = warm(state, cache_dir)
    before = exact(fresh(state))
    change(state)  # type: ignore[operator]
    parsed.clear()
    loaded = load_state(state, cache=reader)
    assert parsed, "the changed state was not parsed again"
    assert exact(loaded) == exact(fresh(state))
    assert exact(loaded) != before


def test_cap_last_cap_is_part_of_the_key(state: Path, cache_dir: Path, parsed: list[int]) -> None:
    """A state validated for another kernel's last capability is validated again."""
    Cache(cache_dir, writable=True)
    load_state(state, cache=Cache(cache_dir, writable=True), last_cap=40)
    parsed.clear()
    load_state(state, cache=daemons(cache_dir), last_cap=39)
    assert parsed


def test_invalid_state_is_never_cached(state: Path, cache_dir: Path) -> None:
    """A state with a problem writes no cache, and still fails with a cache."""

    state.write_text(state.read_text() + '\n[[binary]]\npath = "relative"\ncaps = "x"\n')
    for _ in range(2):
        with pytest.raises(StateError):
            load_state(state, cache=Cache(cache_dir, writable=True))
    assert not (cache_dir / STATE_CACHE).exists()


def test_one_shot_reader_never_writes(state: Path, cache_dir: Path) -> None:
    """A read-only cache (the one-shot commands) leaves the directory empty."""
    load_state(state, cache=Cache(cache_dir))
    assert list(cache_dir.iterdir()) == []


_OWNER_SCRIPT = r"""
import os, subprocess, sys
from pathlib import Path
from capkeeper.cache import Cache
from capkeeper.state import load_state
copy, main, cache = sys.argv[1:4]
subprocess.run(["mount", "--bind", copy, "/etc/passwd"], check=True)
def with_uid(uid):
    with open(copy, "r+") as handle:  # in place: the bind mount holds this inode
        lines = [l for l in handle.read().splitlines() if not l.startswith("ckcache:")]
        lines.append(f"ckcache:x:{uid}:{uid}::/nonexistent:/usr/sbin/nologin")
        handle.seek(0); handle.truncate(); handle.write("\n".join(lines) + "\n")
with_uid(4242)
first = load_state(Path(main), cache=Cache(cache, writable=True))
with_uid(4343)
second = load_state(Path(main), cache=Cache(cache))
print(*[[e.owner_uid for e in s.entries if e.owner == "ckcache"] for s in (first, second)])
"""


def test_owner_uid_change_in_passwd_is_seen(tmp_path: Path, state: Path, cache_dir: Path) -> None:
    """An owner name whose uid changes in /etc/passwd (a bind-mounted copy, in a private
    mount namespace) gets the new uid on a cache hit: owners are resolved on every load."""
    unshare = require_tool("unshare")
    state.write_text(
        state.read_text()
        + f'\n[[binary]]\npath = "{tmp_path}/o"\ncaps = "cap_chown=p"\nowner = "ckcache"\n'
    )
    copy = tmp_path / "passwd"
    shutil.copyfile("/etc/passwd", copy)
    result = subprocess.run(
        [
            unshare,
            "--mount",
            sys.executable,
            "-c",
            _OWNER_SCRIPT,
            str(copy),
            str(state),
            str(cache_dir),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "[4242] [4343]\n"
    assert (cache_dir / STATE_CACHE).is_file()


# -- a cache that is not exactly the daemon's own is ignored ------------------------------


def _forge(document: Path) -> None:
    """Rewrite a genuine state cache so that every entry declares cap_sys_admin."""
    data = json.loads(document.read_text())
    for kind in data["data"]["kinds"]:
        kind[0] = 1 << 21  # CAP_SYS_ADMIN in permitted
        kind[4] = "cap_sys_admin=ep"
    document.write_text(json.dumps(data))


def _chown_file(cache_dir: Path) -> Path:
    os.chown(cache_dir / STATE_CACHE, ATTACKER, ATTACKER)
    return cache_dir


def _group_writable_file(cache_dir: Path) -> Path:
    os.chmod(cache_dir / STATE_CACHE, 0o620)
    return cache_dir


def _other_writable_file(cache_dir: Path) -> Path:
    os.chmod(cache_dir / STATE_CACHE, 0o606)
    return cache_dir


def _writable_directory(cache_dir: Path) -> Path:
    os.chmod(cache_dir, 0o770)
    return cache_dir


def _attackers_directory(cache_dir: Path) -> Path:
    os.chown(cache_dir, ATTACKER, ATTACKER)
    return cache_dir


def _symlinked_file(cache_dir: Path) -> Path:
    (cache_dir / STATE_CACHE).rename(cache_dir / "elsewhere.json")
    (cache_dir / STATE_CACHE).symlink_to("elsewhere.json")
    return cache_dir


def _hard_linked_file(cache_dir: Path) -> Path:
    os.link(cache_dir / STATE_CACHE, cache_dir / "second-name.json")
    return cache_dir


def _symlinked_directory(cache_dir: Path) -> Path:
    link = cache_dir.parent / "cache-link"
    os.symlink(cache_dir, link)
    os.lchown(link, ATTACKER, ATTACKER)
    return link


@pytest.mark.parametrize(
    "untrust",
    [
        _chown_file,
        _group_writable_file,
        _other_writable_file,
        _writable_directory,
        _attackers_directory,
        _symlinked_file,
        _hard_linked_file,
        _symlinked_directory,
    ],
)
def test_untrusted_cache_is_ignored(
    state: Path, cache_dir: Path, parsed: list[int], untrust: object
) -> None:
    """A forged cache (every entry granted cap_sys_admin) in a file or directory that is not
    root's alone, or reached through a symlink, is never used: the load equals no cache."""
    warm(state, cache_dir)
    _forge(cache_dir / STATE_CACHE)
    assert load_state(state, cache=daemons(cache_dir)).entries[0].caps_text == "cap_sys_admin=ep"
    directory = untrust(cache_dir)  # type: ignore[operator]
    parsed.clear()
    loaded = load_state(state, cache=daemons(directory))
    assert parsed
    assert exact(loaded) == exact(fresh(state))


def _document(cache_dir: Path) -> dict[str, object]:
    return dict(json.loads((cache_dir / STATE_CACHE).read_text()))


def _with_item(cache_dir: Path, column: str, index: int, value: object) -> str:
    document = _document(cache_dir)
    document["data"][column][index] = value  # type: ignore[index]
    return json.dumps(document)


def _with_kind(cache_dir: Path, index: int, value: object) -> str:
    document = _document(cache_dir)
    document["data"]["kinds"][0][index] = value  # type: ignore[index]
    return json.dumps(document)


def _with_data(cache_dir: Path, key: str, value: object) -> str:
    data: dict[str, object] = _document(cache_dir)["data"]  # type: ignore[assignment]
    return _with(cache_dir, "data", {**data, key: value})


def _with(cache_dir: Path, key: str, value: object) -> str:
    document = _document(cache_dir)
    document[key] = value
    return json.dumps(document)


BAD_DOCUMENTS = {
    "garbage": lambda d: "\x00\xff not json",
    "truncated": lambda d: (d / STATE_CACHE).read_text()[:-40],
    "empty": lambda d: "",
    "a list": lambda d: "[]",
    "nested deeply": lambda d: "[" * 100_000 + "]" * 100_000,
    "wrong format": lambda d: _with(d, "format", 2),
    "format true": lambda d: _with(d, "format", True),
    "wrong version": lambda d: _with(d, "capkeeper", "0.0.0-forged"),
    "wrong name": lambda d: _with(d, "name", "elf.json"),
    "wrong key": lambda d: _with_data(d, "key", "0" * 64),
    "kinds not a list": lambda d: _with_data(d, "kinds", {}),
    "paths not a list": lambda d: _with_data(d, "paths", "/x"),
    "a column short": lambda d: _with_data(d, "sources", _document(d)["data"]["sources"][:-1]),  # type: ignore[index]
    "short kind": lambda d: _with_data(d, "kinds", [k[:-1] for k in _document(d)["data"]["kinds"]]),  # type: ignore[index]
    "index out of range": lambda d: _with_item(d, "of", 0, 99),
    "negative index": lambda d: _with_item(d, "of", 0, -1),
    "index as true": lambda d: _with_item(d, "of", 0, True),
    "path as null": lambda d: _with_item(d, "paths", 0, None),
    "source as number": lambda d: _with_item(d, "sources", 0, 3),
    "mask as text": lambda d: _with_kind(d, 0, "8192"),
    "mask as float": lambda d: _with_kind(d, 0, 8192.0),
    "mask too large": lambda d: _with_kind(d, 0, 1 << 64),
    "negative mask": lambda d: _with_kind(d, 1, -1),
    "effective as 1": lambda d: _with_kind(d, 2, 1),
    "rootid too large": lambda d: _with_kind(d, 3, 1 << 32),
    "caps text as null": lambda d: _with_kind(d, 4, None),
    "no such owner": lambda d: _with_kind(d, 5, "no-such-user-ckcache"),
    "sha256 as number": lambda d: _with_kind(d, 6, 7),
    "flag as 0": lambda d: _with_kind(d, 7, 0),
}


@pytest.mark.parametrize("name", BAD_DOCUMENTS)
def test_malformed_cache_is_a_miss(
    state: Path, cache_dir: Path, parsed: list[int], name: str
) -> None:
    """Garbage, truncated, wrongly typed, another format or version: a miss, no traceback,
    and the load equals no cache."""
    warm(state, cache_dir)
    text = BAD_DOCUMENTS[name](cache_dir)  # type: ignore[no-untyped-call]
    (cache_dir / STATE_CACHE).write_text(text, errors="surrogateescape")
    parsed.clear()
    loaded = load_state(state, cache=daemons(cache_dir))
    assert parsed
    assert exact(loaded) == exact(fresh(state))


def test_huge_cache_file_is_not_read(state: Path, cache_dir: Path, parsed: list[int]) -> None:
    """A cache file larger than the limit is a miss without reading it (sparse: no disk)."""
    warm(state, cache_dir)
    os.truncate(cache_dir / STATE_CACHE, MAX_CACHE_BYTES + 1)
    parsed.clear()
    assert exact(load_state(state, cache=daemons(cache_dir))) == exact(fresh(state))
    assert parsed


def test_cache_write_failures_are_quiet(state: Path, tmp_path: Path) -> None:
    """No directory, or a file in its place: the load succeeds and says why at debug."""
    said: list[dict[str, object]] = []
    (tmp_path / "a-file").write_text("")
    for directory in (tmp_path / "missing", tmp_path / "a-file"):
        cache = Cache(directory, writable=True, debug=lambda event, **f: said.append(f))
        assert exact(load_state(state, cache=cache)) == exact(fresh(state))
    reasons = [str(f["reason"]) for f in said]
    assert "no such directory" in reasons
    assert any("not a directory" in reason.lower() for reason in reasons), reasons


_DOCUMENTS: list[object] = [
    {},
    [],
    {"paths": ["/a", '/\u00e9\n"q"', "/\udcff"], "of": [0, 1, None], "kinds": [[1, True, None]]},
    {"columns": {"nested": [{"deep": [1.5, float("nan"), -(2**70)]}]}, "": "", "x": []},
    {1: "int key", "s": [{"a": 1}, [2, [3]]]},  # json.dumps turns the key into "1"
    ["top", {"k": [[], {}]}, 7],
    "a string",
]


@pytest.mark.parametrize("data", _DOCUMENTS, ids=range(len(_DOCUMENTS)))
def test_cache_document_is_written_as_json_dumps(cache_dir: Path, data: object) -> None:
    """A document written in pieces is exactly what one ``json.dumps`` writes, and
    reads back."""
    cache = Cache(cache_dir, writable=True)
    assert cache.write("doc.json", data)
    written = (cache_dir / "doc.json").read_bytes()
    document = {"format": 1, "capkeeper": cache_version(), "name": "doc.json", "data": data}
    assert written == json.dumps(document, separators=(",", ":")).encode()
    assert json.dumps(cache.read("doc.json")) == json.dumps(json.loads(json.dumps(data)))
    assert sorted(os.listdir(cache_dir)) == ["doc.json"]


def test_cache_larger_than_the_limit_is_not_written(
    cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A document past the limit leaves the previous one and no temporary file."""
    said: list[dict[str, object]] = []
    cache = Cache(cache_dir, writable=True, debug=lambda event, **f: said.append(f))
    assert cache.write("doc.json", ["small"])
    monkeypatch.setattr("capkeeper.cache.MAX_CACHE_BYTES", 1000)
    assert not cache.write("doc.json", [f"/srv/{number}" for number in range(1000)])
    assert said
    assert "larger than" in str(said[0]["reason"])
    assert sorted(os.listdir(cache_dir)) == ["doc.json"]
    assert cache.read("doc.json") == ["small"]


def test_cache_written_without_holding_the_document(cache_dir: Path) -> None:
    """Writing 10,000 entries' columns never holds their text whole nor the encoder's
    10,000 chunks: Python keeps the heap such a peak grew (the daemon's RSS)."""
    import tracemalloc

    data = {
        "paths": [f"/srv/app{number:05d}/bin/tool" for number in range(10_000)],
        "of": [number % 3 for number in range(10_000)],
        "sources": ["/etc/capkeeper/state.toml"] * 10_000,
    }
    cache = Cache(cache_dir, writable=True)
    cache_version()  # importlib.metadata's first use is not the writer's
    tracemalloc.start()
    try:
        assert cache.write("doc.json", data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    size = (cache_dir / "doc.json").stat().st_size
    assert size > 500_000
    assert peak < size, f"peak {peak} bytes for a {size}-byte document"
    document = {"format": 1, "capkeeper": cache_version(), "name": "doc.json", "data": data}
    expected = json.dumps(document, separators=(",", ":")).encode()
    assert (cache_dir / "doc.json").read_bytes() == expected


# -- the attacker ------------------------------------------------------------------------


def test_attacker_cannot_feed_a_cache(arena: Path, state: Path) -> None:
    """Attack: the cache directory is in a directory uid 4242 owns (a misconfigured
    cache_directory); the attacker plants a forged state cache with the right key and
    swaps it with root's genuine one (renameat2 RENAME_EXCHANGE) while root loads.
    Runs as: attacker 4242, capkeeper root. Never: a load other than a fresh one."""
    home = make_dir(arena / "home", uid=ATTACKER)
    genuine = make_dir(arena / "genuine", mode=0o700)
    warm(state, genuine)
    as_attacker("mkdir", "-m", "0700", str(home / "cache"), str(home / "forged"))
    forged = json.loads((genuine / STATE_CACHE).read_text())
    for kind in forged["data"]["kinds"]:
        kind[0], kind[4] = 1 << 21, "cap_sys_admin=ep"
    subprocess.run(
        [
            *setpriv(),
            "/bin/sh",
            "-c",
            f"cat > {home}/forged/{STATE_CACHE}; cp {home}/forged/{STATE_CACHE} {home}/cache/",
        ],
        input=json.dumps(forged).encode(),
        check=True,
    )
    expected = exact(fresh(state))
    assert exact(load_state(state, cache=daemons(home / "cache"))) == expected
    with exchanging(home / "cache", home / "forged"):
        for _ in range(200):
            assert exact(load_state(state, cache=daemons(home / "cache"))) == expected


# -- the ELF facts -----------------------------------------------------------------------


def _entry(path: Path, caps: str = "cap_net_raw=ep") -> Entry:
    from capkeeper.kernel import cap_last_cap

    parsed = parse(caps, last_cap=cap_last_cap())
    return Entry(
        path=str(path), caps=parsed, caps_text=format_text(parsed, last_cap=cap_last_cap())
    )


@pytest.fixture
def new_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts with an empty in-memory ELF cache, as a new process does."""
    monkeypatch.setattr(files, "_ELF_CACHE", files._ElfCache())


def restart(cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> int:
    """Save the facts learnt, then start over with only what the cache file holds."""
    Cache(cache_dir, writable=True).save_elf_facts()
    monkeypatch.setattr(files, "_ELF_CACHE", files._ElfCache())
    return Cache(cache_dir).load_elf_facts()


@pytest.fixture
def inspected(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Counts the ELF files parsed (files.inspect_fd calls): 0 for files the cache knew."""
    calls: list[str] = []
    real = files.inspect_fd

    def counting(fd: int, symbols: object = (), **kwargs: Any) -> object:
        calls.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real(fd, symbols, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(files, "inspect_fd", counting)
    return calls


def _patched(data: bytes, old: bytes, new: bytes) -> bytes:
    assert len(old) == len(new)
    assert old in data
    return data.replace(old, new)


def test_elf_facts_survive_a_restart(
    tree: Path,
    cache_dir: Path,
    new_process: None,
    inspected: list[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Facts saved by one process are used by the next for unchanged files: no parse, the
    same facts as a fresh parse."""
    paths = [make_binary(tree / f"bin{i}") for i in range(3)]
    first = [files.observe(str(p)).elf for p in paths]
    assert len(inspected) == 3
    assert restart(cache_dir, monkeypatch) == 3
    inspected.clear()
    assert [files.observe(str(p)).elf for p in paths] == first
    assert inspected == []
    document = json.loads((cache_dir / ELF_CACHE).read_text())
    assert len(document["data"]["facts"]) == 1  # three copies, one set of facts


def test_elf_content_change_with_size_and_mtime_reset_is_parsed_again(
    tree: Path,
    cache_dir: Path,
    new_process: None,
    inspected: list[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Attack-shaped: a cached benign ELF is rewritten in place with the same size into a
    program that links a language runtime (libR.so.6 for libc.so.6), its mtime set back.
    The next process must parse it again and refuse it, as without any cache."""
    binary = make_binary(tree / "tool")
    setcap("cap_net_raw=ep", binary)
    entry = _entry(binary)
    assert reconcile(entry, write=False).status.value == "in-sync"
    before = binary.stat()
    restart(cache_dir, monkeypatch)
    binary.write_bytes(_patched(binary.read_bytes(), b"libc.so.6\0", b"libR.so.6\0"))
    os.utime(binary, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = binary.stat()
    assert (after.st_size, after.st_mtime_ns, after.st_ino) == (
        before.st_size,
        before.st_mtime_ns,
        before.st_ino,
    )
    inspected.clear()
    outcome = reconcile(entry, write=False)
    assert inspected == [str(binary)]
    assert outcome.status.value == "refused"
    assert "links libR.so.6" in outcome.reason
    monkeypatch.setattr(files, "_ELF_CACHE", files._ElfCache())
    uncached = reconcile(entry, write=False)
    assert (uncached.status, uncached.reason) == (outcome.status, outcome.reason)


def _cases(base: Path) -> dict[str, tuple[Path, str]]:
    """Files for every verdict: the declared path and what was done to it."""
    cases: dict[str, tuple[Path, str]] = {}
    plain = make_binary(base / "plain")
    setcap("cap_net_raw=ep", plain)
    cases["in sync"] = (plain, "cap_net_raw=ep")
    cases["drift"] = (make_binary(base / "stripped"), "cap_net_raw=ep")
    cases["group-writable file"] = (make_binary(base / "gw", mode=0o775), "cap_net_raw=ep")
    bad_dir = base / "open"
    bad_dir.mkdir(mode=0o777)
    os.chmod(bad_dir, 0o777)
    cases["group-writable directory"] = (make_binary(bad_dir / "tool"), "cap_net_raw=ep")
    owned = make_binary(base / "owned")
    os.chown(owned, ATTACKER, ATTACKER)
    cases["non-root owner"] = (owned, "cap_net_raw=ep")
    linked = make_binary(base / "linked")
    os.link(linked, base / "linked-2")
    cases["hard link"] = (linked, "cap_net_raw=ep")
    other = base / "other"
    other.mkdir(mode=0o755)
    make_binary(other / "target")
    os.symlink(other, base / "via")
    os.lchown(base / "via", ATTACKER, ATTACKER)
    cases["untrusted symlink on the route"] = (base / "via" / "target", "cap_net_raw=ep")
    script = base / "script"
    script.write_text("#!/bin/sh\nexit 0\n")
    os.chmod(script, 0o755)
    cases["script"] = (script, "cap_net_raw=ep")
    loader = Path(os.path.realpath("/lib64/ld-linux-x86-64.so.2"))
    cases["loader copy"] = (
        make_binary(base / "runner", content=loader.read_bytes()),
        "cap_net_raw=ep",
    )
    runtime = make_binary(base / "runtime")
    runtime.write_bytes(_patched(runtime.read_bytes(), b"libc.so.6\0", b"libR.so.6\0"))
    cases["links a runtime"] = (runtime, "cap_net_raw=ep")
    wrong = make_binary(base / "wrong")
    setcap("cap_chown=p", wrong)
    cases["wrong capabilities"] = (wrong, "cap_net_raw=ep")
    extra = make_binary(base / "extra")
    setcap("cap_net_raw,cap_sys_admin=ep", extra)
    cases["extra capabilities"] = (extra, "cap_net_raw=ep")
    cases["missing"] = (base / "missing", "cap_net_raw=ep")
    return cases


def test_verdicts_with_cached_facts_equal_the_full_path(
    tree: Path,
    cache_dir: Path,
    new_process: None,
    inspected: list[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every refusal case (writable file or directory, other owner, hard link, untrusted
    symlink, script, loader, runtime, wrong or extra capabilities, missing) gets the same
    verdict with the ELF facts from the cache as with a fresh parse."""
    cases = _cases(tree)
    entries = {name: _entry(path, caps) for name, (path, caps) in cases.items()}

    def verdicts() -> dict[str, tuple[str, str, str]]:
        out = {}
        for name, entry in entries.items():
            outcome = reconcile(entry, write=False)
            out[name] = (outcome.status.value, outcome.reason, outcome.found)
        return out

    cold = verdicts()
    assert restart(cache_dir, monkeypatch) >= 8
    inspected.clear()
    assert verdicts() == cold
    assert inspected == [], "the cached facts were not used"
    assert cold["in sync"][0] == "in-sync"
    assert cold["drift"][0] == "drift"
    refused = [name for name, verdict in cold.items() if verdict[0] == "refused"]
    assert set(refused) >= {
        "group-writable file",
        "group-writable directory",
        "non-root owner",
        "untrusted symlink on the route",
        "script",
        "loader copy",
        "links a runtime",
    }, cold


def test_elf_cache_is_bounded_and_checked(cache_dir: Path, new_process: None) -> None:
    """More files than the in-memory bound, other marker symbols, bad keys: nothing restored."""
    genuine = {"symbols": list(MARKER_SYMBOLS), "facts": [], "keys": "", "of": []}
    key = "00" * files._ELF_KEY.size
    fact = [2, 1, 2, 62, "/lib/ld.so", True, ["libc.so.6"], None, []]
    one = {**genuine, "facts": [fact], "keys": key, "of": [0]}
    bad = [
        {
            **genuine,
            "keys": key * (files._ELF_CACHE_SIZE + 1),
            "of": [None] * (files._ELF_CACHE_SIZE + 1),
        },
        {**one, "symbols": ["Py_Main"]},
        {**one, "keys": "zz" * files._ELF_KEY.size},
        {**one, "keys": key[:-2]},
        {**one, "keys": key * 2},
        {**one, "of": [1]},
        {**one, "of": [True]},
        {**one, "of": 0},
        {**one, "facts": [[9, *fact[1:]]]},
        {**one, "facts": [[*fact[:5], 1, *fact[6:]]]},
        {**one, "facts": [[*fact[:8], ["system"]]]},
        {**one, "facts": [[*fact[:6], "libc.so.6", *fact[7:]]]},
        {**one, "facts": [fact[:-1]]},
        [],
        None,
    ]
    for data in bad:
        assert files.restore_elf_facts(data) == 0, data
    assert files.restore_elf_facts(one) == 1


# -- settings and the daemon --------------------------------------------------------------


def test_cache_directory_setting() -> None:
    """Default /var/cache/capkeeper; empty disables (None); relative is refused."""

    assert Settings().cache_directory == DEFAULT_CACHE_DIRECTORY == "/var/cache/capkeeper"
    assert load_settings({}, environ={"CAPKEEPER_CACHE_DIRECTORY": ""}).cache_directory is None
    assert load_settings({}, environ={"CAPKEEPER_CACHE_DIRECTORY": "/x"}).cache_directory == "/x"
    with pytest.raises(SettingsError, match="CAPKEEPER_CACHE_DIRECTORY: must be an absolute path"):
        load_settings({}, environ={"CAPKEEPER_CACHE_DIRECTORY": "rel"})


def _run_daemon(state: Path, cache: Path | None, status: Path) -> None:
    """Run the daemon in process until READY=1, then stop it."""
    settings = Settings(
        state=state, status_file=status, cache_directory=cache, rescan_interval=3600
    )
    with capture_logs():  # its own logger: the one configured globally may be gone
        daemon = Daemon(settings, logger=structlog.get_logger(), install_signals=False)

        def stop_when_ready() -> None:
            if daemon.ready.wait(30):
                daemon.request_stop()

        thread = threading.Thread(target=stop_when_ready, daemon=True)
        thread.start()
        daemon.run()
        thread.join()


def test_daemon_writes_and_uses_its_cache(  # noqa: PLR0917 - fixtures
    tree: Path,
    tmp_path: Path,
    cache_dir: Path,
    new_process: None,
    inspected: list[str],
    parsed: list[int],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The daemon writes both caches; a restart parses no state file and no ELF file and
    restores what drifted meanwhile; with cache_directory = "" nothing is written."""
    binaries = [make_binary(tree / f"b{i}") for i in range(5)]
    state = tmp_path / "state.toml"
    state.write_text(
        "".join(f'[[binary]]\npath = "{b}"\ncaps = "cap_net_raw=ep"\n' for b in binaries)
    )
    _run_daemon(state, cache_dir, tmp_path / "status.json")
    assert sorted(p.name for p in cache_dir.iterdir()) == [ELF_CACHE, STATE_CACHE]
    assert all(os.getxattr(b, "security.capability") for b in binaries)
    os.removexattr(binaries[0], "security.capability")
    monkeypatch.setattr(files, "_ELF_CACHE", files._ElfCache())
    parsed.clear()
    inspected.clear()
    _run_daemon(state, cache_dir, tmp_path / "status.json")
    assert (parsed, inspected) == ([], [str(binaries[0])])  # its ctime moved: parsed again
    assert os.getxattr(binaries[0], "security.capability")
    stamps = {p.name: p.stat().st_mtime_ns for p in cache_dir.iterdir()}
    monkeypatch.setattr(files, "_ELF_CACHE", files._ElfCache())
    parsed.clear()
    inspected.clear()
    _run_daemon(state, None, tmp_path / "status.json")  # caching disabled
    assert (len(parsed), len(inspected)) == (1, 5)
    assert {p.name: p.stat().st_mtime_ns for p in cache_dir.iterdir()} == stamps


def test_one_shot_reads_a_large_state_from_the_cache(
    tmp_path: Path,
    cache_dir: Path,
    parsed: list[int],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """check and apply read (never write) the daemon's state cache, and only for a state of
    CACHE_WORTH bytes or more: below that, parsing costs less than the cache."""
    from capkeeper.state import CACHE_WORTH

    monkeypatch.setenv("CAPKEEPER_CACHE_DIRECTORY", str(cache_dir))
    small = tmp_path / "small.toml"
    small.write_text(f'[[binary]]\npath = "{tmp_path}/none"\ncaps = "cap_net_raw=ep"\n')
    warm(small, cache_dir)
    parsed.clear()
    assert main(["check", "--state", str(small)]) == 2  # missing
    assert parsed == [1]
    large = tmp_path / "large.toml"
    table = '[[binary]]\npath = "{}/none{:05}"\ncaps = "cap_net_raw=ep"\n'
    count = CACHE_WORTH // len(table) + 1
    large.write_text("".join(table.format(tmp_path, n) for n in range(count)))
    assert large.stat().st_size >= CACHE_WORTH
    before = (cache_dir / STATE_CACHE).stat()
    parsed.clear()
    assert main(["check", "--state", str(large)]) == 2
    assert parsed == [1]  # a miss: parsed, and the one-shot wrote nothing
    assert (cache_dir / STATE_CACHE).stat().st_mtime_ns == before.st_mtime_ns
    warm(large, cache_dir)
    capsys.readouterr()
    for command in ("check", "apply"):
        parsed.clear()
        assert main([command, "--state", str(large), "--json"]) == 2
        assert parsed == []
        lines = capsys.readouterr().out.splitlines()
        assert len(lines) == count
        assert all('"status": "missing"' in line or '"missing"' in line for line in lines)


def test_script_written_over_a_cached_elf_is_refused(
    tree: Path, cache_dir: Path, new_process: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cached ELF rewritten in place by a #! script of the same size, mtime set back: the
    next process refuses it as a script, exactly as without any cache."""
    binary = make_binary(tree / "tool")
    setcap("cap_net_raw=ep", binary)
    entry = _entry(binary)
    assert reconcile(entry, write=False).status.value == "in-sync"
    before = binary.stat()
    restart(cache_dir, monkeypatch)
    script = b"#!/bin/sh\nexec /bin/sh\n"
    binary.write_bytes(script + b"#" * (before.st_size - len(script)))
    os.utime(binary, ns=(before.st_atime_ns, before.st_mtime_ns))
    cached = reconcile(entry, write=False)
    monkeypatch.setattr(files, "_ELF_CACHE", files._ElfCache())
    uncached = reconcile(entry, write=False)
    assert cached.status.value == "refused"
    assert (cached.status, cached.reason) == (uncached.status, uncached.reason)


def test_stale_elf_facts_are_dropped_at_the_next_save(
    tree: Path, cache_dir: Path, new_process: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Facts restored for a file that changed since are not saved again: the cache holds
    the files as they are, not every version ever seen; unchanged, it is not rewritten."""
    paths = [make_binary(tree / f"bin{i}") for i in range(3)]
    for path in paths:
        files.observe(str(path))
    assert restart(cache_dir, monkeypatch) == 3
    os.chmod(paths[0], 0o750)  # ctime moves: a new key
    for path in paths:
        files.observe(str(path))
    assert restart(cache_dir, monkeypatch) == 3  # two restored + one new; the old one gone
    written = (cache_dir / ELF_CACHE).stat().st_mtime_ns
    for path in paths:
        files.observe(str(path))
    assert Cache(cache_dir, writable=True).save_elf_facts() is False  # nothing changed
    assert (cache_dir / ELF_CACHE).stat().st_mtime_ns == written
