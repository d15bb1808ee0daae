"""The daemon's status book, status file, metrics textfile and `capkeeper status`."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import tempfile
import time
import unicodedata
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from capkeeper.capabilities import format_text, parse
from capkeeper.cli import ExitStatus, main
from capkeeper.enforce import reconcile
from capkeeper.model import Entry
from capkeeper.status import StatusBook, metrics_text, write_metrics, write_status
from tests.conftest import make_binary


def _entry(path: Path) -> Entry:
    caps = parse("cap_net_raw=ep", last_cap=40)
    return Entry(path=str(path), caps=caps, caps_text=format_text(caps, last_cap=40))


def test_book_counts_restores_and_refusals_once(tree: Path) -> None:
    """Restores always count; a refusal counts once until its status changes."""
    good = _entry(make_binary(tree / "good"))
    bad = _entry(make_binary(tree / "bad", mode=0o777))
    book = StatusBook()
    book.load({good.path: good.caps_text, bad.path: bad.caps_text}, ["state.toml"])
    assert book.record(reconcile(good, write=True), cause="startup", now=100.0)
    assert not book.record(reconcile(good, write=True), cause="periodic", now=101.0)
    for _ in range(3):
        book.record(reconcile(bad, write=True), cause="periodic", now=102.0)
    assert (book.restores, book.refusals) == (1, 1)
    assert book.entries[good.path].status == "in-sync"
    assert book.entries[good.path].last_drift == 100.0
    assert book.entries[bad.path].status == "refused"
    assert book.last_drift is not None
    assert book.last_drift["cause"] == "startup"


def test_status_file_and_command(tree: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The status file is written atomically and `capkeeper status` renders it."""
    good = _entry(make_binary(tree / "good"))
    book = StatusBook()
    book.load({good.path: good.caps_text}, ["state.toml"])
    book.record(reconcile(good, write=True), cause="startup")
    status_file = tree / "run" / "status.json"
    write_status(status_file, book)
    assert not book.dirty
    assert [p.name for p in status_file.parent.iterdir()] == ["status.json"]
    out = io.StringIO()
    code = main(["--log-format", "console", "status", "--status-file", str(status_file)], out=out)
    assert code == ExitStatus.OK
    text = out.getvalue()
    assert f"capkeeper daemon pid {os.getpid()}" in text
    assert "restores 1, refusals 0, failures 0" in text
    assert f"last drift: {good.path} at " in text
    assert f"in-sync   {good.path}  cap_net_raw=ep  (restores 1, last drift " in text
    out = io.StringIO()
    argv = ["--log-format", "console", "status", "--json", "--status-file", str(status_file)]
    assert main(argv, out=out) == ExitStatus.OK
    data = json.loads(out.getvalue())
    assert data["entries"][0]["path"] == good.path
    assert capsys.readouterr().err == ""


def test_status_without_daemon(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Without a status file the command says the daemon is not running."""
    missing = tmp_path / "status.json"
    code = main(["--log-format", "console", "status", "--status-file", str(missing)])
    assert code == ExitStatus.FAILED
    assert capsys.readouterr().err == (
        f"capkeeper: error: {missing}: no status file: the daemon is not running or writes it "
        "elsewhere (hint: systemctl status capkeeper; or pass --status-file)\n"
    )


def test_metrics_textfile(tree: Path) -> None:
    """The Prometheus textfile has counters, gauges and per-path last-drift times."""
    good = _entry(make_binary(tree / "good"))
    book = StatusBook()
    book.load({good.path: good.caps_text}, ["state.toml"])
    book.record(reconcile(good, write=True), cause="startup", now=1234.5)
    book.rescans = 2
    target = tree / "capkeeper.prom"
    write_metrics(target, book, now=2000.25)
    lines = target.read_text().splitlines()
    assert "capkeeper_restores_total 1" in lines
    assert "capkeeper_rescans_total 2" in lines
    assert "capkeeper_watched_entries 1" in lines
    assert f'capkeeper_last_drift_timestamp_seconds{{path="{good.path}"}} 1234.500' in lines
    assert f'capkeeper_entry_in_sync{{path="{good.path}"}} 1' in lines
    assert f'capkeeper_entry_status{{path="{good.path}",status="in-sync"}} 1' in lines
    assert f'capkeeper_entry_restores_total{{path="{good.path}"}} 1' in lines
    assert "capkeeper_metrics_timestamp_seconds 2000.250" in lines
    assert not any(line.startswith("capkeeper_rescan_interval_seconds") for line in lines)
    assert target.read_text() == metrics_text(book, now=2000.25)


def test_metrics_per_entry_status_and_freshness(tree: Path) -> None:
    """Alerts need each entry's status and restores by path, and when the daemon wrote them."""
    good = _entry(make_binary(tree / "good"))
    bad = _entry(make_binary(tree / "bad", mode=0o777))
    book = StatusBook(rescan_interval=300.0)
    book.load({good.path: good.caps_text, bad.path: bad.caps_text}, ["state.toml"])
    for _ in range(3):
        make_binary(tree / "good")  # a deploy: capabilities gone
        book.record(reconcile(good, write=True), cause="inotify", now=100.0)
    book.record(reconcile(bad, write=True), cause="startup", now=100.0)
    before = time.time()
    lines = metrics_text(book).splitlines()
    assert f'capkeeper_entry_restores_total{{path="{good.path}"}} 3' in lines
    assert f'capkeeper_entry_restores_total{{path="{bad.path}"}} 0' in lines
    assert f'capkeeper_entry_status{{path="{bad.path}",status="refused"}} 1' in lines
    assert f'capkeeper_entry_status{{path="{good.path}",status="in-sync"}} 1' in lines
    assert "capkeeper_rescan_interval_seconds 300" in lines
    (stamp,) = (line.split()[1] for line in lines if "metrics_timestamp" in line and line[0] != "#")
    assert before - 0.001 <= float(stamp) <= time.time() + 0.001  # printed to the millisecond


@pytest.mark.parametrize("content", ["[1]", '{"entries": [{}]}', "{}", "not json"])
def test_malformed_status_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str
) -> None:
    """A status file of another shape is reported, not a traceback."""
    bad = tmp_path / "status.json"
    bad.write_text(content)
    code = main(["--log-format", "console", "status", "--status-file", str(bad)])
    assert code == ExitStatus.FAILED
    err = capsys.readouterr().err
    assert err.startswith(f"capkeeper: error: {bad}: ")
    assert "status file" in err


# -- any JSON a status file can hold ------------------------------------------------------

_STAMP = 1_700_000_000.0


def _snapshot() -> dict[str, Any]:
    """A status file as the daemon writes it: one entry, a last drift and a last error."""
    book = StatusBook()
    book.load({"/usr/bin/x": "cap_net_raw=ep"}, ["/etc/capkeeper/state.toml"])
    record = book.entries["/usr/bin/x"]
    record.status, record.restores, record.last_drift = "in-sync", 1, _STAMP
    book.restores = 1
    book.last_drift = {
        "path": "/usr/bin/x",
        "found": "none",
        "expected": "cap_net_raw=ep",
        "cause": "IN_ATTRIB",
        "time": _STAMP,
    }
    book.last_error = "cannot watch /opt: permission denied"
    data: dict[str, Any] = json.loads(json.dumps(book.snapshot()))
    return data


_FIELDS: list[tuple[str | int, ...]] = [
    *((key,) for key in _snapshot()),
    ("entries", 0),
    *(("entries", 0, key) for key in _snapshot()["entries"][0]),
    *(("last_drift", key) for key in _snapshot()["last_drift"]),
]
_DELETE = object()

_JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**200), max_value=2**200)
    | st.floats()  # NaN and ±Infinity included: json.dumps writes them
    | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3)
    ),
    max_leaves=6,
)


def _with(data: dict[str, Any], where: tuple[str | int, ...], value: object) -> dict[str, Any]:
    changed = copy.deepcopy(data)
    *parents, last = where
    holder: Any = changed
    for key in parents:
        holder = holder[key]
    if value is _DELETE:
        del holder[last]
    else:
        holder[last] = value
    return changed


def _status(text: str, *options: str) -> tuple[int, str, str]:
    """Run `capkeeper status` on a status file holding ``text``; (code, stdout, stderr)."""
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "status.json"
        path.write_text(text, errors="surrogateescape")
        out, err = io.StringIO(), io.StringIO()
        argv = ["--log-format", "console", "status", "--status-file", str(path), *options]
        with contextlib.redirect_stderr(err):
            code = main(argv, out=out)
        return code, out.getvalue(), err.getvalue().replace(str(path), "STATUS")


def _not_json(name: str) -> None:
    raise AssertionError(f"{name} in --json output")


def _assert_handled(text: str) -> None:
    """Rendered (exit 0 or 2, every line safe) or refused in one line with exit 2."""
    for options in ((), ("--json",)):
        code, out, err = _status(text, *options)
        assert "internal error" not in err
        if err:
            assert (code, out) == (ExitStatus.FAILED, "")
            assert err.startswith("capkeeper: error: STATUS: not a capkeeper status file: ")
            assert err.count("\n") == 1
            assert err.endswith("\n")
            continue
        assert code in (ExitStatus.OK, ExitStatus.FAILED)
        assert out.endswith("\n")
        if options:
            json.loads(out, parse_constant=_not_json)  # strict JSON: no NaN/Infinity
        else:
            hidden = {"Cc", "Cf", "Cs", "Zl", "Zp"}
            assert not any(unicodedata.category(ch) in hidden for ch in out.replace("\n", ""))


@settings(max_examples=200, deadline=None)
@given(where=st.sampled_from(_FIELDS), value=_JSON | st.just(_DELETE))
def test_status_survives_any_value_in_any_field(
    where: tuple[str | int, ...], value: object
) -> None:
    """Whatever JSON value (or none) a field holds, `status` renders it or refuses it in one
    line with exit 2: never an internal error."""
    _assert_handled(json.dumps(_with(_snapshot(), where, value)))


@given(document=_JSON)
def test_status_survives_any_json_document(document: object) -> None:
    """A status file holding any JSON document at all is refused in one line, never a crash."""
    _assert_handled(json.dumps(document))


@pytest.mark.parametrize(
    ("where", "value", "error"),
    [
        (("started",), 1e20, "started: input should be less than 253402300800"),
        (("started",), -1e20, "started: input should be greater than or equal to 0"),
        (("written",), -1, "written: input should be greater than or equal to 0"),
        (("pid",), 10**30, "pid: input should be less than or equal to 4194304"),
        (("pid",), -5, "pid: input should be greater than or equal to 1"),
        (("restores",), -1, "restores: input should be greater than or equal to 0"),
        (("restores",), 2**64, "restores: input should be less than 9223372036854775808"),
        (("restores",), 1.5, "restores: input should be a valid integer"),
        (("watches",), "7", "watches: input should be a valid integer"),
        (("entries", 0, "last_drift"), 1e300, "entries[0].last_drift: input should be less"),
        (("entries", 0, "restores"), True, "entries[0].restores: input should be a valid integer"),
        (("entries", 0), "x", "entries[0]: input should be a valid dictionary"),
        (("last_drift", "time"), -5, "last_drift.time: input should be greater than or equal"),
        (("entries",), {"a": 1}, "entries: input should be a valid list"),
        (("state_files",), [1], "state_files[0]: input should be a valid string"),
        (("pid",), _DELETE, "pid: field required"),
    ],
)
def test_status_refuses_values_the_daemon_never_writes(
    where: tuple[str | int, ...], value: object, error: str
) -> None:
    """Huge, negative or mistyped numbers and missing keys: one line naming the field, exit 2."""
    code, out, err = _status(json.dumps(_with(_snapshot(), where, value)))
    assert (code, out) == (ExitStatus.FAILED, "")
    assert err.startswith(f"capkeeper: error: STATUS: not a capkeeper status file: {error}")
    assert err.count("\n") == 1


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ('{"started": NaN}', "NaN is not a number JSON allows"),
        ('{"watches": Infinity}', "Infinity is not a number JSON allows"),
        ('{"started": 1e400}', "1e400 is not a finite number"),
        ('{"pid": 1' + "0" * 5000 + "}", "not JSON (Exceeds the limit (4300 digits)"),
        ("[" * 100_000 + "]" * 100_000, "not JSON (maximum recursion depth exceeded"),
        ("[1]", "a JSON list, not an object"),
        ('"text"', "a JSON str, not an object"),
        ("\xff", "not JSON (Expecting value"),
    ],
)
def test_status_refuses_what_is_not_plain_json(text: str, error: str) -> None:
    """NaN, Infinity, overflowing floats, endless digits and nesting: one line, exit 2."""
    code, out, err = _status(text)
    assert (code, out) == (ExitStatus.FAILED, "")
    assert err.startswith(f"capkeeper: error: STATUS: not a capkeeper status file: {error}")
    assert err.count("\n") == 1


def test_status_escapes_names_and_reports_drift() -> None:
    """Paths in a status file are shown escaped, one line each; a drifted entry exits 2."""
    data = _snapshot()
    data["entries"][0].update(path="/opt/evil\nfake", status="drift", reason="bad\x1b[2J")
    data["last_drift"]["path"] = "/opt/\u202eevil"
    code, out, err = _status(json.dumps(data))
    assert (code, err) == (ExitStatus.FAILED, "")
    assert "last drift: /opt/\\u202eevil at " in out
    assert "\ndrift     /opt/evil\\nfake  bad\\x1b[2J  (restores 1, last drift " in out
    assert len(out.splitlines()) == 7


@pytest.mark.parametrize("count", [0, 1, 3])
def test_status_file_streamed_is_the_snapshot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, count: int
) -> None:
    """The status file, written one entry at a time, holds exactly the book's snapshot
    as one ``json.dumps`` would write it (odd paths, every kind of field)."""
    monkeypatch.setattr(time, "time", lambda: _STAMP)
    paths = ["/usr/bin/x", '/opt/a "quoted"\nname\\é', "/srv/\udcff\u2028bin"][:count]
    book = StatusBook()
    book.load(dict.fromkeys(paths, "cap_net_raw=ep"), ["/etc/capkeeper/state.toml", "ü"])
    for number, path in enumerate(paths):
        record = book.entries[path]
        record.status = ("in-sync", "refused", "unknown")[number]
        record.restores, record.last_drift, record.reason = number, _STAMP + number, "why\t"
    book.last_drift = {"path": "/usr/bin/x", "time": _STAMP, "cause": "IN_ATTRIB"}
    book.last_error, book.rescan_interval = "cannot watch /opt", float("nan")
    status_file = tmp_path / "status.json"
    write_status(status_file, book)
    expected = json.dumps(book.snapshot(), separators=(",", ":")) + "\n"
    assert status_file.read_text(errors="surrogateescape") == expected
    assert len(json.loads(status_file.read_bytes())["entries"]) == count


def test_status_file_written_without_holding_every_entry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Writing the status of 10,000 entries never holds their snapshots or the whole
    text at once: Python keeps the heap such a peak grew (the daemon's RSS)."""
    import tracemalloc

    paths = [f"/srv/app{number:05d}/bin/tool" for number in range(10_000)]
    book = StatusBook()
    book.load(dict.fromkeys(paths, "cap_net_bind_service=ep"), ["/etc/capkeeper/state.toml"])
    for record in book.entries.values():
        record.status, record.found = "in-sync", "cap_net_bind_service=ep"
    status_file = tmp_path / "status.json"
    tracemalloc.start()
    try:
        write_status(status_file, book)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    size = status_file.stat().st_size
    assert size > 2_000_000
    assert peak < size / 4, f"peak {peak} bytes for a {size}-byte status file"
    assert len(json.loads(status_file.read_bytes())["entries"]) == 10_000
    monkeypatch.setattr(time, "time", lambda: _STAMP)  # the same "written" in both
    write_status(status_file, book)
    assert status_file.read_text() == json.dumps(book.snapshot(), separators=(",", ":")) + "\n"
