"""Every real deploy pattern against one running daemon: capabilities come back.

One daemon (rescan interval one hour, so only inotify can fix anything) watches
one declared binary per deploy pattern. Each test runs the real tool, then
polls the xattr until the declared set is back, checks that the daemon logged
the restore with an inotify cause, and records how long it took after the
tool returned. The figures are printed at the end of the module (and written
as JSON to ``$CAPKEEPER_DEPLOY_REPORT`` when set).
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import getcap, make_binary, require_root, require_tool, setcap
from tests.test_daemon import (
    DaemonProcess,
    assert_stays_without,
    caps_of,
    new_build,
    wait_caps,
    write_state,
)

CAPS = "cap_net_bind_service=+ep"
CANONICAL = "cap_net_bind_service=ep"
BOUND = 2.0  # seconds after the deploy returns; the measured figures are far below
# name -> (deploy command duration, caps back after it returned, daemon event->restore ms)
_MEASURED: dict[str, tuple[float, float, float | None]] = {}

# Binaries present at start (restored by the start-up reconcile), by test name.
PRESENT = [
    "cp",
    "cat",
    "truncate",
    "dd",
    "mv",
    "rsync",
    "rsync_inplace",
    "install",
    "tar",
    "chown",
    "setcap_r",
    "setfattr_x",
    "recreate",
    "extra",
]


@dataclass
class Deploys:
    """The shared daemon and the tree it watches."""

    daemon: DaemonProcess
    root: Path  # trusted tree: bin/, build/, app/, parent/, dpkg/

    def binary(self, name: str) -> Path:
        return self.root / "bin" / name

    def build(self, name: str) -> Path:
        """A fresh new build of ``name`` (differs in content and size from the deployed one)."""
        return new_build(self.root / "build" / name, name.encode())

    def measure(
        self, name: str, path: Path, deploy: Callable[[], object], declared: Path | None = None
    ) -> float:
        """Run ``deploy``; wait for the caps on ``path``; check the daemon's restore event.

        ``declared`` is the path as the state names it, when ``path`` is its resolved target.
        """
        mark = self.daemon.mark()
        started = time.perf_counter()
        deploy()
        duration = time.perf_counter() - started
        elapsed = wait_caps(path, CAPS, timeout=BOUND)
        event = self.daemon.restored(declared or path, mark)
        assert str(event["cause"]).startswith("IN_"), event
        assert getcap(path) == CANONICAL
        _MEASURED[name] = (duration, elapsed, event.get("latency_ms"))
        return elapsed


def _run(*argv: str | Path) -> None:
    subprocess.run([str(a) for a in argv], check=True, capture_output=True, timeout=60)


def _trusted_dir(path: Path) -> Path:
    path.mkdir(mode=0o755, parents=True, exist_ok=True)
    os.chmod(path, 0o755)
    return path


def _deb(workdir: Path, version: int) -> Path:
    """A real .deb shipping /opt/ckdemo/bin/ckdemo, built with dpkg-deb."""
    package = workdir / f"pkg{version}"
    binary = package / "opt" / "ckdemo" / "bin" / "ckdemo"
    binary.parent.mkdir(parents=True)
    new_build(binary, f"ckdemo {version}".encode())
    (package / "DEBIAN").mkdir()
    (package / "DEBIAN" / "control").write_text(
        f"Package: ckdemo\nVersion: {version}.0\nArchitecture: all\n"
        "Maintainer: capkeeper tests <tests@example.invalid>\nDescription: capkeeper test\n"
    )
    deb = workdir / f"ckdemo_{version}.deb"
    _run("dpkg-deb", "--root-owner-group", "--build", package, deb)
    return deb


@pytest.fixture(scope="module")
def deploys(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[Deploys]:
    """One daemon watching a binary per deploy pattern (rescan 1 h: inotify only)."""
    require_root()
    for tool in ("rsync", "setfattr", "dpkg", "dpkg-deb", "tar", "install", "truncate", "dd"):
        require_tool(tool)
    base = tmp_path_factory.mktemp("deploys")
    os.chmod(base, 0o755)
    root = _trusted_dir(base / "tree")
    for sub in ("bin", "build", "app/r1/bin", "parent/sub/bin", "dpkg/var/lib/dpkg/info"):
        _trusted_dir(root / sub)
    (root / "dpkg/var/lib/dpkg/status").touch()
    _trusted_dir(root / "dpkg/var/lib/dpkg/updates")
    for name in PRESENT:
        make_binary(root / "bin" / name)
    make_binary(root / "app" / "r1" / "bin" / "flip")
    (root / "app" / "current").symlink_to("r1")
    make_binary(root / "parent" / "sub" / "bin" / "renamed")
    declared = {root / "bin" / name: CAPS for name in PRESENT}
    declared[root / "bin" / "late"] = CAPS  # missing at start
    declared[root / "app" / "current" / "bin" / "flip"] = CAPS
    declared[root / "parent" / "sub" / "bin" / "renamed"] = CAPS
    declared[root / "dpkg" / "opt" / "ckdemo" / "bin" / "ckdemo"] = CAPS
    state = write_state(base / "state.toml", declared)
    workdir = base / "daemon"
    workdir.mkdir()
    daemon = DaemonProcess(workdir, state, rescan=3600.0)
    try:
        daemon.wait_ready()
        for path in declared:
            if path.exists():
                wait_caps(path, CAPS)
        yield Deploys(daemon, root)
        assert daemon.stop() == 0
    finally:
        daemon.close()
        _report(request)


def _report(request: pytest.FixtureRequest) -> None:
    if not _MEASURED:
        return
    lines = [
        "",
        f"{'deploy':<24} {'tool ran':>10} {'caps back after it':>19} {'daemon latency':>15}",
    ]
    for name, (duration, elapsed, latency) in sorted(_MEASURED.items()):
        daemon = f"{latency:.3f} ms" if latency is not None else "-"
        lines.append(f"{name:<24} {duration * 1000:7.1f} ms {elapsed * 1000:16.3f} ms {daemon:>15}")
    worst = max(elapsed for _, elapsed, _ in _MEASURED.values())
    latencies = [latency for _, _, latency in _MEASURED.values() if latency is not None]
    lines.append(
        f"worst wait after a deploy returned: {worst * 1000:.3f} ms (bound {BOUND} s); "
        f"daemon latency median {statistics.median(latencies):.3f} ms, max {max(latencies):.3f} ms"
    )
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is not None and capture is not None:
        with capture.global_and_fixture_disabled():
            for line in lines:
                reporter.write_line(line)
    target = os.environ.get("CAPKEEPER_DEPLOY_REPORT")
    if target:
        Path(target).write_text(json.dumps(_MEASURED, indent=1))


# -- in-place rewrites (same inode; only IN_MODIFY / IN_CLOSE_WRITE show it) -------------


def test_cp_over(deploys: Deploys) -> None:
    """cp of a new build over the binary (rewritten in place) gets its caps back."""
    build, target = deploys.build("cp"), deploys.binary("cp")
    deploys.measure("cp", target, lambda: _run("cp", build, target))
    assert target.read_bytes() == build.read_bytes()


def test_cat_redirect(deploys: Deploys) -> None:
    """cat new > it (O_TRUNC then write) gets its caps back."""
    build, target = deploys.build("cat"), deploys.binary("cat")
    deploys.measure("cat > it", target, lambda: _run("sh", "-c", f"cat '{build}' > '{target}'"))
    assert target.read_bytes() == build.read_bytes()


def test_truncate(deploys: Deploys) -> None:
    """truncate (growing the file) strips in place; caps come back."""
    target = deploys.binary("truncate")
    size = target.stat().st_size
    deploys.measure("truncate", target, lambda: _run("truncate", "-s", "+16", target))
    assert target.stat().st_size == size + 16


def test_dd_notrunc(deploys: Deploys) -> None:
    """dd conv=notrunc over the binary gets its caps back."""
    build, target = deploys.build("dd"), deploys.binary("dd")
    deploys.measure(
        "dd conv=notrunc",
        target,
        lambda: _run("dd", f"if={build}", f"of={target}", "conv=notrunc", "status=none"),
    )
    assert target.read_bytes() == build.read_bytes()


def test_rsync_inplace(deploys: Deploys) -> None:
    """rsync --inplace of a new build gets its caps back."""
    build, target = deploys.build("rsync_inplace"), deploys.binary("rsync_inplace")
    deploys.measure("rsync --inplace", target, lambda: _run("rsync", "--inplace", build, target))
    assert target.read_bytes() == build.read_bytes()


def test_chown_same_owner(deploys: Deploys) -> None:
    """chown root:root strips; here it raises IN_ATTRIB, so inotify already catches it."""
    target = deploys.binary("chown")
    deploys.measure("chown root:root", target, lambda: _run("chown", "root:root", target))


def test_setcap_r(deploys: Deploys) -> None:
    """setcap -r gets the caps put back."""
    target = deploys.binary("setcap_r")
    deploys.measure("setcap -r", target, lambda: setcap("-r", target))


def test_setfattr_x(deploys: Deploys) -> None:
    """setfattr -x security.capability gets the caps put back."""
    target = deploys.binary("setfattr_x")
    deploys.measure(
        "setfattr -x",
        target,
        lambda: _run("setfattr", "-x", "security.capability", target),
    )


def test_extra_capabilities_removed_and_reported(deploys: Deploys) -> None:
    """Extra capabilities on a managed file are removed and reported as tampering."""
    target = deploys.binary("extra")
    mark = deploys.daemon.mark()
    deploys.measure(
        "extra caps", target, lambda: setcap("cap_net_bind_service,cap_sys_admin+ep", target)
    )
    event = deploys.daemon.restored(target, mark)
    assert event["event"] == "capability_tampering"
    assert event["level"] == "critical"
    assert "cap_sys_admin" in event["found"]


# -- replacements (a new inode at the path) ---------------------------------------------


def test_mv_over(deploys: Deploys) -> None:
    """mv of a new build over the binary gets its caps back."""
    build, target = deploys.build("mv"), deploys.binary("mv")
    deploys.measure("mv", target, lambda: _run("mv", build, target))


def test_rsync_default(deploys: Deploys) -> None:
    """rsync (temp file + rename) of a new build gets its caps back."""
    build, target = deploys.build("rsync"), deploys.binary("rsync")
    deploys.measure("rsync", target, lambda: _run("rsync", build, target))
    assert target.read_bytes() == build.read_bytes()


def test_install(deploys: Deploys) -> None:
    """install -m 755 of a new build gets its caps back."""
    build, target = deploys.build("install"), deploys.binary("install")
    deploys.measure("install -m 755", target, lambda: _run("install", "-m", "755", build, target))
    assert target.read_bytes() == build.read_bytes()


def test_tar_extract_over(deploys: Deploys) -> None:
    """tar -x of an archive holding a new build over the binary gets its caps back."""
    stage = _trusted_dir(deploys.root / "stage")
    shutil.copy(deploys.build("tar"), stage / "tar")
    archive = deploys.root / "release.tar"
    _run("tar", "-C", stage, "-cf", archive, "tar")
    target = deploys.binary("tar")
    deploys.measure("tar -x", target, lambda: _run("tar", "-C", target.parent, "-xf", archive))
    assert target.read_bytes() == (stage / "tar").read_bytes()


def test_dpkg_upgrade(deploys: Deploys) -> None:
    """dpkg -i of version 1 then version 2 of a real .deb: caps restored after each."""
    debs = _trusted_dir(deploys.root / "debs")
    first, second = _deb(debs, 1), _deb(debs, 2)
    root = deploys.root / "dpkg"
    target = root / "opt" / "ckdemo" / "bin" / "ckdemo"
    assert not target.exists()
    deploys.measure(
        "dpkg -i (install)", target, lambda: _run("dpkg", f"--root={root}", "-i", first)
    )
    deploys.measure(
        "dpkg -i (upgrade)", target, lambda: _run("dpkg", f"--root={root}", "-i", second)
    )
    assert target.read_bytes().endswith(b"ckdemo 2")
    listed = subprocess.run(
        ["dpkg-query", f"--admindir={root}/var/lib/dpkg", "-W", "ckdemo"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert listed.stdout.split() == ["ckdemo", "2.0"]


def test_delete_then_recreate(deploys: Deploys) -> None:
    """rm, then a new file at the path: reported missing, then restored."""
    target = deploys.binary("recreate")
    mark = deploys.daemon.mark()
    target.unlink()
    deploys.daemon.wait_event(
        lambda e: e.get("event") == "binary_missing" and e.get("path") == str(target), mark
    )
    build = deploys.build("recreate")
    deploys.measure("delete + re-create", target, lambda: _run("cp", build, target))


def test_missing_at_start_then_created(deploys: Deploys) -> None:
    """A binary missing when the daemon started gets its caps once it is created."""
    target = deploys.binary("late")
    assert not target.exists()
    build = deploys.build("late")
    deploys.measure("created later", target, lambda: _run("cp", build, target))


# -- the path itself changes ----------------------------------------------------------


def test_symlink_flip_of_release_directory(deploys: Deploys) -> None:
    """ln -sfn + mv -T flips current/ to a new release: its binary gets caps, the old one not."""
    app = deploys.root / "app"
    old = app / "r1" / "bin" / "flip"
    _trusted_dir(app / "r2" / "bin")
    fresh = app / "r2" / "bin" / "flip"
    shutil.copy(deploys.build("flip"), fresh)
    assert caps_of(fresh) is None

    def flip() -> None:
        _run("ln", "-sfn", "r2", app / "current.new")
        _run("mv", "-T", app / "current.new", app / "current")

    declared = app / "current" / "bin" / "flip"
    deploys.measure("symlink flip", fresh, flip, declared)
    # The new release is watched now, the old one no longer enforced.
    deploys.measure("after flip: setcap -r", fresh, lambda: setcap("-r", fresh), declared)
    setcap("-r", old)
    assert_stays_without(old, 0.3)


def test_parent_directory_renamed_and_back(deploys: Deploys) -> None:
    """mv of a parent directory away and back: the path is re-planned and caps restored."""
    parent = deploys.root / "parent"
    moved = deploys.root / "parent.old"
    target = parent / "sub" / "bin" / "renamed"
    mark = deploys.daemon.mark()
    parent.rename(moved)
    deploys.daemon.wait_event(
        lambda e: e.get("event") == "binary_missing" and e.get("path") == str(target), mark
    )
    away = moved / "sub" / "bin" / "renamed"
    setcap("-r", away)  # not at the declared path now: not enforced
    assert_stays_without(away, 0.3)
    deploys.measure("parent renamed back", target, lambda: moved.rename(parent))
    # The directories are watched again under their old names.
    deploys.measure("after rename: setcap -r", target, lambda: setcap("-r", target))


def test_module_binaries_all_enforced(deploys: Deploys) -> None:
    """After all the deploys above, every declared binary carries its caps (checked with getcap)."""
    for name in PRESENT:
        path = deploys.binary(name)
        wait_caps(path, CAPS)
        assert getcap(path) == CANONICAL
    assert deploys.daemon.process.poll() is None
    assert not [e for e in deploys.daemon.events() if "Traceback" in json.dumps(e)]
