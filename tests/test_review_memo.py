"""Review of issue 11's speed-ups: what a memo of the trust rule may keep.

The route memo (:func:`capkeeper.trust.route_refusals`) remembers verdicts by the
route's hops. A route through a directory an attacker owns is whatever the attacker
makes it: up to 40 symlinks of 4095 bytes, tens of thousands of hops, and a new one
at every check. Remembering those verdicts lets the attacker fill the daemon's memory.
"""

from __future__ import annotations

import gc
import os
import subprocess
import tracemalloc
from pathlib import Path

from capkeeper import files
from capkeeper.capabilities import format_text, parse
from capkeeper.kernel import cap_last_cap
from capkeeper.model import Entry
from capkeeper.trust import assess
from tests.test_attacks import ATTACKER, SYSTEM_PYTHON, attacker_dir, setpriv

__all__ = ["attacker_dir"]  # the fixture, imported for pytest

LAST_CAP = cap_last_cap()
_PAD = "d/../" * 250  # 250 directory hops a symlink, 10,000 for the route
_ROUTES = 6


def _as_attacker(home: Path, code: str) -> None:
    subprocess.run([*setpriv(), SYSTEM_PYTHON, "-I", "-c", code], cwd=home, check=True)


def test_refused_routes_an_attacker_varies_are_not_remembered(attacker_dir: Path) -> None:
    """Attack: the attacker owns a directory on a declared path and makes its route 40
    long symlinks, retargeting the last one before each check.
    Runs as: attacker 4242 makes and changes the symlinks; the checks run as root.
    Never: memory kept after the checks grows with the number of routes they met."""
    home = attacker_dir
    _as_attacker(
        home,
        "import os\n"
        "os.mkdir('d'); open('bin', 'w').close()\n"
        f"for i in range(39): os.symlink({_PAD!r} + 'l%d' % (i + 1), 'l%d' % i)\n"
        f"os.symlink({_PAD!r} + 'bin', 'l39')\n",
    )
    declared = str(home / "l0")
    caps = parse("cap_net_raw=ep", last_cap=LAST_CAP)
    entry = Entry(path=declared, caps=caps, caps_text=format_text(caps, last_cap=LAST_CAP))

    def judge() -> int:
        observation = files.observe(declared)
        refusals = assess(entry, observation, last_cap=LAST_CAP)
        assert refusals, "a route through the attacker's directory must be refused"
        return len(observation.hops)

    assert judge() > 10_000
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for attempt in range(1, _ROUTES + 1):
            _as_attacker(
                home,
                f"import os; os.symlink({'./' * attempt!r} + {_PAD!r} + 'bin', 'l39.new');"
                " os.rename('l39.new', 'l39')",
            )
            judge()
        gc.collect()
        kept = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    # One verdict on such a route is ~4.5 MB; remembering all would keep ~27 MB.
    assert kept < 2_000_000, f"{kept} bytes kept after {_ROUTES} refused routes"
    assert os.lstat(home / "l39").st_uid == ATTACKER
