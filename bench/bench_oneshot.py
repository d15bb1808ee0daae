"""What ``capkeeper apply --state S PATH`` costs an ``ExecStartPre=``, against bare Python.

Declares ``--entries`` copies of ``true`` (root-owned, 0755, already carrying
their capabilities: the in-sync case every service start meets) under a fresh
``/var/tmp/capkeeper-bench-oneshot-*``. Each round runs, in this order:

1. ``capkeeper apply --state S PATH``, run as ``/usr/bin/capkeeper`` runs it
   (``python -I -m capkeeper``, with this interpreter);
2. ``python -I -c pass`` with the same interpreter: the floor any Python
   command pays;
3. ``setcap -v CAPS PATH``: what the C tool needs to verify the same thing;
4. ``capkeeper check --state S PATH``.

The capkeeper package is byte-compiled first, as the packages' postinst does
(``compileall``): an editable install run under ``PYTHONDONTWRITEBYTECODE=1``
would otherwise compile every module from source on every run, ~70 ms that no
installed capkeeper pays. ``--source`` skips that, to measure the cold case.

After ``--warmup`` rounds, ``--rounds`` rounds are timed (wall clock, from
before ``fork`` to after ``wait``). Reports each command's median, the ratio
of the medians apply/python and the median of the per-round ratios (the
figure the goal is about: both commands of a round meet the same load).

With ``--importtime``, also runs the apply once under ``-X importtime`` and
prints the 15 imports with the largest cumulative time.

    .venv/bin/python bench/bench_oneshot.py [--rounds 21] [--importtime] [--source] [--json OUT]
"""

from __future__ import annotations

import argparse
import compileall
import importlib.util
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchlib import CAPS, TRUSTED, build_tree, capkeeper_argv, emit, reference_value, write_state


def _time(argv: list[str]) -> float:
    start = time.perf_counter()
    result = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, check=False)
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} exited {result.returncode}: {result.stderr.decode()}")
    return elapsed


def importtime(argv: list[str], top: int = 15) -> list[tuple[int, int, str]]:
    """The ``top`` imports of ``argv`` (a Python command) by cumulative time: (cum, self, name)."""
    script = argv[0] if argv[0] != sys.executable else None
    command = [sys.executable, "-X", "importtime"]
    command += [script, *argv[1:]] if script else argv[1:]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    rows = []
    for line in result.stderr.splitlines():
        if not line.startswith("import time:") or "cumulative" in line:
            continue
        own, cumulative, name = line.removeprefix("import time:").split("|", 2)
        rows.append((int(cumulative), int(own), name.rstrip()))
    return sorted(rows, reverse=True)[:top]


def byte_compile() -> str:
    """Byte-compile the capkeeper package this interpreter imports; return its directory."""
    spec = importlib.util.find_spec("capkeeper")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("capkeeper is not importable from this interpreter")
    directory = next(iter(spec.submodule_search_locations))
    if not compileall.compile_dir(directory, quiet=1):
        raise SystemExit(f"could not byte-compile {directory}")
    return directory


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=21)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--entries", type=int, default=1, help="binaries declared in the state")
    parser.add_argument("--importtime", action="store_true", help="print the top 15 imports")
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    parser.add_argument("--source", action="store_true", help="do not byte-compile capkeeper first")
    parser.add_argument(
        "--against",
        metavar="PYTHON",
        help="also time 'PYTHON -I -m capkeeper apply' in the same rounds: an interpreter "
        "that imports another tree (run_all.installed_python), for an A/B of two trees",
    )
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench_oneshot.py needs root (setcap, root-owned declared files)")
        return 2
    base = Path(tempfile.mkdtemp(prefix="capkeeper-bench-oneshot-", dir="/var/tmp"))
    try:
        os.chmod(base, TRUSTED)
        binaries = build_tree(base / "tree", 1, args.entries)
        value = reference_value(binaries[0])
        for binary in binaries[1:]:
            os.setxattr(binary, "security.capability", value)
        state = base / "state.toml"
        write_state(state, binaries)
        target = str(binaries[0])
        compiled = None if args.source else byte_compile()
        capkeeper = capkeeper_argv()
        commands = {
            "apply": [*capkeeper, "apply", "--state", str(state), target],
            "python": [sys.executable, "-I", "-c", "pass"],
            "setcap": ["setcap", "-v", CAPS, target],
            "check": [*capkeeper, "check", "--state", str(state), target],
        }
        if args.against:
            commands["against"] = [
                args.against,
                *capkeeper[1:],
                "apply",
                "--state",
                str(state),
                target,
            ]
        for _ in range(args.warmup):
            for argv in commands.values():
                _time(argv)
        times: dict[str, list[float]] = {name: [] for name in commands}
        for _ in range(args.rounds):
            for name, argv in commands.items():
                times[name].append(_time(argv))
        median = {name: statistics.median(values) for name, values in times.items()}
        ratios = [a / p for a, p in zip(times["apply"], times["python"], strict=True)]
        print(f"state: {args.entries} declared binaries, all in sync; {args.rounds} rounds")
        print(f"capkeeper: byte-compiled in {compiled}" if compiled else "capkeeper: source only")
        for name, argv in commands.items():
            print(
                f"  {name:<7} median {median[name] * 1000:8.1f} ms  "
                f"min {min(times[name]) * 1000:8.1f} ms   {' '.join(argv)}"
            )
        print(
            f"apply / python -I -c pass: ratio of medians {median['apply'] / median['python']:.2f}"
            f", median of per-round ratios {statistics.median(ratios):.2f} "
            f"(range {min(ratios):.2f}-{max(ratios):.2f})"
        )
        results: dict[str, object] = {
            "rounds": args.rounds,
            "entries": args.entries,
            "byte_compiled": compiled is not None,
            **{f"{name}_median_s": round(value, 5) for name, value in median.items()},
            "ratio_of_medians": round(median["apply"] / median["python"], 3),
            "median_ratio": round(statistics.median(ratios), 3),
            "check_ratio": round(median["check"] / median["python"], 3),
        }
        if args.against:
            results["against_ratio"] = round(median["against"] / median["python"], 3)
            print(
                f"against / python -I -c pass: ratio of medians {results['against_ratio']:.2f}; "
                f"apply / against {median['apply'] / median['against']:.2f}"
            )
        if args.importtime:
            top = importtime(commands["apply"])
            print("top imports of apply by cumulative time (-X importtime):")
            print(f"  {'cumulative':>10} {'self':>8}  module")
            for cumulative, own, name in top:
                print(f"  {cumulative / 1000:8.1f}ms {own / 1000:6.1f}ms  {name}")
            results["importtime_top"] = [
                {"module": name.strip(), "cumulative_us": c, "self_us": s} for c, s, name in top
            ]
        emit(results, args.json)
        return 0
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
