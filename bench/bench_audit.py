"""``capkeeper audit --format getcap ROOT`` against ``getcap -r ROOT``, in the same run.

Both commands run as separate processes, alternately (capkeeper, getcap,
capkeeper, …) after warm-up runs, so that both meet the same page cache and
the same machine load; the figure is the median of the per-pair ratios
capkeeper/getcap (below 1.0: capkeeper is faster). Wall-clock time includes
interpreter start-up and imports, as a user would see it. The two outputs
are compared (order aside) before timing, so a fast but wrong walk fails.

    .venv/bin/python bench/bench_audit.py [--root /usr] [--rounds 15] [--max-ratio 1.0]

Exits 1 when the outputs differ, or when the median ratio exceeds --max-ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchlib import capkeeper_argv


def _run(argv: list[str]) -> tuple[float, str]:
    start = time.perf_counter()
    result = subprocess.run(argv, capture_output=True, text=True, check=False)
    elapsed = time.perf_counter() - start
    if result.returncode not in (0, 1):
        raise SystemExit(f"{' '.join(argv)} exited {result.returncode}: {result.stderr}")
    return elapsed, result.stdout


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--root", default="/usr")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--max-ratio", type=float, default=None, help="fail above this ratio")
    parser.add_argument("--jobs", type=int, default=None, help="passed to capkeeper audit -j")
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    args = parser.parse_args()

    getcap = shutil.which("getcap")
    if getcap is None:
        raise SystemExit("needs getcap (Debian package libcap2-bin)")
    # A state that does not exist: every finding is unmanaged, nothing to load.
    ours = [*capkeeper_argv(), "--log-format", "json", "--state", "/nonexistent/state.toml"]
    ours += ["audit", "--format", "getcap", args.root]
    if args.jobs is not None:
        ours += ["--jobs", str(args.jobs)]
    theirs = [getcap, "-r", args.root]

    _, out_ours = _run(ours)
    _, out_theirs = _run(theirs)
    if sorted(out_ours.splitlines()) != sorted(out_theirs.splitlines()):
        print("outputs differ:\n--- capkeeper\n" + out_ours + "--- getcap -r\n" + out_theirs)
        return 1
    for _ in range(args.warmup):
        _run(ours)
        _run(theirs)

    times_ours: list[float] = []
    times_theirs: list[float] = []
    for _ in range(args.rounds):
        times_ours.append(_run(ours)[0])
        times_theirs.append(_run(theirs)[0])
    ratios = [a / b for a, b in zip(times_ours, times_theirs, strict=True)]
    ratio = statistics.median(ratios)

    print(f"root: {args.root}; {len(out_theirs.splitlines())} file(s) with capabilities")
    print(f"cpus: {len(os.sched_getaffinity(0))}; rounds: {args.rounds} (alternating)")
    print(f"command: {' '.join(ours)}")
    print(f"  median {statistics.median(times_ours):.3f}s  min {min(times_ours):.3f}s")
    print(f"command: {' '.join(theirs)}")
    print(f"  median {statistics.median(times_theirs):.3f}s  min {min(times_theirs):.3f}s")
    print(
        f"median ratio capkeeper/getcap: {ratio:.2f}  (range {min(ratios):.2f}-{max(ratios):.2f})"
    )
    if args.json:
        figures = {
            "root": args.root,
            "rounds": args.rounds,
            "capkeeper_median_s": round(statistics.median(times_ours), 4),
            "getcap_median_s": round(statistics.median(times_theirs), 4),
            "median_ratio": round(ratio, 3),
        }
        Path(args.json).write_text(json.dumps(figures, indent=1) + "\n")
    if args.max_ratio is not None and ratio > args.max_ratio:
        print(f"FAIL: ratio {ratio:.2f} above {args.max_ratio}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
