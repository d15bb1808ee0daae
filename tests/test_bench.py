"""The benchmarks in bench/ still run and still produce their figures.

Each new benchmark runs once in a tiny mode with ``--json``; the tests check
that the figures are there and consistent with what the benchmark did (every
binary restored, every event counted), never how fast anything was: the goals
are for ``make bench`` on an idle machine, not for a shared test runner.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import require_tool

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _run(name: str, out: Path, *args: str) -> dict[str, Any]:
    output = out / f"{name}.json"
    argv = [sys.executable, str(BENCH / f"bench_{name}.py"), *args, "--json", str(output)]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    figures: dict[str, Any] = json.loads(output.read_text())
    last = result.stdout.strip().splitlines()[-1]
    assert json.loads(last.removeprefix("BENCH-JSON ")) == figures
    return figures


# storm_probe.py times capkeeper.inotify's decoder against pyinotify's dispatch (the
# figure in inotify.py's docstring): it measures the internals on purpose.
PROBES = frozenset({"storm_probe.py"})


def test_benchmarks_use_no_capkeeper_internals() -> None:
    """Benchmarks drive the CLI only, so they keep working while modules move."""
    for script in sorted(set(BENCH.glob("*.py")) - {BENCH / name for name in PROBES}):
        for node in ast.walk(ast.parse(script.read_text())):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                modules = [node.module or ""]
            else:
                continue
            for module in modules:
                assert module.split(".")[0] not in {"capkeeper", "tests"}, (script.name, module)


@pytest.mark.usefixtures("root")
def test_oneshot_figures(tmp_path: Path) -> None:
    require_tool("setcap")
    figures = _run("oneshot", tmp_path, "--rounds", "2", "--warmup", "0", "--importtime")
    for key in ("apply_median_s", "python_median_s", "setcap_median_s", "check_median_s"):
        assert figures[key] > 0, key
    assert figures["median_ratio"] > 0
    assert figures["ratio_of_medians"] > 0
    modules = [row["module"] for row in figures["importtime_top"]]
    assert len(modules) == 15
    assert "capkeeper.cli" in modules


@pytest.mark.usefixtures("root")
def test_oneshot_against_another_interpreter(tmp_path: Path) -> None:
    """``--against PYTHON`` times that interpreter's apply in the same rounds (an A/B of
    two trees); here the same interpreter, so both run the same code."""
    require_tool("setcap")
    figures = _run(
        "oneshot", tmp_path, "--rounds", "2", "--warmup", "0", "--against", sys.executable
    )
    assert figures["against_median_s"] > 0
    assert figures["against_ratio"] > 0


@pytest.mark.usefixtures("root")
def test_scale_figures(tmp_path: Path) -> None:
    require_tool("getcap")
    figures = _run(
        "scale", tmp_path, "--directories", "5", "--per-directory", "10", "--strip", "5",
        "--idle", "0.5", "--starts", "3",
    )  # fmt: skip
    assert figures["binaries"] == 50
    # Each figure of a start in sync is the median of three starts, all kept.
    for key in ("ready_in_sync_s", "ready_warm_s"):
        each = figures[key.removesuffix("_s") + "_each_s"]
        assert len(each) == 3
        assert figures[key] == sorted(each)[1]
    # Every binary was stripped before the second start: all restored by READY=1.
    assert figures["carrying_at_ready"] == 50
    assert figures["restored_logged"] == 50
    assert figures["activity_restored"] is True
    assert figures["ready_in_sync_s"] > 0
    assert figures["ready_restored_s"] > 0
    assert figures["rss_kib"] > figures["python_rss_kib"] > 0
    assert figures["idle_wakeups"] >= 0
    assert figures["exit_codes"] == [0, 0]
    assert figures["ready_warm_s"] > 0  # a third start, with the cache the others wrote
    assert figures["exit_code_warm"] == 0


@pytest.mark.usefixtures("root")
@pytest.mark.parametrize("rate", [0, 6000])
def test_storm_figures(tmp_path: Path, rate: int) -> None:
    """As fast as the host lets it, or at a fixed rate (3,000 events: half a second)."""
    args = ("--events", "3000", "--binaries", "5", "--rate", str(rate))
    figures = _run("storm", tmp_path, *args)
    assert figures["events"] == 3000
    assert figures["rate"] == rate
    if rate:
        assert figures["storm_s"] >= 3000 / rate * 0.9
    # The reader sees the whole storm, then the events of the file that ends it (its
    # IN_CREATE, and whatever else of that file the same read() returned).
    assert 3001 <= figures["baseline_events"] <= 3004 or figures["baseline_overflows"] > 0
    assert figures["daemon_cpu_s"] >= 0
    assert figures["overflow_rescans"] >= 0
    assert figures["in_sync"] == 5
    assert figures["exit_code"] == 0


def test_run_all_renders_every_row(tmp_path: Path) -> None:
    """The table has a row per figure, and says which benchmark did not run."""
    figures = {
        "oneshot": {
            "apply_median_s": 0.4, "python_median_s": 0.02, "setcap_median_s": 0.001,
            "check_median_s": 0.4, "median_ratio": 19.0, "check_ratio": 20.0,
        },
        "storm": {
            "events": 150000, "baseline_events_per_cpu_s": 99000, "events_per_cpu_s": 41000,
            "ratio": 0.41, "baseline_overflows": 0, "overflow_rescans": 2,
        },
    }  # fmt: skip
    for name, values in figures.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(values))
    argv = [sys.executable, str(BENCH / "run_all.py"), "--reuse", str(tmp_path)]
    table = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    lines = table.splitlines()
    assert lines[0] == "| figure | baseline (same run) | measured | ratio | goal | met? |"
    one_shot = next(line for line in lines if "`apply --state S PATH`" in line)
    assert "19.0\N{MULTIPLICATION SIGN}" in one_shot
    assert one_shot.endswith("| **no** |")
    overflow = next(line for line in lines if line.startswith("| overflow rescans"))
    assert overflow.endswith("| **no** |")
    for name in ("scale", "restore", "audit", "flood"):
        assert f"| `bench_{name}.py` | — | not run |" in table
    assert "| `bench_storm.py --events 30000 --rate 5000` | — | not run |" in table


def test_scale_refuses_fewer_than_one_start() -> None:
    """A median of no starts is no figure: said at once, before anything is built."""
    argv = [sys.executable, str(BENCH / "bench_scale.py"), "--starts", "0"]
    result = subprocess.run(argv, capture_output=True, text=True, check=False)
    assert result.returncode == 2
    assert "--starts must be 1 or more" in result.stderr
    assert "Traceback" not in result.stderr


def test_run_all_shows_the_starts_behind_a_median(tmp_path: Path) -> None:
    """A start-up figure is the median of several starts: the table says so, with their
    range, and judges the goal on the median."""
    scale = {
        "binaries": 10000, "getcap_s": 0.05, "python_stat_s": 0.03, "python_rss_kib": 9000,
        "ready_in_sync_s": 0.97, "ready_in_sync_each_s": [1.04, 0.97, 0.91],
        "ready_warm_s": 0.8, "ready_warm_each_s": [0.8], "rss_warm_kib": 40000,
        "ready_restored_s": 1.5, "carrying_at_ready": 10000, "rss_kib": 43000,
        "hwm_restored_kib": 50000, "idle_seconds": 5, "idle_after_s": 1.5, "idle_events": 0,
        "idle_wakeups": 0,
    }  # fmt: skip
    (tmp_path / "scale.json").write_text(json.dumps(scale))
    argv = [sys.executable, str(BENCH / "run_all.py"), "--reuse", str(tmp_path)]
    table = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    cold = next(line for line in table.splitlines() if "all in sync, no cache" in line)
    assert "| 0.97 s (median of 3: 0.91 to 1.04) |" in cold
    assert cold.endswith("| yes |")
    warm = next(line for line in table.splitlines() if "warm cache" in line)
    assert "| 0.80 s (VmRSS 41.0 MB) |" in warm


def test_make_bench_runs_capkeeper_as_installed(installed_python: Path) -> None:
    """run_all.py runs every benchmark under an interpreter laid out as an installed
    capkeeper's (a venv with everything on its plain path): it imports capkeeper from
    this checkout and its dependencies, and runs no start-up hook of this venv (the
    editable install's import hook costs every process tens of milliseconds)."""
    probe = (
        "import sys, capkeeper, pyinotify, structlog, xattr; "
        "print(capkeeper.__file__); print(sorted(m for m in sys.modules if 'editable' in m))"
    )
    result = subprocess.run(
        [str(installed_python), "-I", "-c", probe],
        capture_output=True,
        text=True,
        cwd="/",
        check=True,
    )
    where, hooks = result.stdout.splitlines()
    assert Path(where) == BENCH.parent / "capkeeper" / "__init__.py"
    assert hooks == "[]"
