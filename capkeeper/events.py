"""The structured events capkeeper emits, each with a stable journald identity.

Every outcome is logged as one event name with fields. The registry below is
the single place that fixes each event's ``MESSAGE_ID`` (journald catalog
key), its syslog priority and the human sentence journald shows. The catalog
file in ``systemd/`` is generated from it.
"""

from __future__ import annotations

from enum import IntEnum
from typing import NamedTuple

from capkeeper.errors import printable


class Priority(IntEnum):
    """syslog priorities as journald's ``PRIORITY=`` field uses them."""

    EMERG = 0
    ALERT = 1
    CRIT = 2
    ERR = 3
    WARNING = 4
    NOTICE = 5
    INFO = 6
    DEBUG = 7


class EventSpec(NamedTuple):
    """Identity of one event type."""

    name: str
    message_id: str
    priority: Priority
    template: str  # str.format template over the event's fields; missing fields read "?"
    subject: str
    explanation: str


EVENTS: dict[str, EventSpec] = {
    spec.name: spec
    for spec in (
        EventSpec(
            "capability_restored",
            "5aaaaf94bc4b4066b6c2dd65cc94600a",
            Priority.WARNING,
            "restored capabilities of {path}: found {found}, expected {expected} (cause: {cause})",
            "capkeeper restored the file capabilities of @CAPKEEPER_PATH@",
            "The file capabilities (security.capability) of @CAPKEEPER_PATH@ did not\n"
            "match the declared state and capkeeper re-applied them. Found:\n"
            "@CAPKEEPER_FOUND@; expected: @CAPKEEPER_EXPECTED@; cause: @CAPKEEPER_CAUSE@.\n\n"
            "A deploy that replaces or rewrites a binary (package upgrade, rsync, cp,\n"
            "install, chown) drops its capabilities; this is the expected repair. If no\n"
            "deploy happened, find out who changed the file.",
        ),
        EventSpec(
            "capability_drift",
            "0987a420fc1e401ca8a645f2f7fcbadd",
            Priority.WARNING,
            "capabilities of {path} drifted: found {found}, expected {expected}",
            "File capabilities of @CAPKEEPER_PATH@ drifted",
            "A check found that @CAPKEEPER_PATH@ carries @CAPKEEPER_FOUND@ instead of the\n"
            "declared @CAPKEEPER_EXPECTED@. Nothing was changed (check mode).\n\n"
            "Run 'capkeeper apply @CAPKEEPER_PATH@' to restore the declared set.",
        ),
        EventSpec(
            "capability_tampering",
            "ce98f0d383534bc98ad7b07700af1b80",
            Priority.CRIT,
            "possible tampering: {path} carried extra capabilities {found}, expected {expected}",
            "Extra capabilities found on managed file @CAPKEEPER_PATH@",
            "@CAPKEEPER_PATH@ carried capabilities beyond the declared set\n"
            "(found @CAPKEEPER_FOUND@, declared @CAPKEEPER_EXPECTED@). Deploys remove\n"
            "capabilities, they do not add them: somebody with CAP_SETFCAP granted more.\n"
            "capkeeper enforced the declared set (unless in check mode). Investigate who\n"
            "changed the file and whether the host is compromised.",
        ),
        EventSpec(
            "restore_refused",
            "787d3a50af134653af161abfa2c77460",
            Priority.CRIT,
            "refused to grant capabilities to {path}: {reason}",
            "capkeeper refused to grant capabilities to @CAPKEEPER_PATH@",
            "capkeeper will not grant capabilities to @CAPKEEPER_PATH@ because the file\n"
            "cannot be trusted: @CAPKEEPER_REASON@.\n\n"
            "Capabilities are only granted to root-owned ELF binaries that nobody else\n"
            "can modify or replace, reached through directories and symlinks that only\n"
            "root controls, matching their sha256 pin if one is declared. If the file\n"
            "still carried capabilities, they were removed (fail closed). Fix the file\n"
            "or the state; capkeeper retries on the next change or rescan.",
        ),
        EventSpec(
            "restore_failed",
            "dc30aa3b8ed44f4a91bddc700f3498e0",
            Priority.ERR,
            "could not restore capabilities of {path}: {reason}",
            "capkeeper failed to restore capabilities of @CAPKEEPER_PATH@",
            "Writing security.capability on @CAPKEEPER_PATH@ failed: @CAPKEEPER_REASON@.\n\n"
            "Common causes: capkeeper lacks CAP_SETFCAP (run as root or grant it), the\n"
            "file system is read-only (ProtectSystem=strict without the directory in\n"
            "ReadWritePaths=; run 'capkeeper systemd-dropin'), or it does not support\n"
            "extended attributes.",
        ),
        EventSpec(
            "binary_missing",
            "539cf65ad14f4e46884e85069adb5337",
            Priority.NOTICE,
            "declared binary {path} does not exist",
            "Declared binary @CAPKEEPER_PATH@ is missing",
            "@CAPKEEPER_PATH@ is declared in the state but does not exist. capkeeper\n"
            "applies its capabilities as soon as it appears.",
        ),
        EventSpec(
            "state_loaded",
            "e44259adf87d429a88b43bd1f28f3ff2",
            Priority.INFO,
            "state loaded: {entries} declared binaries from {files}",
            "capkeeper loaded its state",
            "capkeeper loaded the declared state and enforces it from now on.",
        ),
        EventSpec(
            "state_rejected",
            "a95e98663af942fdb709be53b8d471e6",
            Priority.ERR,
            "state rejected, keeping the previous one: {error}",
            "capkeeper rejected an invalid state",
            "The state files could not be loaded: @CAPKEEPER_ERROR@.\n\n"
            "The previously loaded state stays in force. Fix the files and run\n"
            "'capkeeper validate', then 'systemctl reload capkeeper'.",
        ),
        EventSpec(
            "rescan",
            "6a86ce47dbd84ddc85d39bee47910d00",
            Priority.INFO,
            "rescan ({cause}): {entries} entries checked",
            "capkeeper rescanned declared binaries",
            "capkeeper reconciled declared binaries outside the normal event path:\n"
            "all of them at start-up, as the periodic backstop, after a reload, an\n"
            "inotify queue overflow or a failed watch; only those reached through the\n"
            "changed mount points after a mount or unmount (cause 'mount'), and only\n"
            "those in directories others can write to after an overflow of their\n"
            "queue (cause 'overflow', scope 'exposed').",
        ),
        EventSpec(
            "queue_overflow",
            "9a3185a30f5a4e8cb13ade626d63c371",
            Priority.WARNING,
            "inotify queue overflowed; rescanning what it covered",
            "capkeeper's inotify event queue overflowed",
            "More file system events arrived than the kernel queue holds\n"
            "(/proc/sys/fs/inotify/max_queued_events). Events were lost, so capkeeper\n"
            "reconciled what that queue covered. Directories that users other than\n"
            "root can write to (/tmp, /var/tmp, group-writable directories) have a\n"
            "queue of their own (CAPKEEPER_QUEUE=exposed): anyone can flood it, and\n"
            "then only the binaries in those directories are rescanned; this warning\n"
            "is then repeated at most once a minute. Keep privileged binaries in\n"
            "directories only root can write. If the main queue overflows, raise the\n"
            "limit.",
        ),
        EventSpec(
            "mount_watch_failed",
            "e0fd51bc6f0f4fb698dfcfba45235b93",
            Priority.WARNING,
            "cannot follow mount changes: {error}",
            "capkeeper cannot follow mount changes",
            "/proc/self/mountinfo could not be opened or read (@CAPKEEPER_ERROR@).\n"
            "inotify does not see mounts: a file system mounted over a watched\n"
            "directory is then only noticed by the periodic rescan.",
        ),
        EventSpec(
            "watch_failed",
            "cc33f92bf87641919bc2d39c859d3782",
            Priority.ERR,
            "cannot watch {directory}: {reason}",
            "capkeeper cannot watch @CAPKEEPER_DIRECTORY@",
            "An inotify watch could not be added: @CAPKEEPER_REASON@. Changes there are\n"
            "only caught by the periodic rescan. Raise fs.inotify.max_user_watches or\n"
            "max_user_instances if the limit was reached.",
        ),
        EventSpec(
            "capability_ineffective",
            "ca318940116b4b89b816a645d40c2dd5",
            Priority.WARNING,
            "capabilities of {path} will not take effect for {unit}: {reason} (fix: {fix})",
            "Capabilities of @CAPKEEPER_PATH@ cannot take effect",
            "@CAPKEEPER_PATH@ carries (or will carry) its declared file capabilities,\n"
            "but they cannot work when @CAPKEEPER_UNIT@ starts it: @CAPKEEPER_REASON@.\n\n"
            "Typical causes: NoNewPrivileges= (also implied by SystemCallFilter= and\n"
            "other sandboxing for non-root services), a CapabilityBoundingSet= without\n"
            "the capability (execve then fails with EPERM), a nosuid mount, or a\n"
            "script. Suggested fix: @CAPKEEPER_FIX@.",
        ),
        EventSpec(
            "unit_check_failed",
            "7a53b2b37f6946048ef127c807605805",
            Priority.WARNING,
            "cannot check unit {unit}: {reason}",
            "capkeeper could not inspect unit @CAPKEEPER_UNIT@",
            "capkeeper apply --unit could not read the properties of @CAPKEEPER_UNIT@\n"
            "(@CAPKEEPER_REASON@), so it could not tell whether the declared file\n"
            "capabilities will take effect there. The capabilities were applied anyway.",
        ),
        EventSpec(
            "restore_flapping",
            "fa0d8597bb464de7a6659f3baff4cc9c",
            Priority.ERR,
            "capabilities of {path} keep being undone ({restores} restores in a row of an "
            "unchanged file); restoring at most once a second",
            "Capabilities of @CAPKEEPER_PATH@ keep being undone",
            "capkeeper restored @CAPKEEPER_PATH@ several times in quick succession while\n"
            "the file itself did not change (same inode, content, owner and mode; found\n"
            "@CAPKEEPER_FOUND@, expected @CAPKEEPER_EXPECTED@). Something keeps undoing\n"
            "the restore: two declared paths that resolve to the same file with\n"
            "different capabilities, or a process stripping them in a loop. capkeeper\n"
            "now restores it at most once a second and repeats this alert at most once\n"
            "a minute; a new deploy of the file is still restored at once. Find the\n"
            "other writer.",
        ),
        EventSpec(
            "start_up_helper_failed",
            "c2c4e43962644cfcbf4de65f1e2000fe",
            Priority.WARNING,
            "the start-up helper process failed ({reason}); the daemon checked its "
            "{entries} remaining entries itself",
            "capkeeper's start-up helper failed",
            "At start-up capkeeper shares the check of a large state with one forked\n"
            "helper process when a second CPU is available. The helper failed\n"
            "(@CAPKEEPER_REASON@) and the daemon checked the @CAPKEEPER_ENTRIES@ entries\n"
            "it had not reported itself, so every entry was still checked before\n"
            "READY=1. A restore the helper made just before it failed may have gone\n"
            "without its alert: the file is then found in sync. Please report it.",
        ),
        EventSpec(
            "reconcile_crashed",
            "042195f24e0b4096918cbc295d91257c",
            Priority.ERR,
            "internal error while checking {path}; other binaries are still enforced",
            "capkeeper hit an internal error on @CAPKEEPER_PATH@",
            "An unexpected error occurred while reconciling @CAPKEEPER_PATH@. The\n"
            "daemon keeps enforcing the other declared binaries and retries this one\n"
            "later. The journal entry holds the traceback: please report it.",
        ),
        EventSpec(
            "sd_notify_failed",
            "33f160236ad2412aba794e21b8f63de0",
            Priority.WARNING,
            "cannot notify systemd via {socket}: {error}",
            "capkeeper cannot talk to the service manager",
            "Sending a notification (READY=1, WATCHDOG=1, STATUS=...) to\n"
            "@CAPKEEPER_SOCKET@ failed: @CAPKEEPER_ERROR@. If this persists, systemd\n"
            "may consider the service failed to start or hung (watchdog).",
        ),
        EventSpec(
            "status_file_failed",
            "c2817f98c4cb40e58b2571465f35bfc9",
            Priority.WARNING,
            "cannot write the status file {file}: {error}",
            "capkeeper cannot write its status file",
            "The status file @CAPKEEPER_FILE@ could not be written\n"
            "(@CAPKEEPER_ERROR@); 'capkeeper status' shows stale data. Enforcement\n"
            "is not affected. Check RuntimeDirectory= and the file system.",
        ),
        EventSpec(
            "daemon_stopping",
            "b3b2a1d7767c4d0e9c36d2e8d63f83f5",
            Priority.INFO,
            "capkeeper stopping; {entries} binaries no longer watched",
            "capkeeper stopped watching",
            "The capkeeper daemon is stopping. Capabilities dropped from now on are\n"
            "only restored when it runs again (or by 'capkeeper apply').",
        ),
        EventSpec(
            "daemon_started",
            "8cf3f39b18b04e9c9a555cc6145cbba5",
            Priority.INFO,
            "capkeeper watching {entries} binaries in {directories} directories",
            "capkeeper started watching",
            "The capkeeper daemon finished its first full reconcile and is watching.",
        ),
    )
}


def spec_for(event: str) -> EventSpec | None:
    """The registered spec of ``event``, or None for routine/debug events."""
    return EVENTS.get(event)


class _Fields(dict[str, object]):
    def __missing__(self, key: str) -> str:
        return "?"


def render_message(event: str, fields: dict[str, object]) -> str:
    """A human sentence for ``event`` on one line, untrusted names escaped
    (:func:`~capkeeper.errors.printable`); unregistered events read ``event k=v …``."""
    spec = EVENTS.get(event)
    if spec is None:
        extras = " ".join(f"{k}={v}" for k, v in fields.items() if not k.startswith("_"))
        return printable(f"{event} {extras}".rstrip())
    return printable(spec.template.format_map(_Fields(fields)))
