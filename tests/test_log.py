"""The capkeeper logger keeps structlog's bound logger, yet follows every reconfiguration."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
import textwrap
from pathlib import Path

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


def _run(code: str) -> list[str]:
    """Run ``code`` in a fresh interpreter; its stdout lines."""
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def test_logging_an_event_leaves_asyncio_unimported_until_used() -> None:
    """structlog's import of asyncio is deferred to its first use: an event is logged
    without it, and structlog's async methods, which need it, still work."""
    lines = _run(
        """
        import io, json, sys
        from capkeeper.log import configure, get_logger
        out = io.StringIO()
        configure("json", "info", stream=out)
        get_logger().info("first", n=1)
        print("structlog" in sys.modules, "asyncio" in sys.modules, "ssl" in sys.modules)
        import structlog
        import asyncio
        print(asyncio.__name__, hasattr(asyncio, "__file__"), sys.modules["asyncio"] is asyncio)
        asyncio.run(structlog.get_logger("capkeeper").ainfo("second", n=2))
        print([json.loads(line)["event"] for line in out.getvalue().splitlines()])
        """
    )
    assert lines == ["True False False", "asyncio True True", "['first', 'second']"]


def test_logging_an_event_leaves_uuid_unimported_until_used() -> None:
    """structlog's import of uuid (and platform through it) waits for its first use too:
    an event is logged without them, and what uses uuid still gets the real module."""
    lines = _run(
        """
        import io, sys
        from capkeeper.log import configure, get_logger
        configure("json", "info", stream=io.StringIO())
        get_logger().info("first")
        print("structlog" in sys.modules, "uuid" in sys.modules, "platform" in sys.modules)
        import structlog.threadlocal
        held = structlog.threadlocal.uuid
        print(type(held).__name__, len(str(held.uuid4())))
        import uuid
        print(sys.modules["uuid"] is uuid, hasattr(uuid, "__file__"), type(held).__name__)
        """
    )
    assert lines == ["True False False", "_OnUse 36", "True True _OnUse"]


def test_asyncio_imported_first_is_the_one_structlog_uses() -> None:
    """A process that imported asyncio before logging keeps that very module."""
    lines = _run(
        """
        import asyncio, io, sys
        import structlog._native
        from capkeeper.log import configure, get_logger
        configure("json", "info", stream=io.StringIO())
        get_logger().info("x")
        print(structlog._native.asyncio is asyncio, sys.modules["asyncio"] is asyncio)
        """
    )
    assert lines == ["True True"]


def test_a_thread_importing_asyncio_meanwhile_gets_the_real_one(tmp_path: Path) -> None:
    """While another thread runs, the first event imports structlog with the real asyncio:
    a stand-in in sys.modules would be that thread's asyncio, and its import of an asyncio
    submodule would load that submodule twice (the package's names from one copy,
    sys.modules holding the other)."""
    # structlog.dev tries "import colorama": this one holds structlog's import (in its
    # module body, where no import lock the other thread needs is held) until the other
    # thread has imported, then is absent as usual.
    (tmp_path / "colorama.py").write_text(
        "import threading\n"
        "if threading.current_thread() is threading.main_thread():\n"
        "    import __main__\n"
        "    __main__.inside.set()\n"
        "    __main__.done.wait(10)\n"
        "raise ImportError('absent')\n"
    )
    lines = _run(
        f"""
        import io, sys, threading
        sys.path.insert(0, {str(tmp_path)!r})
        from capkeeper.log import configure, get_logger

        inside, done = threading.Event(), threading.Event()
        seen = {{}}

        def other():
            inside.wait(10)
            import asyncio
            seen["asyncio"] = asyncio
            import asyncio.subprocess
            done.set()

        thread = threading.Thread(target=other)
        thread.start()
        configure("json", "info", stream=io.StringIO())
        get_logger().info("first")
        thread.join()
        import asyncio
        print(seen["asyncio"] is asyncio, done.is_set())
        print(asyncio.create_subprocess_exec.__globals__ is vars(sys.modules["asyncio.subprocess"]))
        """
    )
    assert lines == ["True True", "True"]
