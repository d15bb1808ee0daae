"""Run every benchmark in ``bench/`` and print one table of figures against their goals.

Each benchmark runs as its own process with settings that keep the whole run
to a few minutes, writes its figures with ``--json`` into ``--out`` (its
printed output goes to ``NAME.log`` next to them), and the table puts each
figure next to its baseline from the same run and the goal of issue 11.
The table is also written to ``OUT/table.md``.

    sudo .venv/bin/python bench/run_all.py [--out build/bench] [--only scale,storm]
    .venv/bin/python bench/run_all.py --reuse DIR    # only render DIR/*.json

Each benchmark runs under an interpreter laid out as capkeeper is installed
(:func:`installed_python`), not under this one: a development venv imports
capkeeper through the editable install's import hook, which costs every
Python process of it 25 ms or more on a slow host (``pathlib`` and
``urllib.parse`` among it). No installed capkeeper pays that, and it would
inflate every baseline measured with the same interpreter (``python -I -c
pass`` above all) as much as capkeeper's own figures.

Exits 0 when every benchmark produced its figures (whether or not the goals are
met: the table says that), 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import sysconfig
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

# name -> the arguments a full `make bench` gives it (a few minutes in all).
BENCHMARKS: dict[str, list[str]] = {
    "oneshot": ["--rounds", "15", "--warmup", "2", "--importtime"],
    "scale": ["--idle", "5"],
    "storm": ["--events", "150000"],
    # The same storm at a fixed, slow rate: the figure no longer depends on how fast
    # the host lets the generator create files (5,000 to 70,000 events a second).
    "storm-slow": ["--events", "30000", "--rate", "5000"],
    "restore": ["--samples", "300", "--idle", "5"],
    "audit": ["--root", "/usr", "--rounds", "7", "--warmup", "1"],
    "flood": ["--seconds", "5", "--overflows", "1"],
}

# A benchmark run with other arguments than its name says: its script.
SCRIPTS = {"storm-slow": "storm"}

X = "\N{MULTIPLICATION SIGN}"
Figures = dict[str, dict[str, Any]]
Row = tuple[str, str, str, str, str, str]


def installed_python(where: Path) -> Path:
    """A venv at ``where`` (made again) whose interpreter imports capkeeper and its
    dependencies as an installed capkeeper's does (``packaging/install-tree.sh``: a
    venv with everything in its site-packages), with nothing else at start-up: a
    ``.pth`` file of plain paths, this checkout and this interpreter's site-packages
    (whose own ``.pth`` hooks, the editable install's, are not run then)."""
    subprocess.run(
        [sys.executable, "-m", "venv", "--without-pip", "--clear", str(where)], check=True
    )
    paths = {str(REPO), sysconfig.get_path("purelib"), sysconfig.get_path("platlib")}
    scheme = {"base": str(where), "platbase": str(where)}
    site = Path(sysconfig.get_path("purelib", vars=scheme))
    (site / "capkeeper-bench.pth").write_text("".join(f"{path}\n" for path in sorted(paths)))
    return where / "bin" / "python"


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def _s(seconds: float) -> str:
    return f"{seconds:.2f} s"


def _mb(kib: float) -> str:
    return f"{kib * 1024 / 1e6:.1f} MB"


def _met(ok: bool) -> str:
    return "yes" if ok else "**no**"


def _rows_oneshot(f: dict[str, Any]) -> list[Row]:
    return [
        (
            "one-shot `apply --state S PATH` (in sync)",
            f"`python -I -c pass` {_ms(f['python_median_s'])}",
            f"{_ms(f['apply_median_s'])} (`setcap -v` {_ms(f['setcap_median_s'])})",
            f"{f['median_ratio']:.1f}{X}",
            f"≤ 4{X}",
            _met(f["median_ratio"] <= 4),
        ),
        (
            "one-shot `check --state S PATH` (in sync)",
            f"`python -I -c pass` {_ms(f['python_median_s'])}",
            _ms(f["check_median_s"]),
            f"{f['check_ratio']:.1f}{X}",
            "—",
            "—",
        ),
    ]


def _starts(f: dict[str, Any], key: str) -> str:
    """The median of several starts, with their range (one start: its figure)."""
    each = f.get(key.removesuffix("_s") + "_each_s") or [f[key]]
    if len(each) == 1:
        return _s(f[key])
    return f"{_s(f[key])} (median of {len(each)}: {min(each):.2f} to {max(each):.2f})"


def _rows_scale(f: dict[str, Any]) -> list[Row]:
    nan = float("nan")
    n = f"{f['binaries']:,}"
    base = f"`getcap -r` {_s(f['getcap_s'])}; Python stat+getxattr {_s(f['python_stat_s'])}"
    restored = f["carrying_at_ready"] == f["binaries"]
    return [
        (
            f"{n} binaries: start → `READY=1`, all in sync, no cache",
            base,
            _starts(f, "ready_in_sync_s"),
            f"{f['ready_in_sync_s'] / f['getcap_s']:.0f}{X} getcap",
            "≤ 1.0 s",
            _met(f["ready_in_sync_s"] <= 1.0),
        ),
        (
            f"{n} binaries: restart → `READY=1`, all in sync, warm cache",
            base,
            _starts(f, "ready_warm_s") + f" (VmRSS {_mb(f['rss_warm_kib'])})",
            f"{f['ready_warm_s'] / f['getcap_s']:.0f}{X} getcap",
            "≤ 1.0 s",
            _met(f["ready_warm_s"] <= 1.0),
        ),
        (
            f"{n} binaries: start → `READY=1`, all restored",
            base,
            f"{_s(f['ready_restored_s'])} ({f['carrying_at_ready']:,} restored at READY)",
            f"{f['ready_restored_s'] / f['getcap_s']:.0f}{X} getcap",
            "≤ 2.0 s, all restored",
            _met(f["ready_restored_s"] <= 2.0 and restored),
        ),
        (
            f"daemon RSS at {n} entries (VmRSS)",
            f"bare `python -I` {_mb(f['python_rss_kib'])}",
            f"{_mb(f['rss_kib'])} (peak VmHWM {_mb(f['hwm_restored_kib'])})",
            f"{f['rss_kib'] / f['python_rss_kib']:.1f}{X}",
            "≤ 60 MB",
            _met(f["rss_kib"] * 1024 <= 60e6),
        ),
        (
            f"{n} binaries: after `READY=1` (all restored), reading its own echo",
            "—",
            f"{f.get('echo_cpu_s', nan):.2f} CPU-s over {f.get('echo_s', nan):.2f} s",
            "—",
            "—",
            "—",
        ),
        (
            f"idle wake-ups at {n} entries, {f['idle_seconds']:g} s, "
            f"{f['idle_after_s']:g} s after activity",
            f"{f['idle_events']} events in its directories meanwhile",
            str(f["idle_wakeups"]),
            "—",
            "0 (no watchdog, rescan 3600 s)",
            _met(f["idle_wakeups"] == 0),
        ),
    ]


def _rows_storm(f: dict[str, Any]) -> list[Row]:
    full = f["baseline_overflows"] > 0
    overflow_ok = f["overflow_rescans"] == 0 or full
    rate = f", at {f['rate']:,.0f} events/s" if f.get("rate") else ""
    return [
        (
            f"irrelevant events per daemon CPU-second ({f['events']:,} events{rate})",
            f"bare inotify reader {f['baseline_events_per_cpu_s']:,}/CPU-s",
            f"{f['events_per_cpu_s']:,}/CPU-s",
            f"{f['ratio']:.2f}",
            "≥ 100,000/CPU-s",
            _met(f["events_per_cpu_s"] >= 100_000),
        ),
        (
            "overflow rescans during that storm",
            f"reader's own queue overflowed {f['baseline_overflows']}{X}",
            str(f["overflow_rescans"]),
            "—",
            "0 while the queue is not full",
            _met(overflow_ok) + (" (queue was full)" if full and f["overflow_rescans"] else ""),
        ),
    ]


def _rows_restore(f: dict[str, Any]) -> list[Row]:
    n = f"{f['binaries']:,} binaries / {f['directories']} dirs"
    return [
        (
            f"rename-over restore median ({n}, {f['samples']} samples)",
            f"minimal pyinotify restorer {f['minimal_median_ms']:.2f} ms",
            f"{f['median_ms']:.2f} ms",
            f"{f['median_ratio']:.2f}{X}",
            f"≤ 1.5{X}",
            _met(f["median_ratio"] <= 1.5),
        ),
        (
            "rename-over restore p99",
            f"minimal restorer {f['minimal_p99_ms']:.2f} ms",
            f"{f['p99_ms']:.2f} ms ({f['missed']} missed)",
            f"{f['p99_ms'] / f['minimal_p99_ms']:.2f}{X}",
            "≤ 5 ms",
            _met(f["p99_ms"] <= 5 and f["missed"] == 0),
        ),
    ]


def _rows_audit(f: dict[str, Any]) -> list[Row]:
    return [
        (
            f"`audit --format getcap {f['root']}`",
            f"`getcap -r {f['root']}` {_s(f['getcap_median_s'])}",
            _s(f["capkeeper_median_s"]),
            f"{f['median_ratio']:.2f}{X}",
            f"≤ 1.0{X}",
            _met(f["median_ratio"] <= 1.0),
        )
    ]


def _rows_flood(f: dict[str, Any]) -> list[Row]:
    restored = f["exposed_restore_s"]
    return [
        (
            "unprivileged flood: daemon CPU share",
            f"the flooders' share {f['flooder_cpu_share']:.1%}",
            f"{f['flood_cpu_share']:.1%} ({f['overflow_rescans']} overflow rescans, "
            f"{f['overflow_entries']} entries)",
            f"{f['flood_cpu_share'] / f['flooder_cpu_share']:.2f}",
            "—",
            "—",
        ),
        (
            "unprivileged flood: exposed binary stripped, restored after",
            "—",
            "not restored" if restored is None else _ms(restored),
            "—",
            "restored",
            _met(restored is not None),
        ),
    ]


ROWS: dict[str, Callable[[dict[str, Any]], list[Row]]] = {
    "oneshot": _rows_oneshot,
    "scale": _rows_scale,
    "storm": _rows_storm,
    "storm-slow": _rows_storm,
    "restore": _rows_restore,
    "audit": _rows_audit,
    "flood": _rows_flood,
}


def table(figures: Figures, failed: dict[str, str]) -> str:
    """The markdown table of every benchmark's figures (a row per missing one)."""
    lines = [
        "| figure | baseline (same run) | measured | ratio | goal | met? |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, render in ROWS.items():
        if name in figures:
            try:
                rows = render(figures[name])
            except (KeyError, TypeError, ZeroDivisionError) as exc:
                rows = [(_label(name), "—", f"figures unreadable: {exc!r}", "—", "—", "—")]
        else:
            why = failed.get(name, "not run")
            rows = [(_label(name), "—", why, "—", "—", "—")]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _label(name: str) -> str:
    """How the table names benchmark ``name``: its script, and its arguments when it
    runs under another name."""
    if name not in SCRIPTS:
        return f"`bench_{name}.py`"
    return f"`bench_{SCRIPTS[name]}.py {' '.join(BENCHMARKS[name])}`"


def machine() -> str:
    """One line about where the figures were measured."""
    fs = subprocess.run(
        ["findmnt", "-n", "-o", "FSTYPE", "-T", "/var/tmp"],  # noqa: S108 - where the benchmarks build
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return (
        f"{os.cpu_count()} CPUs ({len(os.sched_getaffinity(0))} usable), Linux "
        f"{platform.release()}, /var/tmp on {fs or '?'}, Python {platform.python_version()}, "
        f"load average {load}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "build" / "bench")
    parser.add_argument("--only", help="comma-separated names: " + ",".join(BENCHMARKS))
    parser.add_argument("--reuse", type=Path, help="render the figures already in this directory")
    args = parser.parse_args()
    figures: Figures = {}
    failed: dict[str, str] = {}
    if args.reuse:
        for name in BENCHMARKS:
            path = args.reuse / f"{name}.json"
            if path.exists():
                figures[name] = json.loads(path.read_text())
        print(table(figures, failed))
        return 0
    if os.geteuid() != 0:
        print("run_all.py needs root: the benchmarks write security.capability", file=sys.stderr)
        return 2
    names = args.only.split(",") if args.only else list(BENCHMARKS)
    unknown = set(names) - set(BENCHMARKS)
    if unknown:
        parser.error(f"unknown benchmark(s): {', '.join(sorted(unknown))}")
    args.out.mkdir(parents=True, exist_ok=True)
    before = machine()
    print(f"machine: {before}", flush=True)
    python = installed_python(args.out / "python")
    for name in names:
        output = args.out / f"{name}.json"
        output.unlink(missing_ok=True)
        script = HERE / f"bench_{SCRIPTS.get(name, name)}.py"
        argv = [str(python), str(script), *BENCHMARKS[name]]
        argv += ["--json", str(output)]
        started = time.perf_counter()
        with open(args.out / f"{name}.log", "w") as log:
            code = subprocess.run(
                argv, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, check=False
            ).returncode
        took = time.perf_counter() - started
        print(f"bench_{name}.py: exit {code} after {took:.0f} s", flush=True)
        if output.exists():
            figures[name] = json.loads(output.read_text())
        else:
            failed[name] = f"no figures (exit {code}, see {args.out / (name + '.log')})"
    text = table(figures, failed)
    report = f"machine: {before}\n\n{text}\n\nload average after the run: "
    report += " ".join(f"{x:.2f}" for x in os.getloadavg()) + "\n"
    (args.out / "table.md").write_text(report)
    print()
    print(text)
    print(f"\nlogs and figures: {args.out}")
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
