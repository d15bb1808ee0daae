"""Keeper._replan on real directories and real inotify: plan, watch, then look again."""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest

from capkeeper import keeper as keeper_module
from capkeeper import watcher as watcher_module
from capkeeper.keeper import Keeper
from capkeeper.log import get_logger
from capkeeper.state import load_state
from capkeeper.status import StatusBook
from capkeeper.watcher import Route, Watcher, WatchFailure, plan_route
from tests.conftest import make_binary
from tests.test_daemon import write_state


def _keeper(watcher: Watcher, state_file: Path) -> Keeper:
    keeper = Keeper(
        watcher,
        StatusBook(),
        logger=get_logger(),
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
