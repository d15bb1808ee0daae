"""The one-shot path stays cheap: an in-sync ``capkeeper apply`` (what ``ExecStartPre=``
runs before every service start) imports neither pydantic, pydantic-settings nor
structlog, with or without a settings file and CAPKEEPER_* variables, and even when
its events go to the journal; an event that is logged still imports and uses structlog.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import getcap, make_binary, setcap

HEAVY = ("pydantic", "pydantic_core", "pydantic_settings", "structlog")


@pytest.fixture
def in_sync(tree: Path) -> tuple[Path, Path]:
    """A state declaring one binary that already carries its capabilities."""
    tool = make_binary(tree / "tool")
    setcap("cap_net_raw=ep", tool)
    state = tree / "state.toml"
    state.write_text(f'[[binary]]\npath = "{tool}"\ncaps = "cap_net_raw=ep"\n')
    return state, tool


def _apply(
    argv: list[str],
    env: dict[str, str] | None = None,
    *,
    stderr: int | None = None,
    python: tuple[str, ...] = (sys.executable,),
) -> tuple[subprocess.CompletedProcess[str], set[str]]:
    """Run ``python -X importtime -m capkeeper apply ARGV``; the modules it imported."""
    result = subprocess.run(
        [*python, "-X", "importtime", "-m", "capkeeper", "apply", *argv],
        capture_output=stderr is None,
        stdout=subprocess.PIPE if stderr is not None else None,
        stderr=stderr,
        text=True,
        env={**os.environ, "CAPKEEPER_SETTINGS_FILE": "/nonexistent/settings.toml", **(env or {})},
        check=False,
    )
    lines = result.stderr.splitlines() if result.stderr else []
    imported = {line.rsplit("|", 1)[1].strip() for line in lines if line.startswith("import time:")}
    imported.discard("imported package")  # the header line
    return result, imported


def _heavy(imported: set[str]) -> list[str]:
    return sorted(m for m in imported if m.split(".")[0] in HEAVY)


def test_in_sync_apply_imports_no_heavy_module(in_sync: tuple[Path, Path]) -> None:
    """``capkeeper apply --state S PATH`` on an in-sync file: exit 0, and none of
    pydantic, pydantic_settings, structlog imported (the CLI imported all three)."""
    state, tool = in_sync
    result, imported = _apply(["--state", str(state), str(tool)])
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"in-sync   {tool}  cap_net_raw=ep\n1 declared: 1 in-sync\n"
    assert "capkeeper.state" in imported  # the run was observed at all
    assert _heavy(imported) == []


# Standard modules an in-sync one-shot has no use for, each a few ms of every service
# start (bench/bench_oneshot.py): paths are kept as text, signal is for watch, and a
# plain command line is read without argparse.
STDLIB_NOT_FOR_APPLY = ("pathlib", "signal", "argparse", "gettext")


@pytest.mark.parametrize("argv", [["--state", "{state}", "{tool}"], ["{tool}", "--state={state}"]])
def test_in_sync_apply_imports_no_standard_module_it_does_not_use(
    in_sync: tuple[Path, Path], installed_python: Path, argv: list[str]
) -> None:
    """The standard modules the one-shot used to pay for stay out of it, run as
    ``/usr/bin/capkeeper`` runs it (``python -I -m capkeeper``)."""
    state, tool = in_sync
    words = [word.format(state=state, tool=tool) for word in argv]
    result, imported = _apply(words, python=(str(installed_python), "-I"))
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"in-sync   {tool}  cap_net_raw=ep\n1 declared: 1 in-sync\n"
    assert "capkeeper.state" in imported
    assert [name for name in STDLIB_NOT_FOR_APPLY if name in imported] == []


def test_with_settings_file_and_variables(in_sync: tuple[Path, Path]) -> None:
    """With a settings file and CAPKEEPER_* variables, pydantic-settings merges and checks
    them (the price of those sources); structlog still stays out of an in-sync apply."""
    state, tool = in_sync
    settings = state.parent / "settings.toml"
    settings.write_text(f'state = "{state}"\nrescan_interval = 600\n')
    result, imported = _apply(
        [str(tool)],
        {
            "CAPKEEPER_SETTINGS_FILE": str(settings),
            "CAPKEEPER_LOG_FORMAT": "console",
            "CAPKEEPER_LOG_LEVEL": "info",  # events are logged: in-sync is a debug one
        },
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.endswith("1 declared: 1 in-sync\n")
    assert "pydantic_settings" in imported
    assert [name for name in _heavy(imported) if name.startswith("structlog")] == []


def test_under_the_journal_nothing_above_debug_is_logged(in_sync: tuple[Path, Path]) -> None:
    """In ExecStartPre= mode (stderr is journald's stream) the apply logs its events; an
    in-sync file is a debug event below the default level, so structlog is not loaded."""
    state, tool = in_sync
    read_end, write_end = os.pipe()
    try:
        st = os.fstat(write_end)
        result, imported = _apply(
            ["--state", str(state), str(tool)],
            {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"},
            stderr=write_end,
        )
        os.close(write_end)
        write_end = -1
        with os.fdopen(read_end, encoding="utf-8") as pipe:
            read_end = -1
            lines = pipe.read().splitlines()
    finally:
        for fd in (read_end, write_end):
            if fd != -1:
                os.close(fd)
    imported = {line.rsplit("|", 1)[1].strip() for line in lines if line.startswith("import ")}
    assert result.returncode == 0
    assert "capkeeper.journal" in imported  # stderr was compared with JOURNAL_STREAM
    assert [line for line in lines if not line.startswith("import time:")] == []
    assert _heavy(imported) == []


def test_a_logged_event_still_goes_through_structlog(tree: Path) -> None:
    """A restore is a warning: with a log level asked for, structlog is imported when it
    happens and the event is written as configured (JSON here)."""
    tool = make_binary(tree / "tool")
    state = tree / "state.toml"
    state.write_text(f'[[binary]]\npath = "{tool}"\ncaps = "cap_net_raw=ep"\n')
    result, imported = _apply(
        ["--state", str(state), "--log-format", "json", "--log-level", "info", str(tool)]
    )
    assert result.returncode == 0, result.stderr
    assert getcap(tool) == "cap_net_raw=ep"
    assert "structlog" in imported
    (event,) = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    assert (event["event"], event["level"], event["path"]) == (
        "capability_restored",
        "warning",
        str(tool),
    )


def test_lazy_logger_levels() -> None:
    """Below the configured level nothing is imported; at it, structlog is configured
    as asked and the event written; bind() and later events go through it too."""
    code = (
        "import io, sys\n"
        "from capkeeper.log import configure, get_logger\n"
        "out = io.StringIO()\n"
        "assert configure('json', 'warning', stream=out) == 'json'\n"
        "log = get_logger()\n"
        "log.debug('a'); log.info('b')\n"
        "assert 'structlog' not in sys.modules\n"
        "log.error('restore_failed', path='/x')\n"
        "assert 'structlog' in sys.modules\n"
        "log.info('c'); get_logger().bind(k=1).critical('d')\n"
        "print(out.getvalue(), end='')\n"
    )
    result = subprocess.run(
        [sys.executable, "-I", "-c", code], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    events = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(e["event"], e["level"]) for e in events] == [
        ("restore_failed", "error"),
        ("d", "critical"),
    ]
    assert events[1]["k"] == 1
