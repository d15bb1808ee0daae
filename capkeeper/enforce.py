"""Observe → decide → act, the one path shared by ``apply``, ``check`` and the daemon.

:func:`reconcile` opens the declared file by the fd-pinned walk
(:mod:`capkeeper.files`), hands what it saw to the pure
:func:`capkeeper.reconcile.decide`, and when asked writes (or, fail closed,
removes) ``security.capability`` on that same descriptor.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable

from capkeeper.errors import CapabilitiesNotKept, FileAccessError
from capkeeper.files import NO_XATTR, Pins, observe_declared, remove_caps, write_caps
from capkeeper.kernel import cap_last_cap
from capkeeper.model import Entry, Observation
from capkeeper.reconcile import Decision, Outcome, Status, decide
from capkeeper.trust import removal_blocker

_ATTEMPTS = 3  # walks tried when the file keeps being replaced while it is opened


def reconcile(
    entry: Entry,
    *,
    write: bool,
    last_cap: int | None = None,
    hold: Callable[[Observation, Decision], bool] | None = None,
    pins: Pins | None = None,
) -> Outcome:
    """Observe ``entry``'s file, decide, and (when ``write``) restore its capabilities.

    When ``hold`` returns True for the observation and verdict (the daemon: a
    write may be in progress), nothing is written: the outcome is ``held``.
    A file replaced between the walk and the open is walked again (a deploy
    renaming a new build into place); after a few such races in a row the
    outcome is a transient failure that the next event or retry looks at again.
    ``pins`` shares the walk of a directory between the entries of one batch
    (:class:`capkeeper.files.Pins`).
    """
    limit = cap_last_cap() if last_cap is None else last_cap
    attempt = 1
    while True:
        try:
            return _reconcile_once(entry, write=write, last_cap=limit, hold=hold, pins=pins)
        except FileAccessError as exc:
            if exc.errno == errno.ENOENT:
                return Outcome(entry, Status.MISSING, "none", reason="file does not exist")
            if exc.errno == errno.EAGAIN and attempt < _ATTEMPTS:
                attempt += 1
                continue
            transient = exc.errno == errno.EAGAIN
            return Outcome(entry, Status.FAILED, "unknown", reason=str(exc), transient=transient)


def _reconcile_once(
    entry: Entry,
    *,
    write: bool,
    last_cap: int,
    hold: Callable[[Observation, Decision], bool] | None,
    pins: Pins | None,
) -> Outcome:
    fd, observation = observe_declared(entry.path, hash=entry.sha256 is not None, pins=pins)
    try:
        resolved = observation.resolved
        decision = decide(entry, observation, last_cap=last_cap)
        if hold is not None and hold(observation, decision):
            return Outcome(
                entry,
                decision.status,
                decision.found,
                resolved,
                observation=observation,
                held=True,
            )
        if decision.status is Status.REFUSED:
            return _refuse(entry, fd, observation, decision, write=write)
        if not observation.xattr_supported:
            reason = f"{resolved}: {NO_XATTR}"
            return Outcome(
                entry,
                Status.FAILED,
                decision.found,
                resolved,
                reason=reason,
                observation=observation,
            )
        if decision.status is Status.IN_SYNC or not write:
            return Outcome(
                entry,
                decision.status,
                decision.found,
                resolved,
                extra=decision.extra,
                observation=observation,
            )
        try:
            write_caps(fd, entry.caps, path=entry.path)
        except CapabilitiesNotKept as exc:
            # Usually a race with whatever strips them (the daemon brakes such a fight);
            # the next event or retry looks again.
            return Outcome(
                entry,
                Status.FAILED,
                decision.found,
                resolved,
                reason=str(exc),
                observation=observation,
                transient=True,
            )
        return Outcome(
            entry,
            Status.RESTORED,
            decision.found,
            resolved,
            extra=decision.extra,
            observation=observation,
        )
    finally:
        os.close(fd)


def _refuse(
    entry: Entry, fd: int, observation: Observation, decision: Decision, *, write: bool
) -> Outcome:
    reason = "; ".join(str(r) for r in decision.refusals)
    capable = observation.caps is not None or observation.caps_problem is not None
    blocker = removal_blocker(observation, decision.refusals)
    if blocker is not None:
        # Whoever controls the route chose the file it reaches: it may be any
        # binary on the host, so nothing is changed on it.
        if write and capable:
            reason += (
                f"; nothing was changed on {observation.resolved} (it keeps {decision.found}): "
                f"{blocker}"
            )
    elif write and capable:
        # Fail closed: capabilities left on a file we no longer trust (its mode
        # loosened, its pinned content changed through a shared mmap, which keeps
        # them) would still be granted at every exec. Only root chose the route,
        # so this is the very file the declared path names.
        try:
            remove_caps(fd, path=entry.path)
            reason += f"; its capabilities ({decision.found}) were removed"
        except FileAccessError as exc:
            reason += f"; its capabilities could not be removed: {exc}"
    return Outcome(
        entry,
        Status.REFUSED,
        decision.found,
        observation.resolved,
        reason,
        observation=observation,
    )
