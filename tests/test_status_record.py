"""The one per-entry record: verdict counts, the STATUS= text and the file's exact shape."""

from __future__ import annotations

import time

from capkeeper.capabilities import format_text, parse
from capkeeper.model import Entry
from capkeeper.reconcile import Outcome, Status
from capkeeper.status import StatusBook, status_line

CAPS = parse("cap_net_raw=ep", last_cap=40)
TEXT = format_text(CAPS, last_cap=40)


def _entry(path: str) -> Entry:
    return Entry(path=path, caps=CAPS, caps_text=TEXT)


def _book(*paths: str) -> StatusBook:
    book = StatusBook()
    book.load(dict.fromkeys(paths, TEXT), ["state.toml"])
    return book


def test_entry_status_shows_the_verdict_restored_as_in_sync() -> None:
    """Unchecked is "unknown"; a restore leaves the verdict RESTORED and shows "in-sync"."""
    book = _book("/a")
    record = book.entries["/a"]
    assert (record.verdict, record.status) == (None, "unknown")
    book.record(Outcome(_entry("/a"), Status.RESTORED, "none"), cause="IN_ATTRIB")
    assert (record.verdict, record.status, record.found) == (Status.RESTORED, "in-sync", TEXT)
    record.status = "refused"
    assert record.verdict is Status.REFUSED


def test_status_line_counts_trouble_and_names_the_last_drift() -> None:
    """STATUS= counts refused/failed/missing entries from the same records; a reload drops
    the counts of entries no longer declared."""
    book = _book("/a", "/b", "/c")
    book.watches = 4
    book.record(Outcome(_entry("/a"), Status.REFUSED, "none", reason="not an ELF"), cause="x")
    book.record(Outcome(_entry("/b"), Status.MISSING, "none"), cause="startup")
    book.record(Outcome(_entry("/c"), Status.RESTORED, "none", extra=True), cause="IN_ATTRIB")
    at = time.strftime("%H:%M:%S", time.localtime(book.last_drift["time"]))  # type: ignore[index]
    assert status_line(book, directories=2) == (
        "watching 3 binaries in 2 directories (4 inotify watches); 1 refused, 1 missing; "
        f"last drift {at} /c tampering (IN_ATTRIB)"
    )
    book.record(Outcome(_entry("/a"), Status.IN_SYNC, TEXT), cause="IN_CLOSE_WRITE")
    book.load({"/c": TEXT}, ["state.toml"])
    book.rejected = ("12:00:00", ["state.toml:3: entries[0].caps: bad"])
    assert status_line(book, directories=1) == (
        "watching 1 binaries in 1 directories (4 inotify watches); "
        f"last drift {at} /c tampering (IN_ATTRIB); state reload rejected at 12:00:00 "
        "(1 problem: state.toml:3: entries[0].caps: bad), previous state in force"
    )
    assert "no drift seen" in status_line(_book("/a"), directories=1)


def test_status_file_keeps_its_fields_and_order() -> None:
    """The daemon-only fields (pacing, verdict counts, rejected) stay out of the file."""
    book = _book("/a")
    book.record(Outcome(_entry("/a"), Status.RESTORED, "none"), cause="IN_ATTRIB", now=5.0)
    data = book.snapshot()
    assert list(data) == [
        "pid",
        "started",
        "state_files",
        "restores",
        "refusals",
        "failures",
        "rescans",
        "overflows",
        "reloads",
        "rejected_reloads",
        "watches",
        "rescan_interval",
        "last_drift",
        "last_error",
        "schema",
        "entries",
        "written",
    ]
    assert data["entries"] == [
        {
            "path": "/a",
            "expected": TEXT,
            "status": "in-sync",
            "found": TEXT,
            "reason": "",
            "restores": 1,
            "refusals": 0,
            "failures": 0,
            "last_drift": 5.0,
            "last_change": 5.0,
        }
    ]
