"""Attacks by a local unprivileged user, each run for real and each asserting what must not happen.

Every attacker runs as uid/gid 4242 (no passwd entry, no supplementary groups)
through ``setpriv --reuid=4242 --regid=4242 --clear-groups``; root only sets
the scene and runs capkeeper. The files live in a fresh root-owned 0755
directory under /tmp (pytest's own temp root is 0700, which the attacker could
not even enter).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import getcap, require_root, require_tool, setcap

REPO = Path(__file__).resolve().parents[1]
ATTACKER = 4242


@pytest.fixture
def arena() -> Iterator[Path]:
    """A root-owned, 0755 directory under /tmp that the attacker can enter."""
    require_root()
    base = Path(tempfile.mkdtemp(prefix="capkeeper-attack-"))
    base.chmod(0o755)
    try:
        yield base
    finally:
        shutil.rmtree(base)


def as_attacker(*argv: str | Path) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` as the unprivileged attacker."""
    setpriv = require_tool("setpriv")
    ids = [f"--reuid={ATTACKER}", f"--regid={ATTACKER}", "--clear-groups"]
    return subprocess.run(
        [setpriv, *ids, *map(str, argv)], capture_output=True, text=True, timeout=30, check=False
    )


def capkeeper(*argv: str | Path) -> subprocess.CompletedProcess[str]:
    """Run capkeeper as root, as an administrator would."""
    return subprocess.run(
        [sys.executable, "-m", "capkeeper", *map(str, argv)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


# -- item 3: programs that run other code --


def test_loader_copy_declared_with_dac_read_search_gives_nobody_a_root_only_file(
    arena: Path,
) -> None:
    """uid 4242 runs its own cat through a copy of ld.so declared with cap_dac_read_search+ep.

    Must not happen: capkeeper grants the copy anything, or the attacker reads
    the root-only 0600 file. The last step shows the attack is real on this
    kernel: once root puts the capability there by hand, the same command reads it.
    """
    secret = arena / "secret"
    secret.write_text("root only\n")
    secret.chmod(0o600)
    reader = arena / "reader"
    shutil.copyfile("/lib64/ld-linux-x86-64.so.2", reader)
    reader.chmod(0o755)
    home = arena / "home"
    home.mkdir(mode=0o755)
    cat = home / "mycat"
    shutil.copyfile(shutil.which("cat") or "/bin/cat", cat)
    cat.chmod(0o755)
    os.chown(home, ATTACKER, ATTACKER)
    os.chown(cat, ATTACKER, ATTACKER)
    state = arena / "state.toml"
    state.write_text(f'[[binary]]\npath = "{reader}"\ncaps = "cap_dac_read_search+ep"\n')

    before = as_attacker(reader, cat, secret)
    assert before.returncode != 0, "precondition: the attacker cannot read it directly"
    assert "Permission denied" in before.stderr

    applied = capkeeper("--state", state, "apply")
    assert applied.returncode == 2, applied.stdout + applied.stderr
    assert "runs other code: it is the dynamic loader" in applied.stdout + applied.stderr
    assert "Traceback" not in applied.stderr
    assert getcap(reader) == ""

    after = as_attacker(reader, cat, secret)
    assert after.returncode != 0
    assert "root only" not in after.stdout
    assert "Permission denied" in after.stderr

    setcap("cap_dac_read_search+ep", reader)  # what the old code did
    granted = as_attacker(reader, cat, secret)
    assert granted.stdout == "root only\n", "the attack path itself works on this kernel"
