"""The ``systemd_sandbox`` fixture, as a pytest plugin module.

A test module that needs the sandbox declares::

    pytest_plugins = ["tests.sandbox_fixture"]

so that pytest registers the fixture once for the whole session. (Importing the
fixture function into several modules would register one fixture per module,
and boot one sandbox per module.) ``tests/conftest.py`` can take over the
declaration later, and the modules then drop theirs.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.sandbox import SystemdSandbox, unavailable_reason

REPO = Path(__file__).resolve().parents[1]

_booted: list[SystemdSandbox] = []


# The sandbox mounts fresh file systems here, hiding what the host has below them.
_REPLACED_IN_SANDBOX = (Path("/tmp"), Path("/run"), Path("/dev"))


def _dirs_outside_root_fs() -> list[Path]:
    """The checkout and the Python installation, unless the overlay already shows them.

    Those on ``/``'s file system are visible inside through the overlay, except
    below ``/tmp``, ``/run`` and ``/dev``, which the sandbox replaces (CI may
    clone the checkout under ``/tmp``); the others are bound.
    """
    root_dev = os.stat("/").st_dev
    candidates = {REPO, Path(sys.prefix).resolve(), Path(sys.base_prefix).resolve()}
    return sorted(
        p
        for p in candidates
        if p.is_dir()
        and (
            os.stat(p).st_dev != root_dev or any(p.is_relative_to(r) for r in _REPLACED_IN_SANDBOX)
        )
    )


@pytest.fixture(scope="session")
def systemd_sandbox() -> Iterator[SystemdSandbox]:
    """A throwaway systemd booted once per session, killed at its end (also on Ctrl-C)."""
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    sandbox = SystemdSandbox(binds=_dirs_outside_root_fs())
    try:
        sandbox.boot()
        _booted.append(sandbox)
        yield sandbox
    finally:
        sandbox.kill()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Report how long the session's sandbox took to boot."""
    for sandbox in _booted:
        terminalreporter.write_line(
            f"systemd sandbox: booted to {sandbox.state} in {sandbox.boot_seconds:.2f}s"
            + (f"; failed units: {' '.join(sandbox.failed_units)}" if sandbox.failed_units else "")
        )
