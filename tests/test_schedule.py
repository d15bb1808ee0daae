"""The pure schedule policy: retry back-off and the flap brake, with built inputs."""

from __future__ import annotations

import dataclasses

import pytest

from capkeeper.schedule import (
    ALERT_EVERY,
    BRAKE,
    FIGHT_ROUNDS,
    RETRY_MAX,
    Brake,
    Identity,
    retry_delay,
)

FILE = Identity(dev=1, ino=100, size=4096, mtime_ns=1_000, uid=0, gid=0, mode=0o100755)


def test_retry_delay_doubles_from_small_to_the_bound() -> None:
    """0.5 s, 1 s, 2 s, ... never more than 30 s."""
    delays = [retry_delay(n) for n in range(1, 12)]
    assert delays[:4] == [0.5, 1.0, 2.0, 4.0]
    assert max(delays) == RETRY_MAX == 30.0
    assert delays == sorted(delays)


def test_new_deploys_are_never_braked_however_often() -> None:
    """A new inode (or new content) every 50 ms for 10 s: never a delay, never an alert."""
    brake = Brake()
    for n in range(200):
        now = n * 0.05
        deploy = dataclasses.replace(FILE, ino=1000 + n) if n % 2 else FILE
        deploy = dataclasses.replace(deploy, mtime_ns=n)
        verdict = brake.restore(deploy, now)
        assert verdict.not_before == 0.0, n
        assert not verdict.alert, n


def test_each_kind_of_change_makes_a_new_deploy() -> None:
    """Inode, size, mtime, owner, group or mode changed: not an undo, the count restarts."""
    for change in ("ino", "dev", "size", "mtime_ns", "uid", "gid", "mode"):
        brake = Brake()
        for n in range(FIGHT_ROUNDS):
            brake.restore(FILE, n * 0.01)
        other = dataclasses.replace(FILE, **{change: getattr(FILE, change) + 1})
        verdict = brake.restore(other, 0.1)
        assert verdict.rounds == 0, change
        assert verdict.not_before == 0.0, change


def test_fight_is_braked_to_one_second_and_alerted_once_a_minute() -> None:
    """The same unchanged file restored again and again: after 4 quick restores, one per
    second; the alert comes once, then again only after a minute."""
    brake = Brake()
    now = 0.0
    verdicts = []
    for _ in range(FIGHT_ROUNDS + 1):
        verdicts.append(brake.restore(FILE, now))
        now += 0.001
    assert [v.not_before for v in verdicts[:FIGHT_ROUNDS]] == [0.0] * FIGHT_ROUNDS
    assert verdicts[-1].not_before == pytest.approx(now - 0.001 + BRAKE)
    assert verdicts[-1].alert
    alerts = 0
    # The fight goes on: each restore happens when the brake lets it (1 s later).
    for _ in range(int(ALERT_EVERY) - 2):
        now += BRAKE
        verdict = brake.restore(FILE, now)
        assert verdict.not_before == now + BRAKE  # bounded: never more than a second
        alerts += verdict.alert
    assert alerts == 0, "once a minute at most"
    said = []
    for _ in range(3):
        now += BRAKE
        said.append(brake.restore(FILE, now).alert)
    assert said.count(True) == 1, "still fighting a minute later: said again, once"


def test_fight_ends_when_the_file_is_left_alone() -> None:
    """After a pause longer than the window, the next restore is not braked."""
    brake = Brake()
    for n in range(FIGHT_ROUNDS + 2):
        brake.restore(FILE, n * 0.01)
    assert brake.fighting(0.1)
    later = 10.0
    assert not brake.fighting(later)
    verdict = brake.restore(FILE, later)
    assert verdict.not_before == 0.0
    assert verdict.rounds == 0


def test_deploy_during_a_fight_is_restored_at_once() -> None:
    """A fight is going on; a new build lands: no delay for it."""
    brake = Brake()
    for n in range(FIGHT_ROUNDS + 3):
        brake.restore(FILE, n * 0.5)
    deploy = dataclasses.replace(FILE, ino=FILE.ino + 1)
    assert brake.restore(deploy, 3.1).not_before == 0.0


def test_same_content_ignores_owner_and_mode() -> None:
    """same_content: inode, size and mtime only (the write-in-progress test)."""
    assert FILE.same_content(dataclasses.replace(FILE, uid=5, mode=0o100700))
    assert not FILE.same_content(dataclasses.replace(FILE, size=1))
    assert not FILE.same_content(dataclasses.replace(FILE, mtime_ns=2))
    assert not FILE.same_content(None)
