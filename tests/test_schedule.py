"""The pure schedule policy: retry back-off and the flap brake, with built inputs."""

from __future__ import annotations

import pytest

from capkeeper.reconcile import Decision, Status
from capkeeper.schedule import (
    ALERT_EVERY,
    BRAKE,
    CONFIRM_REFUSAL,
    FIGHT_ROUNDS,
    FLOOD_GATHER,
    FLOOD_PAUSE,
    FLOOD_PAUSE_MAX,
    MAX_POLL_MS,
    RETRY_FIRST,
    RETRY_MAX,
    STATUS_EVERY,
    STATUS_QUIET,
    STATUS_STALE,
    Brake,
    Identity,
    Pacing,
    Settling,
    StatusFileTimer,
    Throttle,
    announced,
    flood_pause,
    may_be_mid_write,
    poll_timeout_ms,
    retry_delay,
    settle_wait,
)
from capkeeper.trust import Refusal

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
        deploy = FILE._replace(ino=1000 + n) if n % 2 else FILE
        deploy = deploy._replace(mtime_ns=n)
        verdict = brake.restore(deploy, now)
        assert verdict.not_before == 0.0, n
        assert not verdict.alert, n


def test_each_kind_of_change_makes_a_new_deploy() -> None:
    """Inode, size, mtime, owner, group or mode changed: not an undo, the count restarts."""
    for change in ("ino", "dev", "size", "mtime_ns", "uid", "gid", "mode"):
        brake = Brake()
        for n in range(FIGHT_ROUNDS):
            brake.restore(FILE, n * 0.01)
        other = FILE._replace(**{change: getattr(FILE, change) + 1})
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
    deploy = FILE._replace(ino=FILE.ino + 1)
    assert brake.restore(deploy, 3.1).not_before == 0.0


def test_same_content_ignores_owner_and_mode() -> None:
    """same_content: inode, size and mtime only (the write-in-progress test)."""
    assert FILE.same_content(FILE._replace(uid=5, mode=0o100700))
    assert not FILE.same_content(FILE._replace(size=1))
    assert not FILE.same_content(FILE._replace(mtime_ns=2))
    assert not FILE.same_content(None)


# -- what a cause says, and a file that may be mid-write -----------------------------------

IN_SYNC = Decision(Status.IN_SYNC, "cap_net_raw=ep")
NOT_ELF = Decision(Status.REFUSED, "none", refusals=(Refusal("elf", "not an ELF binary"),))
OWNER = Decision(Status.REFUSED, "none", refusals=(Refusal("owner", "owned by uid 1000"),))


@pytest.mark.parametrize(
    ("cause", "expected"),
    [
        ("IN_MODIFY", True),
        ("IN_MODIFY+settle", True),
        ("IN_CLOSE_WRITE", True),
        ("IN_MOVED_TO", True),
        ("IN_DELETE", True),
        ("IN_CREATE", True),
        ("IN_ATTRIB", False),
        ("IN_ATTRIB+settle", False),
        ("periodic", False),
        ("retry", False),
        ("startup", False),
    ],
)
def test_announced_causes(cause: str, expected: bool) -> None:
    """Only causes that bring new content or another inode announce a new file."""
    assert announced(cause) is expected


def test_same_inode_changed_unannounced_is_mid_write() -> None:
    """Same inode, new size or mtime, and no write event seen: wait for the write's end."""
    written = FILE._replace(size=1)
    assert may_be_mid_write("IN_ATTRIB", FILE, written, IN_SYNC)
    assert may_be_mid_write("periodic", FILE, FILE._replace(mtime_ns=2), IN_SYNC)


@pytest.mark.parametrize(
    ("cause", "known", "seen"),
    [
        ("IN_ATTRIB", FILE, FILE),  # nothing changed
        ("IN_ATTRIB", FILE, FILE._replace(uid=5)),  # owner only
        ("IN_ATTRIB", FILE, FILE._replace(ino=7, size=1)),  # another inode
        ("IN_ATTRIB", None, FILE),  # never seen before
        ("IN_MODIFY", FILE, FILE._replace(size=1)),  # announced: settle handles it
        ("IN_ATTRIB+settle", FILE, FILE._replace(size=1)),  # settled: not again
    ],
)
def test_not_mid_write(cause: str, known: Identity | None, seen: Identity) -> None:
    """No hold for an unchanged file, another inode, an announced write or a settled one."""
    assert not may_be_mid_write(cause, known, seen, IN_SYNC)


def test_content_refusal_is_held_for_confirmation_other_refusals_are_not() -> None:
    """A "not an ELF" refusal waits CONFIRM_REFUSAL (a deploy's half-written file gets it
    too); an owner refusal is reported at once; neither is held again once settled."""
    assert may_be_mid_write("IN_ATTRIB", FILE, FILE, NOT_ELF)
    assert not may_be_mid_write("IN_ATTRIB", FILE, FILE, OWNER)
    assert not may_be_mid_write("IN_ATTRIB+settle", FILE, FILE, NOT_ELF)
    assert settle_wait(Status.REFUSED, 0.2) == CONFIRM_REFUSAL
    assert settle_wait(Status.REFUSED, 3.0) == 3.0
    assert settle_wait(Status.IN_SYNC, 0.2) == 0.2


# -- one entry's pacing ---------------------------------------------------------------------


def test_pacing_backs_off_refusals_and_resets_on_success() -> None:
    """Refused or failed: retry after 0.5 s, 1 s, 2 s ...; in sync again: no wait."""
    pacing = Pacing()
    waits = []
    for n in range(4):
        assert pacing.checked(Status.REFUSED, FILE, 10.0 * n) is None
        waits.append(pacing.retry_at - 10.0 * n)
    assert waits == [RETRY_FIRST, 1.0, 2.0, 4.0]
    pacing.checked(Status.IN_SYNC, FILE, 100.0)
    assert (pacing.misses, pacing.retry_at) == (0, 0.0)
    pacing.checked(Status.MISSING, None, 101.0)
    assert pacing.identity is None
    assert pacing.retry_at == 0.0


def test_pacing_brakes_a_fight_and_a_restore_undone_at_once() -> None:
    """Restores of the unchanged file go to the brake; so does a failed restore found
    undone as it was read back (transient): a round of the fight, not a back-off."""
    pacing = Pacing()
    verdicts = [pacing.checked(Status.RESTORED, FILE, n * 0.01) for n in range(FIGHT_ROUNDS)]
    assert all(v is not None and not v.alert for v in verdicts)
    undone = pacing.checked(Status.FAILED, FILE, FIGHT_ROUNDS * 0.01, transient=True)
    assert undone is not None
    assert undone.alert
    assert pacing.misses == 0
    assert pacing.retry_at == pytest.approx(FIGHT_ROUNDS * 0.01 + BRAKE)
    # A failure that is no race is backed off instead.
    assert pacing.checked(Status.FAILED, FILE, 5.0) is None
    assert pacing.retry_at == 5.0 + RETRY_FIRST


def test_deferral_of_refused_and_braked_entries() -> None:
    """While backed off, a refused entry waits for an event announcing a new file; while
    braked, a restored one waits unless the file is no longer the one restored."""
    pacing = Pacing()
    pacing.checked(Status.REFUSED, FILE, 0.0)

    def never() -> Identity | None:
        raise AssertionError("a refused entry needs no stat")

    assert pacing.defers(Status.REFUSED, "IN_ATTRIB", 0.1, never)
    assert not pacing.defers(Status.REFUSED, "IN_CLOSE_WRITE", 0.1, never)
    assert not pacing.defers(Status.REFUSED, "IN_ATTRIB", RETRY_FIRST, never)
    fought = Pacing()
    for n in range(FIGHT_ROUNDS + 1):
        fought.checked(Status.RESTORED, FILE, n * 0.01)
    assert fought.defers(Status.RESTORED, "IN_ATTRIB", 0.1, lambda: FILE)
    deploy = FILE._replace(ino=FILE.ino + 1)
    assert not fought.defers(Status.RESTORED, "IN_ATTRIB", 0.1, lambda: deploy)
    assert not fought.defers(Status.RESTORED, "IN_ATTRIB", 0.1, lambda: None)


# -- writes in progress ---------------------------------------------------------------------


def test_write_settles_until_close_or_settle_time() -> None:
    """IN_MODIFY on the file waits; its fchmod still waits; the close makes it ready;
    without a close, it is due at the settle time with the cause marked +settle."""
    settling = Settling()
    note = settling.note
    assert not note("/b", 1.0, 0.5, "IN_MODIFY", final=True, writing=True, finished=False)
    assert not note("/b", 1.1, 0.5, "IN_ATTRIB", final=True, writing=False, finished=False)
    assert settling.pop_due(1.4) == []
    assert settling.pop_due(1.5) == [("/b", "IN_MODIFY+settle", 1.5)]
    assert settling.pop_due(9.0) == []
    assert not note("/b", 2.0, 0.5, "IN_CREATE", final=True, writing=True, finished=False)
    assert note("/b", 2.1, 0.5, "IN_CLOSE_WRITE", final=True, writing=False, finished=True)
    assert list(settling.deadlines()) == []


def test_directory_event_and_held_checks() -> None:
    """An event on a directory of the route ends the wait; a held check is not postponed."""
    settling = Settling()
    settling.note("/b", 1.0, 0.5, "IN_MODIFY", final=True, writing=True, finished=False)
    assert settling.note("/b", 1.2, 0.5, "IN_ATTRIB", final=False, writing=False, finished=False)
    assert "/b" not in settling.due
    settling.hold("/b", 3.0, "IN_ATTRIB")
    settling.hold("/b", 4.0, "periodic")  # a rescan must not push it later
    assert list(settling.deadlines()) == [3.0]
    settling.discard("/b")
    assert settling.due == {}


# -- the status file's schedule, warnings and the poll timeout ------------------------------


def test_status_file_after_quiet_at_most_once_a_second_at_latest_when_stale() -> None:
    """Nothing changed: never due. Changed: after a quiet moment, no more than once per
    STATUS_EVERY, and at the latest STATUS_STALE after the change, however busy."""
    timer = StatusFileTimer()
    assert timer.deadline() == float("inf")
    timer.changed(10.0)
    timer.activity = 10.0
    assert timer.deadline() == 10.0 + STATUS_QUIET
    timer.wrote(10.2)
    assert timer.deadline() == float("inf")
    timer.changed(10.3)
    timer.changed(10.9)  # still the first change that counts
    assert timer.deadline() == 10.2 + STATUS_EVERY
    timer.activity = 15.2  # events keep coming
    assert timer.deadline() == 10.3 + STATUS_STALE


def test_status_file_after_a_lone_deploy_is_written_in_the_same_wake_up() -> None:
    """A wake-up after a quiet moment makes the file due at once (no later wake-up for
    it); wake-ups in a burst leave it for the quiet moment after the burst."""
    timer = StatusFileTimer()
    timer.wrote(0.0)
    timer.woke(100.0)  # one deploy after a long quiet
    timer.changed(100.0)
    assert timer.deadline() <= 100.0
    timer.wrote(100.001)
    timer.woke(100.05)  # a burst: the next deploy 50 ms later
    timer.changed(100.05)
    assert timer.deadline() == 100.001 + STATUS_EVERY
    timer.woke(101.5)  # quiet again: due at once, a second after the last write
    assert timer.deadline() == 100.001 + STATUS_EVERY


def test_throttle_says_once_per_period_with_the_count() -> None:
    """The first occurrence is said; the next ones are counted until the period ends."""
    throttle = Throttle(60.0)
    said = [throttle.tell(t) for t in (0.0, 1.0, 2.0, 59.0, 60.0, 61.0)]
    assert said == [1, 0, 0, 0, 4, 0]


def test_poll_timeout_is_the_nearest_deadline_rounded_up_and_bounded() -> None:
    """Milliseconds to the nearest deadline, never negative, never above a C int's bound."""
    assert poll_timeout_ms([5.0, 2.0015, float("inf")], 2.0) == 2
    assert poll_timeout_ms([1.0], 2.0) == 0
    assert poll_timeout_ms([float("inf")], 0.0) == MAX_POLL_MS
    assert poll_timeout_ms([], 0.0) == MAX_POLL_MS
    assert poll_timeout_ms([1e9], 0.0) == MAX_POLL_MS


def test_a_flood_pause_grows_while_little_gathers_and_shrinks_when_much_does() -> None:
    """Doubled while a pause gathers less than FLOOD_GATHER bytes, up to the cap; kept
    from that up to four times it; halved from there, never below FLOOD_PAUSE."""
    pause, seen = FLOOD_PAUSE, []
    for _ in range(6):
        pause = flood_pause(pause, FLOOD_GATHER - 1)
        seen.append(pause)
    assert seen[:3] == [2 * FLOOD_PAUSE, 4 * FLOOD_PAUSE, 8 * FLOOD_PAUSE]
    assert seen[3:] == [FLOOD_PAUSE_MAX] * 3 == [8 * FLOOD_PAUSE] * 3
    assert flood_pause(FLOOD_PAUSE_MAX, FLOOD_GATHER) == FLOOD_PAUSE_MAX
    assert flood_pause(FLOOD_PAUSE_MAX, 4 * FLOOD_GATHER - 1) == FLOOD_PAUSE_MAX
    assert flood_pause(FLOOD_PAUSE_MAX, 4 * FLOOD_GATHER) == FLOOD_PAUSE_MAX / 2
    assert flood_pause(FLOOD_PAUSE, 1 << 20) == FLOOD_PAUSE
