"""Keeper._replan on real directories and real inotify: plan, watch, then look again."""

from __future__ import annotations

import os
import select
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest
import structlog
from structlog.testing import CapturingLogger

from capkeeper import keeper as keeper_module
from capkeeper import watcher as watcher_module
from capkeeper.keeper import Keeper
from capkeeper.state import load_state
from capkeeper.status import StatusBook
from capkeeper.watcher import Route, Watcher, WatchFailure, plan_route
from tests.conftest import make_binary
from tests.test_attacks import ATTACKER, attacker_dir, exchanging
from tests.test_daemon import caps_of, write_state

__all__ = ["attacker_dir"]  # the fixture, imported for pytest


def _keeper(watcher: Watcher, state_file: Path) -> Keeper:
    keeper = Keeper(
        watcher,
        StatusBook(),
        # Its own logger: the one configured globally may write to a stream an earlier
        # test closed.
        logger=structlog.wrap_logger(CapturingLogger(), processors=[]),
        settle_time=0.1,
        last_cap=40,
        clock=time.monotonic,
        tick=lambda: None,
        stopping=lambda: False,
    )
    keeper.install(load_state(state_file, last_cap=40))
    return keeper


def _assert_planned_and_watched(keeper: Keeper, paths: Iterable[str]) -> None:
    """Each route is what a fresh look gives, and every directory on it is watched."""
    for path in paths:
        route = keeper.plan.route(path)
        assert route == plan_route(path)
        assert set(route.directories) <= keeper.watcher.directories, path


def test_start_up_looks_at_each_route_once_under_its_watches(
    tree: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Entries in existing directories: their directories are watched before the one look
    at their names, so no route is planned twice."""
    binaries: list[Path] = []
    for d in range(3):
        (tree / f"d{d}").mkdir(mode=0o755)
        binaries.extend(make_binary(tree / f"d{d}" / f"tool{n}") for n in range(20))
    state = write_state(tree.parent / "state.toml", dict.fromkeys(binaries, "cap_net_raw=ep"))
    planned: list[str] = []
    real = watcher_module.plan_routes

    def counting(paths: Iterable[str]) -> Iterator[Route]:
        paths = list(paths)
        planned.extend(paths)
        return real(paths)

    monkeypatch.setattr(keeper_module, "plan_routes", counting)
    with Watcher() as watcher:
        keeper = _keeper(watcher, state)
        keeper.full_reconcile("startup")
        assert sorted(planned) == sorted(str(b) for b in binaries)
        _assert_planned_and_watched(keeper, keeper.entries)


def test_directory_created_between_look_and_watch_is_looked_at_again(
    tree: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """dpkg renames opt.dpkg-new to opt and creates ckdemo inside at once: what appears in
    a directory after the look that planned a route and before the watch on that directory
    raised no event, so the route is looked at again once its directory is watched."""
    target = tree / "opt" / "ckdemo" / "bin" / "ckdemo"
    state = write_state(tree.parent / "state.toml", {target: "cap_net_raw=ep"})
    with Watcher() as watcher:
        keeper = _keeper(watcher, state)
        real_sync = watcher.sync
        raced = False

        def racing_sync(wanted: Iterable[str]) -> list[WatchFailure]:
            nonlocal raced
            route = keeper.plan.route(str(target))
            if route is not None and not raced:
                # After the look that found no opt, before the watch of its directory.
                assert route.links[-1].name == "opt"
                raced = True
                target.parent.mkdir(parents=True, mode=0o755)
                make_binary(target)
            return real_sync(wanted)

        monkeypatch.setattr(watcher, "sync", racing_sync)
        keeper.full_reconcile("startup")
        assert raced
        _assert_planned_and_watched(keeper, [str(target)])
        assert str(target.parent) in watcher.directories


def _pump(keeper: Keeper, *, seconds: float = 0.0, until_quiet: float = 0.0) -> None:
    """Feed the keeper its events, as the daemon's loop does: for ``seconds``, or until
    no event came for ``until_quiet`` seconds (bounded at 20 s)."""
    poller = select.poll()
    poller.register(keeper.watcher.fileno(), select.POLLIN)
    start = last = time.monotonic()
    while True:
        now = time.monotonic()
        if now - start > max(seconds, 20.0 if until_quiet else 0.0):
            assert not until_quiet, "events did not stop"
            return
        if seconds and now - start > seconds:
            return
        if until_quiet and now - last > until_quiet:
            return
        if poller.poll(50):
            last = time.monotonic()
            keeper.handle(keeper.watcher.read(keeper.plan), last)
        keeper.run_due()


def test_attacker_racing_renames_on_routes_cannot_blind_or_bend_the_plan(
    attacker_dir: Path, tree: Path
) -> None:
    """Attack: the attacker owns a directory that declared paths go through and swaps
    (RENAME_EXCHANGE, in a loop) two release directories, and a symlink with a
    directory, while the keeper starts and handles the events. Once it stops, every
    route is what a fresh plan says and watched to its end, as in a keeper started
    afterwards, and no file reached through the attacker's directory got capabilities."""
    home = attacker_dir
    for release in ("a", "b", "c"):
        (home / release).mkdir(mode=0o755)
        make_binary(home / release / "tool")
    (home / "cur").symlink_to("a")
    os.chown(home / "cur", ATTACKER, ATTACKER, follow_symlinks=False)
    for name in ("a", "a/tool", "b", "b/tool", "c", "c/tool"):
        os.chown(home / name, ATTACKER, ATTACKER)
    trusted = [make_binary(tree / f"tool{n}") for n in range(30)]
    declared = [home / "a" / "tool", home / "b" / "tool", home / "cur" / "tool", *trusted]
    state = write_state(tree.parent / "state.toml", dict.fromkeys(declared, "cap_net_raw=ep"))
    with Watcher() as watcher:
        keeper = _keeper(watcher, state)
        with exchanging(home / "a", home / "b"), exchanging(home / "cur", home / "c"):
            keeper.full_reconcile("startup")
            _pump(keeper, seconds=1.5)
        _pump(keeper, until_quiet=0.5)
        _assert_planned_and_watched(keeper, keeper.entries)
        with Watcher() as fresh_watcher:
            fresh = _keeper(fresh_watcher, state)
            fresh.full_reconcile("startup")
            for path in keeper.entries:
                assert keeper.plan.route(path) == fresh.plan.route(path)
            assert watcher.directories == fresh_watcher.directories
    for release in ("a", "b", "c"):
        assert caps_of(home / release / "tool") is None
    assert all(caps_of(binary) is not None for binary in trusted)
