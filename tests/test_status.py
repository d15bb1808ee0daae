"""The daemon's status book, status file, metrics textfile and `capkeeper status`."""

from __future__ import annotations

import io
import json
import os
import time
from pathlib import Path

import pytest

from capkeeper.capabilities import format_text, parse
from capkeeper.cli import ExitStatus, main
from capkeeper.reconcile import reconcile
from capkeeper.state import Entry
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
