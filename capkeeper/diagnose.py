"""The checks of ``capkeeper doctor``: will a binary's capabilities actually take effect?

Many "lost capabilities" reports are capabilities that are present but cannot
work. For each binary, :func:`diagnose` checks, in this order:

* for a declared binary, the trust policy: every reason ``apply`` would refuse it
  (the rules ``validate`` reports);
* the mount: ``nosuid`` (the kernel ignores file capabilities there),
  ``noexec``, read-only (capkeeper cannot restore them), a file system without
  extended attributes;
* the file: a script (the kernel reads the interpreter's capabilities, not the
  script's), an interpreter (every script it runs gets them), setuid/setgid;
* the declared set: inheritable capabilities nothing will hold, the effective
  bit on capabilities outside a typical bounding set (``execve`` then fails
  with EPERM wherever the bounding set lacks one);
* with a unit, its properties from ``systemctl show``: ``NoNewPrivileges=``
  (explicit or implied by sandboxing options), a ``CapabilityBoundingSet=``
  lacking a declared capability, ``AmbientCapabilities=`` combined with file
  capabilities, and ``User=`` (root gains nothing from file capabilities).

Every :class:`Problem` carries a one-line explanation and a fix. The checks
are pure functions of observed facts (:class:`Facts`, :class:`UnitProperties`);
:func:`gather` and :func:`systemctl_show` are the thin readers. The command line is
:mod:`capkeeper.commands.doctor`; ``apply --unit`` runs :func:`preflight`.
"""

from __future__ import annotations

import contextlib
import errno
import os
import posixpath
import re
import shutil
import stat
import subprocess
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TextIO

from capkeeper.capabilities import CapSet, capability_name, capability_number
from capkeeper.errors import CapkeeperError, InvalidCapabilityText, printable
from capkeeper.files import observe, observe_fd, open_declared
from capkeeper.interpreters import runs_other_code
from capkeeper.kernel import cap_last_cap
from capkeeper.log import get_logger
from capkeeper.model import Entry, Kind, Observation
from capkeeper.mounts import MountInfo, mount_of_fd
from capkeeper.state import State
from capkeeper.trust import FLOOD_HINT, Refusal, assess, exposed_directory, flood_warning

__all__ = [
    "TYPICAL_BOUNDING_SET",
    "UNIT_PROPERTIES",
    "Diagnosis",
    "Facts",
    "Problem",
    "Severity",
    "Target",
    "UnitProperties",
    "check_declared",
    "check_file",
    "check_mount",
    "check_trust",
    "check_unit",
    "diagnose",
    "gather",
    "parse_unit_properties",
    "preflight",
    "run_checks",
    "systemctl_show",
    "targets",
    "unit_properties",
]

# A fixed search path, not $PATH: 'ExecStartPre=+capkeeper apply --unit' runs as root
# with the consuming unit's environment.
SYSTEMCTL: Sequence[str] = (
    shutil.which("systemctl", path="/usr/bin:/bin") or "/usr/bin/systemctl",
)
"""The command that reaches the service manager (tests point it into a sandbox)."""

TYPICAL_BOUNDING_SET: frozenset[int] = frozenset(
    capability_number(name)
    for name in (
        # The default capability set of Docker, Podman and containerd (OCI runtimes).
        "cap_chown",
        "cap_dac_override",
        "cap_fsetid",
        "cap_fowner",
        "cap_mknod",
        "cap_net_raw",
        "cap_setgid",
        "cap_setuid",
        "cap_setfcap",
        "cap_setpcap",
        "cap_net_bind_service",
        "cap_sys_chroot",
        "cap_kill",
        "cap_audit_write",
    )
)
"""A bounding set binaries commonly meet: the default of container runtimes."""

# systemd.exec(5), NoNewPrivileges=: these options force it on for a service
# that does not hold CAP_SYS_ADMIN (systemd's context_has_no_new_privileges()).
_IMPLYING_NNP: tuple[str, ...] = (
    "LockPersonality",
    "MemoryDenyWriteExecute",
    "PrivateDevices",
    "ProtectClock",
    "ProtectHostname",
    "ProtectKernelLogs",
    "ProtectKernelModules",
    "ProtectKernelTunables",
    "RestrictAddressFamilies",
    "RestrictNamespaces",
    "RestrictRealtime",
    "RestrictSUIDSGID",
    "SystemCallArchitectures",
    "SystemCallFilter",
    "SystemCallLog",
)

_SYS_ADMIN = capability_number("cap_sys_admin")

UNIT_PROPERTIES: tuple[str, ...] = (
    "Id",
    "LoadState",
    "NoNewPrivileges",
    "CapabilityBoundingSet",
    "AmbientCapabilities",
    "User",
    "DynamicUser",
    "ExecStart",
    *_IMPLYING_NNP,
)
"""The properties :func:`systemctl_show` asks for."""


class Severity(StrEnum):
    """``error``: the capabilities will not work, or already expose them to anyone (a loader
    or interpreter carrying them); ``warning``: they may not work, or add risk."""

    ERROR = "error"
    WARNING = "warning"


@dataclass(frozen=True)
class Problem:
    """One reason a binary's capabilities would not take effect, and how to fix it."""

    path: str
    check: str  # stable identifier, e.g. "nosuid"
    severity: Severity
    message: str
    fix: str
    advisory: bool = False  # worth knowing, but no reason for a non-zero exit status

    def line(self) -> str:
        return f"{self.path}: {self.severity}: {self.message}"

    def record(self) -> dict[str, str]:
        return {
            "path": self.path,
            "check": self.check,
            "severity": str(self.severity),
            "message": self.message,
            "fix": self.fix,
        }


@dataclass(frozen=True)
class Target:
    """A binary to diagnose and the capabilities it is meant to carry."""

    path: str
    caps: CapSet | None  # None: neither declared nor present
    declared: bool = True
    named: bool = False  # given on the command line (not taken from the state or the unit)
    allow_interpreter: bool = False  # the entry accepts a program that runs other code
    entry: Entry | None = None  # the declared entry, judged by the trust policy

    @classmethod
    def of(cls, entry: Entry, *, named: bool = False) -> Target:
        """The target for a declared entry."""
        return cls(
            entry.path,
            entry.caps,
            named=named,
            allow_interpreter=entry.allow_interpreter,
            entry=entry,
        )


@dataclass(frozen=True)
class Facts:
    """What :func:`gather` observed about a binary."""

    observation: Observation | None
    missing: str | None = None  # why it could not be observed
    mount: MountInfo | None = None
    xattr_error: int = 0  # EOPNOTSUPP when the file system has no extended attributes


@dataclass(frozen=True)
class UnitProperties:
    """The properties of a unit that decide whether file capabilities work in it."""

    name: str
    load_state: str = "loaded"
    no_new_privileges: bool = False
    bounding_set: frozenset[int] | None = None  # None: unknown (every capability)
    ambient: frozenset[int] = frozenset()
    user: str = ""
    dynamic_user: bool = False
    exec_paths: tuple[str, ...] = ()
    implying_nnp: tuple[str, ...] = ()  # options set that imply NoNewPrivileges=yes

    @property
    def runs_as_root(self) -> bool:
        return not self.dynamic_user and self.user in ("", "root", "0")


def _names(capabilities: Iterable[int]) -> str:
    return ", ".join(capability_name(n) for n in sorted(capabilities))


def _capability_set(text: str) -> frozenset[int]:
    numbers = set()
    for word in text.split():
        try:
            numbers.add(capability_number(word))
        except InvalidCapabilityText:
            continue  # a capability newer than our table: it cannot be declared anyway
    return frozenset(numbers)


def _set_option(name: str, value: str) -> bool:
    """Whether a ``systemctl show`` value means the option is in use."""
    value = value.strip()
    if name == "RestrictNamespaces":
        # Shown as the namespaces still allowed; all of them (or "no") means unset.
        allowed = set(value.split())
        every = {"cgroup", "ipc", "net", "mnt", "pid", "user", "uts"}
        return value not in ("", "no") and not every <= allowed
    # "~" is an empty deny list: SystemCallFilter=, RestrictAddressFamilies= unset.
    return value not in ("", "no", "~")


def parse_unit_properties(name: str, text: str) -> UnitProperties:
    """Parse ``systemctl show -p …`` output (``Key=value`` lines)."""
    values: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            values[key] = value
    bounding = values.get("CapabilityBoundingSet")
    return UnitProperties(
        name=values.get("Id") or name,
        load_state=values.get("LoadState", "loaded"),
        no_new_privileges=values.get("NoNewPrivileges") == "yes",
        bounding_set=_capability_set(bounding) if bounding is not None else None,
        ambient=_capability_set(values.get("AmbientCapabilities", "")),
        user=values.get("User", ""),
        dynamic_user=values.get("DynamicUser") == "yes",
        exec_paths=tuple(re.findall(r"path=([^ ;]+)", values.get("ExecStart", ""))),
        implying_nnp=tuple(n for n in _IMPLYING_NNP if _set_option(n, values.get(n, ""))),
    )


def _run_systemctl(argv: Sequence[str]) -> str:
    try:
        result = subprocess.run(
            [*SYSTEMCTL, *argv], capture_output=True, text=True, check=False, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise CapkeeperError(f"cannot run systemctl: {exc}") from exc
    if result.returncode != 0:
        detail = result.stderr.strip() or f"exit status {result.returncode}"
        raise CapkeeperError(f"systemctl {' '.join(argv)} failed: {detail}")
    return result.stdout


def systemctl_show(
    unit: str, *, run: Callable[[Sequence[str]], str] = _run_systemctl
) -> UnitProperties:
    """Ask the service manager for ``unit``'s properties; raise if it is not loaded."""
    args = ["show"]
    for name in UNIT_PROPERTIES:
        args += ["-p", name]
    args += ["--", unit]
    properties = parse_unit_properties(unit, run(args))
    if properties.load_state != "loaded":
        raise CapkeeperError(
            f"unit {unit} is {properties.load_state}",
            hint="check the unit name with 'systemctl status'",
        )
    return properties


# -- the checks (pure) ------------------------------------------------------------------


def check_mount(path: str, facts: Facts) -> list[Problem]:
    """Problems of the mount and file system ``path`` lives on."""
    problems = []
    mount = facts.mount
    if mount is not None:
        where = f"{mount.mount_point} ({mount.fstype})"
        if mount.nosuid:
            problems.append(
                Problem(
                    path,
                    "nosuid",
                    Severity.ERROR,
                    f"the mount {where} is nosuid: the kernel ignores file capabilities there",
                    f"remount it with suid (mount -o remount,suid {mount.mount_point}), "
                    "or install the binary on a mount without nosuid",
                )
            )
        if mount.noexec:
            problems.append(
                Problem(
                    path,
                    "noexec",
                    Severity.ERROR,
                    f"the mount {where} is noexec: the binary cannot be executed at all",
                    f"remount it with exec (mount -o remount,exec {mount.mount_point}), "
                    "or install the binary elsewhere",
                )
            )
        if mount.read_only:
            which = "file system" if mount.read_only_super else "mount"
            problems.append(
                Problem(
                    path,
                    "read-only",
                    Severity.WARNING,
                    f"the {which} {where} is read-only: capkeeper cannot restore capabilities "
                    "there (those present still work)",
                    "set them in the image the file system is built from, or make it writable",
                )
            )
    if facts.xattr_error in (errno.EOPNOTSUPP, errno.ENOTSUP):
        fstype = f" ({mount.fstype})" if mount is not None else ""
        problems.append(
            Problem(
                path,
                "no-xattr",
                Severity.ERROR,
                f"the file system{fstype} does not support extended attributes: "
                "it cannot carry file capabilities",
                "install the binary on ext4, xfs, btrfs or tmpfs",
            )
        )
    return problems


def check_file(
    path: str, observation: Observation, *, allow_interpreter: bool = False
) -> list[Problem]:
    """Problems of the file itself.

    A loader or interpreter that already carries capabilities is an error
    unless its entry says ``allow_interpreter = true`` (then a warning).
    """
    problems = []
    if observation.kind is Kind.SCRIPT:
        problems.append(
            Problem(
                path,
                "script",
                Severity.ERROR,
                f"is a script (#!{observation.interpreter}): the kernel ignores file "
                "capabilities on scripts",
                "give the service AmbientCapabilities= in its unit, or put the capabilities "
                "on a compiled program",
            )
        )
    elif observation.kind is Kind.ELF:
        runs = runs_other_code(posixpath.basename(observation.resolved), observation.elf)
        if runs is not None:
            # Already capable: anyone who can run it holds its capabilities now.
            capable = observation.caps is not None and not observation.caps.is_empty
            exposed = capable and not allow_interpreter
            problems.append(
                Problem(
                    path,
                    "interpreter",
                    Severity.ERROR if exposed else Severity.WARNING,
                    f"{runs} gets these capabilities",
                    "use AmbientCapabilities= in the unit of the one service that needs them, "
                    "or a dedicated compiled program"
                    + (f"; remove them now: setcap -r {path}" if exposed else ""),
                )
            )
    if observation.mode & (stat.S_ISUID | stat.S_ISGID):
        problems.append(
            Problem(
                path,
                "setuid",
                Severity.WARNING,
                f"is setuid/setgid (mode {stat.S_IMODE(observation.mode):04o}): for a "
                "setuid-root binary the file capabilities replace root's full set; setuid "
                "and file capabilities do not compose",
                f"use one mechanism: chmod ug-s {path}, or drop the file capabilities",
            )
        )
    return problems


def check_exposure(
    path: str, observation: Observation, refusals: Sequence[Refusal] = ()
) -> list[Problem]:
    """A binary in a directory others can write to: anyone there can delay its restores
    (said by a trust refusal already when such a directory refuses it)."""
    directory = exposed_directory(observation)
    if directory is None or any(r.rule.startswith("directory") for r in refusals):
        return []
    return [
        Problem(
            path,
            "flood-exposed",
            Severity.WARNING,
            flood_warning(directory),
            FLOOD_HINT,
            advisory=True,
        )
    ]


# Refusal rules whose reason check_file gives already, in its own words and severity.
_EXPLAINED_BY_CHECK_FILE = {"interpreter": "interpreter", "setuid": "setuid", "elf": "script"}


def check_trust(path: str, refusals: Sequence[Refusal], explained: Iterable[str]) -> list[Problem]:
    """Every reason the trust policy refuses a declared binary: ``apply`` and the daemon
    will not give it its capabilities (``validate`` lists the same reasons).

    A reason one of the checks ``explained`` gives already is not repeated.
    """
    told = set(explained)
    return [
        Problem(
            path,
            f"trust-{refusal.rule}",
            Severity.ERROR,
            printable(f"capkeeper refuses it: {refusal.message}"),
            printable(refusal.hint or "fix what the refusal names, then run 'capkeeper apply'"),
        )
        for refusal in refusals
        if _EXPLAINED_BY_CHECK_FILE.get(refusal.rule) not in told
    ]


def check_declared(path: str, caps: CapSet, unit: UnitProperties | None = None) -> list[Problem]:
    """Problems of the capability set itself (and how it meets ``unit``'s inheritable set)."""
    problems = []
    inheritable = {n for n in range(64) if caps.inheritable >> n & 1}
    # Only capabilities the process already holds in its inheritable set pass a
    # file's inheritable set; systemd puts AmbientCapabilities= there.
    unheld = inheritable - (unit.ambient if unit is not None else frozenset())
    if unheld:
        where = f"unit {unit.name}" if unit is not None else "the process that runs it"
        problems.append(
            Problem(
                path,
                "inheritable",
                Severity.WARNING,
                f"declares inheritable {_names(unheld)}: they only reach a process that "
                f"already holds them in its inheritable set, and {where} does not",
                "drop '+i' (and allow_inheritable) from the declared capabilities",
            )
        )
    permitted = {n for n in range(64) if caps.permitted >> n & 1}
    beyond = permitted - TYPICAL_BOUNDING_SET
    if caps.effective and beyond and unit is None:
        problems.append(
            Problem(
                path,
                "effective-bounding",
                Severity.WARNING,
                f"is effective with {_names(beyond)}, outside the default bounding set of "
                "container runtimes: where the bounding set lacks one, execve fails with "
                "EPERM",
                "check that every bounding set it runs under has them (doctor --unit), "
                "or declare them without '+e' and raise them in the program",
            )
        )
    return problems


def check_unit(
    path: str, caps: CapSet | None, unit: UnitProperties, *, named: bool = False
) -> list[Problem]:
    """Problems of running ``path`` with ``caps`` in ``unit``.

    ``named``: the path was given by the user, so say so when the unit does not run it.
    """
    problems = []
    name = unit.name
    if named and unit.exec_paths and path not in unit.exec_paths:
        problems.append(
            Problem(
                path,
                "not-executed",
                Severity.WARNING,
                f"unit {name} does not run it (ExecStart= runs {', '.join(unit.exec_paths)})",
                "check the unit name and the path",
            )
        )
    if unit.no_new_privileges:
        problems.append(
            Problem(
                path,
                "no-new-privileges",
                Severity.ERROR,
                f"unit {name} has NoNewPrivileges=yes: the kernel ignores file capabilities "
                "of every program the service executes",
                f"set AmbientCapabilities= in {name} instead of file capabilities, or drop "
                "NoNewPrivileges=yes",
            )
        )
    elif unit.implying_nnp and not unit.runs_as_root and _SYS_ADMIN not in unit.ambient:
        options = ", ".join(f"{o}=" for o in unit.implying_nnp)
        problems.append(
            Problem(
                path,
                "no-new-privileges",
                Severity.ERROR,
                f"unit {name} sets {options} which imply NoNewPrivileges=yes for an "
                "unprivileged service: the kernel ignores file capabilities",
                f"set AmbientCapabilities= in {name} instead of file capabilities",
            )
        )
    if caps is None:
        return problems
    permitted = {n for n in range(64) if caps.permitted >> n & 1}
    if unit.bounding_set is not None:
        lacking = permitted - unit.bounding_set
        if lacking:
            consequence = (
                "with the effective bit set, execve fails with EPERM"
                if caps.effective
                else "the bounding set masks them, so the process never gets them"
            )
            problems.append(
                Problem(
                    path,
                    "bounding-set",
                    Severity.ERROR,
                    f"unit {name}'s CapabilityBoundingSet= lacks {_names(lacking)}: {consequence}",
                    f"add {_names(lacking)} to CapabilityBoundingSet= in {name}",
                )
            )
    if unit.ambient and not caps.is_empty:
        problems.append(
            Problem(
                path,
                "ambient",
                Severity.WARNING,
                f"unit {name} sets AmbientCapabilities={_names(unit.ambient)}, but the kernel "
                "clears the ambient set when it executes a file with capabilities: only the "
                "file capabilities count",
                f"use one mechanism: drop AmbientCapabilities= from {name}, or the file "
                "capabilities",
            )
        )
    if unit.runs_as_root and not caps.is_empty:
        problems.append(
            Problem(
                path,
                "user",
                Severity.WARNING,
                f"unit {name} runs as root (no User=): root already holds every capability "
                "of its bounding set, so the file capabilities add nothing",
                f"set User= in {name} to an unprivileged account",
            )
        )
    return problems


def diagnose(
    target: Target,
    facts: Facts,
    unit: UnitProperties | None = None,
    *,
    last_cap: int | None = None,
) -> list[Problem]:
    """Every problem standing between ``target``'s capabilities and a process using them."""
    path = target.path
    if facts.observation is None:
        return [
            Problem(
                path,
                "missing",
                Severity.ERROR,
                f"cannot be checked: {facts.missing or 'not found'}",
                "install it, or remove its entry from the state",
            )
        ]
    refusals: tuple[Refusal, ...] = ()
    if target.entry is not None:
        limit = cap_last_cap() if last_cap is None else last_cap
        refusals = assess(target.entry, facts.observation, last_cap=limit)
    found = check_file(path, facts.observation, allow_interpreter=target.allow_interpreter)
    problems = check_trust(path, refusals, (p.check for p in found))
    problems += check_mount(path, facts)
    problems += found
    problems += check_exposure(path, facts.observation, refusals)
    if target.caps is None:
        problems.append(
            Problem(
                path,
                "no-capabilities",
                Severity.WARNING,
                "is not declared in the state and carries no capabilities",
                f"declare it in the state, or setcap it and run 'capkeeper adopt {path}'",
            )
        )
    else:
        problems += check_declared(path, target.caps, unit)
    if unit is not None:
        problems += check_unit(path, target.caps, unit, named=target.named)
    return problems


# -- the readers --------------------------------------------------------------------------


def gather(path: str, hash: bool = False) -> Facts:
    """Observe ``path`` and the mount it lives on, all through the one descriptor that the
    safe walk opened (a path looked up again could lead elsewhere by then)."""
    mount: MountInfo | None = None
    try:
        with open_declared(path) as (fd, hops, resolved):
            observation = observe_fd(path, fd, hops, resolved, hash=hash)
            with contextlib.suppress(OSError, LookupError, ValueError):
                mount = mount_of_fd(fd, name=resolved)
    except CapkeeperError as exc:
        return Facts(None, missing=exc.message)
    # observe_fd read security.capability through the descriptor (files.read_caps).
    xattr_error = 0 if observation.xattr_supported else errno.EOPNOTSUPP
    return Facts(observation, mount=mount, xattr_error=xattr_error)


def _normal(path: str) -> str:
    return posixpath.normpath(os.path.abspath(path))


def targets(state: State, paths: Sequence[str]) -> list[Target]:
    """The targets for ``paths``, or every declared entry when there are none.

    A path that is not declared is checked with the capabilities it carries now.
    """
    if not paths:
        return [Target.of(e) for e in state.entries]
    declared: Mapping[str, Entry] = state.by_path()
    found: list[Target] = []
    for path in dict.fromkeys(_normal(p) for p in paths):
        entry = declared.get(path)
        if entry is not None:
            found.append(Target.of(entry, named=True))
            continue
        try:
            caps = observe(path).caps
        except CapkeeperError:
            caps = None
        found.append(Target(path, caps, declared=False, named=True))
    return found


@dataclass
class Diagnosis:
    """The problems found for each target, and what could not be checked."""

    results: list[tuple[Target, list[Problem]]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    @property
    def problems(self) -> list[Problem]:
        return [p for _, found in self.results for p in found]


def run_checks(
    chosen: Sequence[Target],
    unit: UnitProperties | None,
    *,
    facts_of: Callable[[str, bool], Facts] = gather,
) -> Diagnosis:
    """Diagnose each target (the content of a pinned one is hashed for the trust policy)."""
    diagnosis = Diagnosis()
    for target in chosen:
        pinned = target.entry is not None and target.entry.sha256 is not None
        diagnosis.results.append((target, diagnose(target, facts_of(target.path, pinned), unit)))
    return diagnosis


def unit_properties(name: str | None, failures: list[str]) -> UnitProperties | None:
    """The properties of unit ``name`` (None without a name); why they cannot be read is
    added to ``failures``."""
    if not name:
        return None
    try:
        return systemctl_show(name)
    except CapkeeperError as exc:
        failures.append(str(exc))
        return None


def preflight(
    unit_name: str, state: State, paths: Sequence[str], out: TextIO, *, log_events: bool
) -> list[Problem]:
    """The ``apply --unit`` checks: print each problem as a warning line and go on.

    The binaries checked are ``paths``, else the declared ones among the unit's
    ExecStart= binaries, else every declared entry. Nothing here changes
    apply's exit status: whether a service may start although its capabilities
    cannot work is the unit author's call, and a failing ExecStartPre= would
    keep it from starting at all.
    """
    failures: list[str] = []
    unit = unit_properties(unit_name, failures)
    if paths:
        chosen = targets(state, paths)
    else:
        declared = state.by_path()
        run = [declared[p] for p in (unit.exec_paths if unit is not None else ()) if p in declared]
        entries = run or list(state.entries)
        chosen = [Target.of(e) for e in entries]
    diagnosis = run_checks(chosen, unit)
    logger = get_logger()
    for failure in failures:
        out.write(printable(f"warning   cannot check unit {unit_name}: {failure}") + "\n")
        if log_events:
            logger.warning("unit_check_failed", unit=unit_name, reason=failure)
    # apply reports a missing or refused binary itself, on its own line.
    problems = [
        p for p in diagnosis.problems if p.check != "missing" and not p.check.startswith("trust-")
    ]
    for problem in problems:
        out.write(
            printable(f"warning   {problem.path}  {problem.message} (fix: {problem.fix})") + "\n"
        )
        if log_events:
            logger.warning(
                "capability_ineffective",
                unit=unit_name,
                path=problem.path,
                check=problem.check,
                reason=problem.message,
                fix=problem.fix,
            )
    return problems
