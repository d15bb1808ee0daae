"""The daemon's start-up and settings: bounded intervals, signals during start-up,
paths it cannot watch."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyinotify
import pytest

from capkeeper.cli import build_parser, main
from capkeeper.watcher import Watcher
from tests.conftest import elf_source, make_binary
from tests.test_daemon import DaemonProcess, caps_of, write_state


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("--rescan-interval", "inf"),
        ("--rescan-interval", "1e308"),
        ("--rescan-interval", "1e-9"),
        ("--rescan-interval", "nan"),
        ("--rescan-interval", "0"),
        ("--rescan-interval", "86401"),
        ("--settle-time", "-1"),
        ("--settle-time", "inf"),
        ("--settle-time", "1e9"),
    ],
)
def test_out_of_range_intervals_are_usage_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], option: str, value: str
) -> None:
    """An interval out of range on the command line: one line on stderr, exit 64 (the
    state does not exist: the old code went on and failed on it with 78, or later)."""
    state = tmp_path / "missing.toml"
    assert main(["watch", "--state", str(state), option, value]) == 64
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert f"argument {option}: must be a number of seconds from " in err
    assert repr(value) in err


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("CAPKEEPER_RESCAN_INTERVAL", "inf"),
        ("CAPKEEPER_RESCAN_INTERVAL", "1e-9"),
        ("CAPKEEPER_SETTLE_TIME", "-1"),
        ("CAPKEEPER_SETTLE_TIME", "1e308"),
    ],
)
def test_out_of_range_settings_are_config_errors(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    name: str,
    value: str,
) -> None:
    """The same from the environment: one line naming the variable, exit 78."""
    monkeypatch.setenv(name, value)
    state = tmp_path / "missing.toml"
    assert main(["validate", "--state", str(state)]) == 78
    err = capsys.readouterr().err
    assert err.startswith(f"capkeeper: error: invalid setting: {name}: "), err
    assert err.count("\n") == 1


def test_interval_bounds_are_accepted() -> None:
    """1 s and one day are the bounds of --rescan-interval; 0 and 60 s of --settle-time."""
    for argv, key, expected in [
        (["--rescan-interval", "1"], "rescan_interval", 1.0),
        (["--rescan-interval", "86400"], "rescan_interval", 86400.0),
        (["--settle-time", "0"], "settle_time", 0.0),
        (["--settle-time", "60"], "settle_time", 60.0),
    ]:
        args = build_parser().parse_args(["watch", *argv])
        assert getattr(args, key) == expected


# -- signals during start-up ------------------------------------------------------------

SIGHUP_BIT = 1 << (signal.SIGHUP - 1)


def _signal_masks(pid: int) -> tuple[int, int]:
    """(blocked, caught) signal masks of ``pid`` from /proc/<pid>/status."""
    fields = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    return int(fields["SigBlk"], 16), int(fields["SigCgt"], 16)


def _wait_open(witness: Watcher, name: str, daemon: DaemonProcess, timeout: float = 30) -> None:
    """Wait until some process opens ``name`` in the directory ``witness`` watches."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if select.select([witness], [], [], 0.01)[0] and any(
            e.name == name for e in witness.read()
        ):
            return
        assert daemon.process.poll() is None, daemon.tail()
    raise AssertionError(f"{name} was not opened within {timeout}s")


@pytest.mark.parametrize("entries", [1, 2, 3, 4, 3000])
def test_sighup_while_loading_the_state_is_a_reload_once_started(
    tree: Path, tmp_path: Path, entries: int
) -> None:
    """SIGHUP the moment the daemon opens its state (the old daemon had no handler yet
    and died with SIGHUP): it starts, says READY=1, then reloads (RELOADING=1, READY=1).
    With 3,000 entries the start-up is long; the SIGHUP lands well inside it."""
    binary = make_binary(tree / "app")
    declared = {binary: "cap_net_raw=+ep"}
    declared.update({tree / f"missing{n}": "cap_net_raw=+ep" for n in range(entries - 1)})
    state = write_state(tmp_path / "state.toml", declared)
    with Watcher(mask=pyinotify.IN_OPEN) as witness:
        witness.sync([str(tmp_path)])
        workdir = tmp_path / "daemon"
        workdir.mkdir()
        daemon = DaemonProcess(workdir, state)
        try:
            _wait_open(witness, "state.toml", daemon)
            blocked, caught = _signal_masks(daemon.pid)
            assert (blocked | caught) & SIGHUP_BIT, "SIGHUP would kill it while it loads"
            daemon.send(signal.SIGHUP)
            ready = daemon.wait_ready(timeout=60)
            reloading = daemon.wait_notification(lambda m: m.startswith("RELOADING=1"), ready)
            daemon.wait_ready(since=reloading + 1, timeout=60)
            assert caps_of(binary) is not None
            assert daemon.stop() == 0
        finally:
            daemon.close()


def test_sigterm_while_starting_stops_cleanly(tree: Path, tmp_path: Path) -> None:
    """SIGTERM the moment the daemon opens its state: it stops with status 0, no traceback."""
    declared = {tree / f"missing{n}": "cap_net_raw=+ep" for n in range(3000)}
    state = write_state(tmp_path / "state.toml", declared)
    with Watcher(mask=pyinotify.IN_OPEN) as witness:
        witness.sync([str(tmp_path)])
        workdir = tmp_path / "daemon"
        workdir.mkdir()
        daemon = DaemonProcess(workdir, state)
        try:
            _wait_open(witness, "state.toml", daemon)
            assert daemon.stop(signal.SIGTERM, timeout=60) == 0
            daemon.wait_notification(lambda m: "STOPPING=1" in m.splitlines())
            assert "Traceback" not in daemon.log_path.read_text()
        finally:
            daemon.close()


# -- a path inotify cannot follow ------------------------------------------------------


def test_path_longer_than_path_max_is_reported_once_and_still_enforced(
    tree: Path, tmp_path: Path
) -> None:
    """A declared path of 4,800 bytes: watch_failed once (with the reason), the caps are
    restored at start and by each rescan, and nothing loops."""
    directory_fd = os.open(tree, os.O_RDONLY)
    deep = str(tree)
    try:
        for _ in range(24):
            os.mkdir("d" * 200, 0o755, dir_fd=directory_fd)
            below = os.open("d" * 200, os.O_RDONLY, dir_fd=directory_fd)
            os.close(directory_fd)
            directory_fd = below
            deep += "/" + "d" * 200
        with os.fdopen(
            os.open("app", os.O_WRONLY | os.O_CREAT, 0o755, dir_fd=directory_fd), "wb"
        ) as handle:
            handle.write(elf_source().read_bytes())
        os.fchmod(directory_fd, 0o755)
        binary = deep + "/app"
        assert len(binary) > 4096
        state = write_state(tmp_path / "state.toml", {Path(binary): "cap_net_raw=+ep"})
        workdir = tmp_path / "daemon"
        workdir.mkdir()
        daemon = DaemonProcess(workdir, state, rescan=1.0)
        try:
            daemon.wait_ready()
            app_fd = os.open("app", os.O_RDONLY, dir_fd=directory_fd)

            def caps() -> bytes:
                return os.getxattr(f"/proc/self/fd/{app_fd}", "security.capability")

            try:
                assert caps()
                os.removexattr(f"/proc/self/fd/{app_fd}", "security.capability")
                deadline = time.monotonic() + 5
                while True:  # back at the next rescan at the latest
                    try:
                        caps()
                        break
                    except OSError:
                        assert time.monotonic() < deadline, daemon.tail()
                        time.sleep(0.05)
            finally:
                os.close(app_fd)
            time.sleep(1.5)  # another rescan or two
            events = daemon.events()
            failed = [e for e in events if e.get("event") == "watch_failed"]
            assert len(failed) == 1, failed
            assert failed[0]["path"] == binary
            assert "longer than PATH_MAX" in failed[0]["reason"]
            assert daemon.stop() == 0
        finally:
            daemon.close()
    finally:
        os.close(directory_fd)


# -- what a start imports ----------------------------------------------------------------


def test_a_start_imports_no_asyncio_and_its_modules_no_dataclasses(
    tree: Path, tmp_path: Path
) -> None:
    """A start up to READY=1, with a restore logged through structlog, imports no
    asyncio (~35 ms, imported by structlog for async methods capkeeper never calls) and
    no uuid (~4 ms with platform, for a deprecated structlog function),
    and no OpenSSL through hashlib (~5 ms) to key its state cache; and the modules of
    the commands that start the daemon or run before a service (apply, check) build no
    class with dataclasses (~40 ms of class building, and inspect's import, for 27
    classes)."""
    tool = make_binary(tree / "tool")
    state = write_state(tmp_path / "state.toml", {tool: "cap_net_raw=ep"})
    workdir = tmp_path / "daemon"
    workdir.mkdir()
    os.chmod(tmp_path, 0o755)
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o700)
    env = {"PYTHONPROFILEIMPORTTIME": "1"}
    args = ("--cache-directory", str(cache))
    daemon = DaemonProcess(workdir, state, level="info", env=env, args=args)
    try:
        daemon.wait_ready()
        restored = daemon.wait_event(lambda e: e.get("event") == "capability_restored")
        assert restored["path"] == str(tool)
        imported = {
            str(event["line"]).rsplit("|", 1)[1].strip()
            for event in daemon.events()
            if event["event"] == "unparsed" and str(event["line"]).startswith("import time:")
        }
        assert {"structlog", "capkeeper.keeper", "capkeeper.daemon"} <= imported
        assert sorted(name for name in imported if name.split(".")[0] == "asyncio") == []
        assert {"uuid", "platform"} & imported == set()
        assert {"_hashlib", "hashlib"} & imported == set()
        assert daemon.stop() == 0
    finally:
        daemon.close()
    assert (cache / "state.json").is_file()  # the state was keyed and cached
    modules = "capkeeper.cli, capkeeper.commands.watch, capkeeper.daemon, capkeeper.commands.apply"
    probe = subprocess.run(
        [
            sys.executable,
            "-c",
            f"import sys, {modules}, capkeeper.commands.check\n"
            "print(sorted(m for m in ('dataclasses', 'inspect') if m in sys.modules))",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert probe.stdout == "[]\n"
