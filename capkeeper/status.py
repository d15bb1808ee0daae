"""What the daemon knows about each declared binary, and the views rendered from it.

The daemon keeps one :class:`StatusBook`: an :class:`EntryState` per declared
binary (its last verdict, counters, and its :class:`~capkeeper.schedule.Pacing`)
plus daemon-wide counters. It records every outcome there, and renders from
it: the status file (a JSON snapshot written atomically, temp file + rename,
to its runtime directory whenever something changed), the Prometheus
textfile (:func:`metrics_text`) and the one-line ``STATUS=`` text for systemd
(:func:`status_line`). ``capkeeper status`` reads the status file back
through :mod:`capkeeper.snapshot` (pydantic: the daemon never imports it).

Names: a *verdict* is a :class:`~capkeeper.reconcile.Status`; an entry's
``status`` is that verdict as the status file shows it.
"""

from __future__ import annotations

import itertools
import json
import os
import time
from collections import Counter
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from capkeeper.reconcile import Outcome, Status, tampering
from capkeeper.schedule import Pacing
from capkeeper.systemd import write_atomically

if TYPE_CHECKING:
    from _typeshed import StrPath

SCHEMA = 1
_UNKNOWN = "unknown"  # the status of an entry not checked yet


class EntryState:
    """What the daemon knows about one declared binary: the one record per entry."""

    __slots__ = (
        "expected",
        "failures",
        "found",
        "last_change",
        "last_drift",
        "pacing",
        "path",
        "reason",
        "refusals",
        "restores",
        "verdict",
    )

    def __init__(self, path: str, expected: str) -> None:
        self.path = path
        self.expected = expected
        self.verdict: Status | None = None  # the last check's verdict (None: not checked yet)
        self.found = ""  # what the file carries now (after a restore: the expected set)
        self.reason = ""
        self.restores = 0
        self.refusals = 0
        self.failures = 0
        self.last_drift: float | None = None  # unix time of the last restore/drift
        self.last_change: float | None = None  # unix time the status last changed
        self.pacing = Pacing()

    @property
    def shown(self) -> Status | None:
        """The verdict as the status file shows it: after a restore the file is in sync."""
        return Status.IN_SYNC if self.verdict is Status.RESTORED else self.verdict

    @property
    def status(self) -> str:
        """:attr:`shown` as text."""
        shown = self.shown
        return _UNKNOWN if shown is None else str(shown)

    @status.setter
    def status(self, text: str) -> None:
        self.verdict = None if text == _UNKNOWN else Status(text)

    def snapshot(self) -> dict[str, Any]:
        """The entry as the status file holds it."""
        return {
            "path": self.path,
            "expected": self.expected,
            "status": self.status,
            "found": self.found,
            "reason": self.reason,
            "restores": self.restores,
            "refusals": self.refusals,
            "failures": self.failures,
            "last_drift": self.last_drift,
            "last_change": self.last_change,
        }


# The daemon-wide fields of the status file, in the order it has them.
_SNAPSHOT_FIELDS = (
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
)


class StatusBook:
    """Counters and the per-entry states, fed with every outcome."""

    def __init__(self, *, rescan_interval: float | None = None) -> None:
        self.pid = os.getpid()
        self.started = time.time()
        self.state_files: list[str] = []
        self.entries: dict[str, EntryState] = {}
        self.restores = 0
        self.refusals = 0
        self.failures = 0
        self.rescans = 0
        self.overflows = 0
        self.reloads = 0
        self.rejected_reloads = 0
        self.watches = 0
        self.rescan_interval = rescan_interval  # the daemon's; metrics are rewritten this often
        self.last_drift: dict[str, Any] | None = None
        self.last_error: str | None = None
        # Not in the status file: what the STATUS= text also shows.
        self.last_drift_kind = ""  # "restored" or "tampering" (capabilities beyond the set)
        self.rejected: tuple[str, list[str]] | None = None  # a reload rejected: time, problems
        self.verdicts: Counter[Status] = Counter()  # entries per last verdict
        self.dirty = True

    def load(self, expected: dict[str, str], files: list[str]) -> None:
        """Track exactly the entries of a (re)loaded state."""
        self.state_files = files
        for path in self.entries.keys() - expected.keys():
            verdict = self.entries[path].verdict
            if verdict is not None:
                self.verdicts[verdict] -= 1
        self.entries = {
            path: self.entries.get(path) or EntryState(path, text)
            for path, text in expected.items()
        }
        for path, text in expected.items():
            self.entries[path].expected = text
        self.dirty = True

    def record(self, outcome: Outcome, *, cause: str, now: float | None = None) -> bool:
        """Fold one outcome in; return True when the entry's status changed."""
        path = outcome.entry.path
        record = self.entries.get(path)
        if record is None:
            record = self.entries[path] = EntryState(path, outcome.expected)
        verdict, last = outcome.status, record.verdict
        # Whether the status file's line changes: the clock is read only then, or for a
        # restore.
        changed = record.shown is not verdict or record.found != outcome.found
        stamped = changed or verdict is Status.RESTORED
        stamp = (time.time() if now is None else now) if stamped else 0.0
        if verdict is Status.RESTORED:
            record.restores += 1
            self.restores += 1
            record.last_drift = stamp
            self.last_drift = {
                "path": record.path,
                "found": outcome.found,
                "expected": outcome.expected,
                "cause": cause,
                "time": stamp,
            }
            self.last_drift_kind = (
                "tampering" if tampering(verdict, outcome.extra) else str(verdict)
            )
            changed = True
        elif verdict is Status.REFUSED and changed:
            record.refusals += 1
            self.refusals += 1
        elif verdict is Status.FAILED and changed:
            record.failures += 1
            self.failures += 1
        if last is not verdict:
            if last is not None:
                self.verdicts[last] -= 1
            self.verdicts[verdict] += 1
        record.verdict = verdict
        # After a restore the file is in sync: show that, but keep the found value.
        record.found = outcome.expected if verdict is Status.RESTORED else outcome.found
        record.reason = outcome.reason
        if changed:
            record.last_change = stamp
            self.dirty = True
        return changed

    def snapshot(self) -> dict[str, Any]:
        """A JSON-ready copy; cheap (no deep copy) since the daemon takes one per write."""
        data = {name: getattr(self, name) for name in _SNAPSHOT_FIELDS}
        data["schema"] = SCHEMA
        data["entries"] = [e.snapshot() for e in self.entries.values()]
        data["written"] = time.time()
        return data


def status_line(book: StatusBook, *, directories: int) -> str:
    """The one-line ``STATUS=`` text for systemd: size, trouble, last drift, rejected reload."""
    text = (
        f"watching {len(book.entries)} binaries in {directories} "
        f"directories ({book.watches} inotify watches)"
    )
    trouble = [
        f"{book.verdicts[v]} {v}"
        for v in (Status.REFUSED, Status.FAILED, Status.MISSING)
        if book.verdicts[v]
    ]
    if trouble:
        text += "; " + ", ".join(trouble)
    drift = book.last_drift
    if drift is not None:
        at = time.strftime("%H:%M:%S", time.localtime(drift["time"]))
        text += f"; last drift {at} {drift['path']} {book.last_drift_kind} ({drift['cause']})"
    else:
        text += "; no drift seen"
    if book.rejected is not None:
        at, problems = book.rejected
        text += (
            f"; state reload rejected at {at} ({len(problems)} problem"
            f"{'s' if len(problems) != 1 else ''}: {problems[0]}), previous state in force"
        )
    return text


def write_status(path: StrPath, book: StatusBook) -> None:
    """Atomically replace the status file with the book's snapshot."""
    write_atomically(path, status_text(book))
    book.dirty = False


def status_text(book: StatusBook) -> Iterator[str]:
    """The status file's text in pieces, 256 entries at a time: exactly
    ``json.dumps(book.snapshot(), separators=(",", ":")) + "\\n"``, without building the
    snapshot of every entry and the whole text at once (10,000 entries' dicts and
    text stay in the daemon's heap as fragmentation: ~10 MB of RSS, measured)."""
    compact = json.JSONEncoder(separators=(",", ":")).encode
    head = {name: getattr(book, name) for name in _SNAPSHOT_FIELDS}
    head["schema"] = SCHEMA
    yield compact(head)[:-1] + ',"entries":['
    records = iter(book.entries.values())
    separator = ""
    # A few hundred entries per encoder call: nearly its speed on the whole list.
    while chunk := [record.snapshot() for record in itertools.islice(records, 256)]:
        yield separator + compact(chunk)[1:-1]
        separator = ","
    yield '],"written":' + compact(time.time()) + "}\n"


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def metrics_text(book: StatusBook, *, now: float | None = None) -> str:
    """A Prometheus textfile-collector snapshot of the book, written at ``now``.

    The daemon rewrites the file whenever something changed and at least once
    per periodic rescan, so ``capkeeper_metrics_timestamp_seconds`` older than
    ``capkeeper_rescan_interval_seconds`` (plus slack) means the daemon stopped
    or hangs (``packaging/prometheus/capkeeper.rules.yml``).
    """
    stamp = time.time() if now is None else now
    out = [
        "# HELP capkeeper_metrics_timestamp_seconds When the daemon wrote this file (unix time).",
        "# TYPE capkeeper_metrics_timestamp_seconds gauge",
        f"capkeeper_metrics_timestamp_seconds {stamp:.3f}",
        "# HELP capkeeper_restores_total Capabilities re-applied to declared binaries.",
        "# TYPE capkeeper_restores_total counter",
        f"capkeeper_restores_total {book.restores}",
        "# HELP capkeeper_refusals_total Restores refused by the trust policy.",
        "# TYPE capkeeper_refusals_total counter",
        f"capkeeper_refusals_total {book.refusals}",
        "# HELP capkeeper_failures_total Restores that failed (EPERM, EROFS, ...).",
        "# TYPE capkeeper_failures_total counter",
        f"capkeeper_failures_total {book.failures}",
        "# HELP capkeeper_rescans_total Full reconciles of every declared binary.",
        "# TYPE capkeeper_rescans_total counter",
        f"capkeeper_rescans_total {book.rescans}",
        "# HELP capkeeper_watched_entries Declared binaries being enforced.",
        "# TYPE capkeeper_watched_entries gauge",
        f"capkeeper_watched_entries {len(book.entries)}",
        "# HELP capkeeper_inotify_watches inotify watches in use.",
        "# TYPE capkeeper_inotify_watches gauge",
        f"capkeeper_inotify_watches {book.watches}",
    ]
    if book.rescan_interval is not None:
        out += [
            "# HELP capkeeper_rescan_interval_seconds Seconds between the daemon's full rescans.",
            "# TYPE capkeeper_rescan_interval_seconds gauge",
            f"capkeeper_rescan_interval_seconds {book.rescan_interval:g}",
        ]
    out += [
        "# HELP capkeeper_last_drift_timestamp_seconds Last restore of a binary (unix time).",
        "# TYPE capkeeper_last_drift_timestamp_seconds gauge",
    ]
    for record in book.entries.values():
        if record.last_drift is not None:
            out.append(
                f'capkeeper_last_drift_timestamp_seconds{{path="{_label(record.path)}"}} '
                f"{record.last_drift:.3f}"
            )
    out += [
        "# HELP capkeeper_entry_in_sync 1 when the declared binary carries its declared set.",
        "# TYPE capkeeper_entry_in_sync gauge",
    ]
    for record in book.entries.values():
        ok = 1 if record.status == str(Status.IN_SYNC) else 0
        out.append(f'capkeeper_entry_in_sync{{path="{_label(record.path)}"}} {ok}')
    out += [
        "# HELP capkeeper_entry_status The declared binary's current status (the label), always 1.",
        "# TYPE capkeeper_entry_status gauge",
    ]
    for record in book.entries.values():
        out.append(
            f'capkeeper_entry_status{{path="{_label(record.path)}",'
            f'status="{_label(record.status)}"}} 1'
        )
    out += [
        "# HELP capkeeper_entry_restores_total Capabilities re-applied to this declared binary.",
        "# TYPE capkeeper_entry_restores_total counter",
    ]
    for record in book.entries.values():
        out.append(
            f'capkeeper_entry_restores_total{{path="{_label(record.path)}"}} {record.restores}'
        )
    return "\n".join(out) + "\n"


def write_metrics(path: StrPath, book: StatusBook, *, now: float | None = None) -> None:
    write_atomically(path, metrics_text(book, now=now))
