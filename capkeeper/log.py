"""structlog configuration, done once at the entry point.

Events are named (``capability_restored``) and carry fields. On a terminal
they render as readable lines, in a pipe as JSON lines, and under systemd
(when stderr is journald's stream) as native journal entries.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, Literal, TextIO

import structlog

from capkeeper.events import render_message
from capkeeper.journal import JournalRenderer, stderr_is_journal

LogFormat = Literal["auto", "console", "json", "journal"]
LEVELS = ("debug", "info", "warning", "error", "critical")


class ConsoleRenderer:
    """``HH:MM:SS level sentence`` lines for people at a terminal."""

    def __call__(self, _logger: Any, method: str, event_dict: dict[str, Any]) -> str:
        event = str(event_dict.pop("event", ""))
        stamp = str(event_dict.pop("timestamp", ""))[11:19]
        level = str(event_dict.pop("level", method))
        exc = event_dict.pop("exception", None)
        line = f"{stamp} {level:<8} {render_message(event, event_dict)}"
        return f"{line}\n{exc}" if exc else line


def resolve_format(fmt: LogFormat, stream: TextIO) -> LogFormat:
    """Pick the concrete format for ``auto``."""
    if fmt != "auto":
        return fmt
    if stream is sys.stderr and stderr_is_journal():
        return "journal"
    return "console" if stream.isatty() else "json"


def configure(fmt: LogFormat = "auto", level: str = "info", stream: TextIO | None = None) -> str:
    """Configure structlog for the whole process; return the concrete format used."""
    out = stream if stream is not None else sys.stderr
    concrete = resolve_format(fmt, out)
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
    ]
    if concrete == "journal":
        processors.append(JournalRenderer(fallback=out))
    elif concrete == "console":
        processors.append(ConsoleRenderer())
    else:
        processors.append(structlog.processors.JSONRenderer(sort_keys=False))
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=structlog.PrintLoggerFactory(file=out),
        cache_logger_on_first_use=False,
    )
    return concrete


def get_logger() -> Any:
    return structlog.get_logger("capkeeper")
