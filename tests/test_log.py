"""The capkeeper logger keeps structlog's bound logger, yet follows every reconfiguration."""

from __future__ import annotations

import io
import json
import logging

import structlog
from structlog.testing import capture_logs

from capkeeper.log import configure, get_logger, keeps


def _events(stream: io.StringIO) -> list[tuple[str, str]]:
    return [(e["event"], e["level"]) for e in map(json.loads, stream.getvalue().splitlines())]


def test_each_configure_takes_effect_on_a_logger_already_used() -> None:
    """Another stream or level given to configure() applies to the same logger at once."""
    first, second = io.StringIO(), io.StringIO()
    log = get_logger()
    try:
        configure("json", "info", stream=first)
        log.debug("dropped")
        log.info("one", n=1)
        configure("json", "debug", stream=second)
        log.debug("two")
        log.bind(k=2).warning("three")
        assert _events(first) == [("one", "info")]
        assert _events(second) == [("two", "debug"), ("three", "warning")]
        assert json.loads(second.getvalue().splitlines()[1])["k"] == 2
    finally:
        configure("json", "info", stream=io.StringIO())


def test_structlog_configured_directly_and_captured_logs_are_followed() -> None:
    """structlog.configure() (as tests do) and capture_logs() apply to the logger too."""
    log = get_logger()
    configure("json", "info", stream=io.StringIO())
    log.info("warm")  # the bound logger is assembled and kept
    previous = structlog.get_config()
    try:
        structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG))
        with capture_logs() as logs:
            log.debug("seen", path="/x")
        assert logs == [{"event": "seen", "path": "/x", "log_level": "debug"}]
    finally:
        structlog.configure(**previous)
    with capture_logs() as logs:
        log.debug("not seen")
        log.info("seen again")
    assert [e["event"] for e in logs] == ["seen again"]


def test_keeps_follows_the_configured_level() -> None:
    """keeps() answers what the logger would drop, so a caller can skip building it."""
    log = get_logger()
    try:
        configure("json", "info", stream=io.StringIO())
        assert not keeps(log, "debug")
        assert keeps(log, "info")
        assert keeps(log, "critical")
        configure("json", "debug", stream=io.StringIO())
        assert keeps(log, "debug")
        assert keeps(structlog.wrap_logger(structlog.testing.CapturingLogger()), "debug")
    finally:
        configure("json", "info", stream=io.StringIO())
