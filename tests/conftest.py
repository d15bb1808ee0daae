"""Shared fixtures. Tests touch real files, real xattrs and real inotify.

In CI (``CI=true``) a skipped test is a failure: every tool and privilege the
suite needs is installed by ``make test``, so a skip there hides a gap.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

# Property tests assert what holds for every input, never how fast one example
# runs: on a loaded 2-core machine a single example can take far longer than
# Hypothesis's default 200 ms deadline, which would make the suite depend on luck.
settings.register_profile("capkeeper", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("capkeeper")

IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}


@pytest.fixture(scope="session")
def installed_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An interpreter laid out as an installed capkeeper's (``bench/run_all.py``, which
    ``make bench`` runs every benchmark with): this checkout and this venv's packages
    on its plain path, none of this venv's start-up hooks (the editable install's
    imports pathlib)."""
    bench = str(Path(__file__).resolve().parent.parent / "bench")
    sys.path.insert(0, bench)
    try:
        import run_all  # bench/ is no package

        return Path(run_all.installed_python(tmp_path_factory.mktemp("python")))
    finally:
        sys.path.remove(bench)


def require_root() -> None:
    """Skip (outside CI) when not root: file capabilities need CAP_SETFCAP."""
    if os.geteuid() != 0:
        pytest.skip("needs root (CAP_SETFCAP) to write security.capability")


def require_tool(name: str) -> str:
    """Return the path of an external tool, or skip when it is missing."""
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"needs the '{name}' tool (make test installs it)")
    return path


@pytest.fixture
def root() -> None:
    require_root()


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A root-owned, non-world-writable directory for managed binaries.

    pytest's tmp_path lives under /tmp (sticky, world-writable) whose parents
    are root-owned, so the trust policy accepts files below it when every
    component is root-owned and mode 0755.
    """
    require_root()
    base = tmp_path / "tree"
    base.mkdir(mode=0o755)
    os.chmod(tmp_path, 0o755)
    return base


def elf_source() -> Path:
    """A small real ELF binary to copy as a managed binary."""
    return Path(shutil.which("true") or "/bin/true")


def make_binary(path: Path, *, mode: int = 0o755, content: bytes | None = None) -> Path:
    """Create a real ELF executable at ``path`` (a copy of ``true``)."""
    data = content if content is not None else elf_source().read_bytes()
    path.write_bytes(data)
    os.chmod(path, mode)
    return path


def getcap(path: Path) -> str:
    """What the reference tool ``getcap`` prints for ``path`` (text after the path)."""
    tool = require_tool("getcap")
    out = subprocess.run([tool, str(path)], capture_output=True, text=True, check=True).stdout
    return out.strip().removeprefix(str(path)).strip()


def setcap(text: str, path: Path) -> None:
    tool = require_tool("setcap")
    subprocess.run([tool, text, str(path)], capture_output=True, text=True, check=True)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """In CI, turn any skip into a failing exit status."""
    if not IN_CI:
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = reporter.stats.get("skipped", []) if reporter is not None else []
    if skipped and session.exitstatus == 0:
        session.exitstatus = 1
        if reporter is not None:
            reporter.write_line(
                f"CI=true: {len(skipped)} test(s) skipped; a skip in CI is a failure",
                red=True,
            )
