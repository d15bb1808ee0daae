"""The ``capkeeper`` command line: the only place that turns errors into exit codes."""

from __future__ import annotations

import argparse
import errno
import json
import os
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn, TextIO

from capkeeper import adopt, audit, doctor
from capkeeper.capabilities import decode_revision, format_text
from capkeeper.enforce import reconcile
from capkeeper.errors import (
    CapkeeperError,
    FileAccessError,
    SettingsError,
    StateError,
    UsageError,
    printable,
)
from capkeeper.exit_codes import ExitStatus
from capkeeper.files import NO_XATTR, observe, read_path_caps
from capkeeper.kernel import cap_last_cap
from capkeeper.log import LEVELS, configure, get_logger
from capkeeper.model import Entry
from capkeeper.reconcile import Outcome, Status, log_outcome
from capkeeper.settings import Settings, load_settings, option_type
from capkeeper.state import State, load_state
from capkeeper.systemd import (
    DROPIN,
    HIDDEN_FROM_SERVICE,
    dropin_refusals,
    dropin_text,
    write_atomically,
)
from capkeeper.trust import FLOOD_HINT, assess, exposed_directory, flood_warning

__all__ = ["COMMANDS", "ExitStatus", "build_parser", "main"]


class _Version(argparse.Action):
    """``--version``: reads the installed version only when asked (it costs an import)."""

    def __init__(self, option_strings: Sequence[str], dest: str, help: str | None = None) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, help=help)

    def __call__(self, parser: argparse.ArgumentParser, *args: object) -> None:
        import capkeeper  # noqa: PLC0415

        sys.stdout.write(f"capkeeper {capkeeper.__version__}\n")
        parser.exit()


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see '{self.prog} --help')")


def _common(parser: argparse.ArgumentParser, *, suppress: bool) -> None:
    default = argparse.SUPPRESS if suppress else None
    parser.add_argument("--state", metavar="FILE", default=default, help="main state file")
    parser.add_argument(
        "--log-format", choices=("auto", "console", "json", "journal"), default=default
    )
    parser.add_argument("--log-level", choices=LEVELS, default=default)
    parser.add_argument(
        "--debug", action="store_true", default=default, help="show tracebacks and debug logs"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="capkeeper",
        description="Keep declared file capabilities on binaries across deploys.",
    )
    parser.add_argument("--version", action=_Version, help="show the version and exit")
    _common(parser, suppress=False)
    common = _Parser(add_help=False)
    _common(common, suppress=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    apply = sub.add_parser(
        "apply", parents=[common], help="make declared binaries carry exactly their capabilities"
    )
    apply.add_argument("paths", nargs="*", metavar="PATH", help="only these declared binaries")
    apply.add_argument("--json", action="store_true", help="JSON lines on stdout")
    apply.add_argument("--unit", metavar="UNIT", help=doctor.UNIT_HELP)

    check = sub.add_parser("check", parents=[common], help="report drift without changing files")
    check.add_argument("paths", nargs="*", metavar="PATH")
    check.add_argument("--json", action="store_true", help="JSON lines on stdout")

    show = sub.add_parser("show", parents=[common], help="print capabilities like getcap")
    show.add_argument("paths", nargs="+", metavar="PATH")
    show.add_argument("-v", "--verbose", action="store_true", help="add xattr revision and rootid")
    show.add_argument("--json", action="store_true", help="JSON lines on stdout")

    validate = sub.add_parser(
        "validate", parents=[common], help="check the state and the trust of declared files"
    )
    validate.add_argument("--json", action="store_true", help="JSON lines on stdout")

    status = sub.add_parser("status", parents=[common], help="show what the running daemon reports")
    status.add_argument("--status-file", metavar="FILE", help="default /run/capkeeper/status.json")
    status.add_argument("--json", action="store_true", help="print the raw JSON snapshot")

    dropin = sub.add_parser(
        "systemd-dropin",
        parents=[common],
        help="write the ReadWritePaths= drop-in that lets the service write declared directories",
    )
    dropin.add_argument("--output", metavar="FILE", help=f"default {DROPIN}; '-' for stdout")
    dropin.add_argument(
        "--check", action="store_true", help="exit 1 when the drop-in is missing or out of date"
    )

    watch = sub.add_parser(
        "watch", parents=[common], help="run the daemon: restore capabilities as deploys drop them"
    )
    watch.add_argument(
        "--rescan-interval",
        type=option_type("rescan_interval"),
        metavar="SECONDS",
        help="seconds between full rescans (default 300; catches changes inotify cannot see)",
    )
    watch.add_argument(
        "--settle-time",
        type=option_type("settle_time"),
        metavar="SECONDS",
        help="how long a write may pause before the file is checked anyway (default 0.25)",
    )
    watch.add_argument("--status-file", metavar="FILE", help="default /run/capkeeper/status.json")
    watch.add_argument(
        "--metrics-file", metavar="FILE", help="also write a Prometheus textfile (node_exporter)"
    )

    audit.add_arguments(
        sub.add_parser("audit", parents=[common], help=audit.HELP, description=audit.DESCRIPTION)
    )
    adopt.add_arguments(
        sub.add_parser("adopt", parents=[common], help=adopt.HELP, description=adopt.DESCRIPTION)
    )
    doctor.add_arguments(
        sub.add_parser("doctor", parents=[common], help=doctor.HELP, description=doctor.DESCRIPTION)
    )
    return parser


def _settings(args: argparse.Namespace) -> Settings:
    overrides: dict[str, Any] = {}
    state = getattr(args, "state", None)
    if state == "":  # not "the default": an unset variable in a unit file expands to ""
        raise UsageError("--state: empty path (name the state file)")
    if state is not None:
        overrides["state"] = state
    if getattr(args, "log_format", None):
        overrides["log_format"] = args.log_format
    if getattr(args, "log_level", None):
        overrides["log_level"] = args.log_level
    for key in ("rescan_interval", "settle_time", "status_file", "metrics_file"):
        if getattr(args, key, None) is not None:  # only some commands have these options
            overrides[key] = getattr(args, key)
    return load_settings(overrides)


def _emit(out: TextIO, as_json: bool, record: dict[str, Any], human: str) -> None:
    out.write((json.dumps(record) if as_json else printable(human)) + "\n")


def _outcome_line(outcome: Outcome) -> str:
    entry = outcome.entry
    label = f"{outcome.status:<9} {entry.path}"
    if outcome.status is Status.IN_SYNC:
        return f"{label}  {outcome.expected}"
    if outcome.status in (Status.RESTORED, Status.DRIFT):
        extra = " (possible tampering: extra capabilities)" if outcome.extra else ""
        return f"{label}  found {outcome.found}, expected {outcome.expected}{extra}"
    return f"{label}  {outcome.reason}"


def _summary(outcomes: Sequence[Outcome]) -> str:
    counts: dict[Status, int] = {}
    for outcome in outcomes:
        counts[outcome.status] = counts.get(outcome.status, 0) + 1
    parts = [f"{n} {status}" for status, n in counts.items()]
    return f"{len(outcomes)} declared: " + (", ".join(parts) if parts else "nothing to do")


def _run_entries(
    args: argparse.Namespace, state: State, out: TextIO, *, write: bool, log_events: bool
) -> ExitStatus:
    entries = state.select(args.paths) if args.paths else state.entries
    logger = get_logger()
    outcomes = []
    for entry in entries:
        outcome = reconcile(entry, write=write)
        outcomes.append(outcome)
        if log_events:
            log_outcome(logger, outcome, cause="apply" if write else "check")
        _emit(out, args.json, outcome.fields(), _outcome_line(outcome))
    if not args.json:
        out.write(_summary(outcomes) + "\n")
    if any(o.status in (Status.REFUSED, Status.FAILED, Status.MISSING) for o in outcomes):
        return ExitStatus.FAILED
    if any(o.status is Status.DRIFT for o in outcomes):
        return ExitStatus.DRIFT
    return ExitStatus.OK


def cmd_apply(args: argparse.Namespace, settings: Settings, out: TextIO) -> ExitStatus:
    state = load_state(settings.state)
    if args.unit:  # ExecStartPre= mode: warnings only, the exit status stays apply's
        doctor.preflight(args.unit, state, args.paths, out, log_events=args.log_events)
    return _run_entries(args, state, out, write=True, log_events=args.log_events)


def cmd_check(args: argparse.Namespace, settings: Settings, out: TextIO) -> ExitStatus:
    state = load_state(settings.state)
    return _run_entries(args, state, out, write=False, log_events=args.log_events)


def cmd_show(args: argparse.Namespace, settings: Settings, out: TextIO) -> ExitStatus:
    status = ExitStatus.OK
    for path in args.paths:
        try:
            caps, raw = read_path_caps(path)
        except CapkeeperError as exc:
            sys.stderr.write(f"capkeeper: {printable(str(exc))}\n")
            status = ExitStatus.FAILED
            continue
        if caps is None or raw is None:
            if args.json:
                _emit(out, True, {"path": path, "caps": None}, "")
            elif args.verbose:
                out.write(f"{printable(path)} (no capabilities)\n")
            continue
        text = format_text(caps)
        revision = int(decode_revision(raw))
        record = {
            "path": path,
            "caps": text,
            "revision": revision,
            "rootid": caps.rootid,
            "effective": caps.effective,
            "permitted": caps.permitted,
            "inheritable": caps.inheritable,
        }
        human = f"{path} {text}"
        if args.verbose:
            human += f" [v{revision}" + (f" rootid={caps.rootid}]" if revision == 3 else "]")
        _emit(out, args.json, record, human)
    return status


def cmd_validate(args: argparse.Namespace, settings: Settings, out: TextIO) -> ExitStatus:
    state = load_state(settings.state)
    problems = 0

    def report(where: str, kind: str, message: str, rule: str | None = None) -> None:
        record = {"entry": where, "kind": kind, "message": message}
        if rule:
            record["rule"] = rule
        prefix = f"{kind}: " if kind in ("note", "warning") else ""
        _emit(out, args.json, record, f"{where}: {prefix}{message}")

    same_file: dict[tuple[int, int], list[Entry]] = {}
    for entry in state.entries:
        where = f"{entry.source} ({entry.path})"
        try:
            observation = observe(entry.path, hash=entry.sha256 is not None)
        except FileAccessError as exc:
            if exc.errno == errno.ENOENT:
                report(where, "note", "not present yet (enforced when it appears)")
            else:
                problems += 1
                report(where, "problem", str(exc))
            continue
        same_file.setdefault((observation.dev, observation.ino), []).append(entry)
        if not observation.xattr_supported:
            problems += 1
            report(where, "problem", f"{observation.resolved}: {NO_XATTR}", "xattr")
        if entry.owner_uid != 0:
            report(
                where,
                "warning",
                f"owner {entry.owner} can rewrite this binary through a shared mmap without "
                f"losing its capabilities: that user effectively holds {entry.caps_text}",
            )
        refusals = assess(entry, observation, last_cap=cap_last_cap())
        for refusal in refusals:
            problems += 1
            report(where, "problem", str(refusal), refusal.rule)
        exposed = exposed_directory(observation)
        if exposed is not None and not any(r.rule.startswith("directory") for r in refusals):
            report(where, "warning", f"{flood_warning(exposed)} ({FLOOD_HINT})", "flood")
    # Two declared paths naming one file (a hard link, a symlink) with different
    # capabilities would be restored back and forth forever.
    for aliases in same_file.values():
        if len({entry.caps for entry in aliases}) > 1:
            problems += 1
            first, *others = aliases
            names = ", ".join(f"{e.path} ({e.caps_text})" for e in others)
            report(
                f"{first.source} ({first.path})",
                "problem",
                f"is the same file as {names} but declares {first.caps_text}; "
                "declare one set for it",
                "alias",
            )
    if not args.json:
        files = ", ".join(str(f) for f in state.files)
        verdict = "no problems" if not problems else f"{problems} problem(s)"
        out.write(printable(f"{len(state.entries)} declared binaries in {files}: {verdict}") + "\n")
    return ExitStatus.FAILED if problems else ExitStatus.OK


def cmd_systemd_dropin(args: argparse.Namespace, settings: Settings, out: TextIO) -> ExitStatus:
    state = load_state(settings.state)
    refusals = dropin_refusals(state)
    if refusals:  # nothing is written, and --check cannot say "up to date" either
        for refusal in refusals:
            sys.stderr.write(f"capkeeper: error: {printable(refusal)}\n")
        return ExitStatus.FAILED
    text = dropin_text(state)
    for entry in state.entries:
        if entry.path.startswith(HIDDEN_FROM_SERVICE):
            sys.stderr.write(
                f"capkeeper: warning: {printable(entry.path)} is hidden from the service "
                "(PrivateTmp=/ProtectHome= in capkeeper.service); keep managed binaries "
                "elsewhere\n"
            )
    if args.output == "-":
        out.write(text)
        return ExitStatus.OK
    target = Path(args.output) if args.output else DROPIN
    current = target.read_text() if target.is_file() else None
    if args.check:
        verdict = "up to date" if current == text else "out of date"
        out.write(f"{printable(str(target))}: {verdict}\n")
        return ExitStatus.OK if current == text else ExitStatus.DRIFT
    if current == text:
        out.write(f"{printable(str(target))}: already up to date\n")
        return ExitStatus.OK
    write_atomically(target, text)
    out.write(
        f"wrote {printable(str(target))}; now run: systemctl daemon-reload && "
        "systemctl restart capkeeper\n"
    )
    return ExitStatus.OK


def cmd_status(args: argparse.Namespace, settings: Settings, out: TextIO) -> ExitStatus:
    # Only here: the status file's parser loads pydantic, which no other command needs.
    from capkeeper.status import StatusFileError, parse_status, read_status  # noqa: PLC0415
    from capkeeper.status import render as render_status  # noqa: PLC0415

    path = Path(args.status_file) if args.status_file else settings.status_file
    try:
        data = read_status(path)
        snapshot = parse_status(data)
    except FileNotFoundError:
        raise CapkeeperError(
            "no status file: the daemon is not running or writes it elsewhere",
            context=str(path),
            hint="systemctl status capkeeper; or pass --status-file",
        ) from None
    except OSError as exc:
        raise CapkeeperError(f"cannot read the status file: {exc}", context=str(path)) from exc
    except StatusFileError as exc:
        raise CapkeeperError(f"not a capkeeper status file: {exc}", context=str(path)) from None
    out.write(json.dumps(data, indent=1) + "\n" if args.json else render_status(snapshot))
    return ExitStatus.OK if snapshot.healthy else ExitStatus.FAILED


def cmd_watch(args: argparse.Namespace, settings: Settings, out: TextIO) -> ExitStatus:
    from capkeeper.daemon import watch  # noqa: PLC0415 - only the daemon needs pyinotify

    return ExitStatus(watch(settings))  # its options are in settings (_settings)


COMMANDS: dict[str, Callable[[argparse.Namespace, Settings, TextIO], ExitStatus]] = {
    "apply": cmd_apply,
    "check": cmd_check,
    "show": cmd_show,
    "validate": cmd_validate,
    "systemd-dropin": cmd_systemd_dropin,
    "status": cmd_status,
    "audit": audit.cmd_audit,
    "adopt": adopt.cmd_adopt,
    "doctor": doctor.cmd_doctor,
    "watch": cmd_watch,
}


def _report(exc: CapkeeperError, err: TextIO) -> None:
    if isinstance(exc, StateError):
        err.write(f"capkeeper: {exc.message}\n")
        return
    err.write(f"capkeeper: error: {printable(str(exc))}\n")


def main(argv: Sequence[str] | None = None, *, out: TextIO | None = None) -> int:
    """Run capkeeper; return the exit status (never raises for user mistakes)."""
    stdout = out if out is not None else sys.stdout
    stderr = sys.stderr
    debug = False
    try:
        args = build_parser().parse_args(argv)
        if args.command != "watch":  # capkeeper.__main__ held them back for the daemon
            signal.pthread_sigmask(
                signal.SIG_UNBLOCK, (signal.SIGHUP, signal.SIGTERM, signal.SIGINT)
            )
        debug = bool(getattr(args, "debug", False))
        settings = _settings(args)
        level = "debug" if debug else (settings.log_level or "info")
        concrete = configure(settings.log_format, level)
        # One-shot commands report on stdout; their events also go to the log when
        # it is the journal (ExecStartPre= mode) or when a log level was asked for.
        args.log_events = concrete == "journal" or settings.log_level is not None or debug
        return int(COMMANDS[args.command](args, settings, stdout))
    except SystemExit as exc:  # --help and --version
        return exc.code if isinstance(exc.code, int) else int(ExitStatus.USAGE)
    except UsageError as exc:
        _report(exc, stderr)
        return int(ExitStatus.USAGE)
    except StateError as exc:
        _report(exc, stderr)
        return int(ExitStatus.CONFIG)
    except SettingsError as exc:
        _report(exc, stderr)
        return int(ExitStatus.CONFIG)
    except CapkeeperError as exc:
        if debug:
            raise
        _report(exc, stderr)
        return int(ExitStatus.FAILED)
    except KeyboardInterrupt:
        stderr.write("capkeeper: interrupted\n")
        return int(ExitStatus.INTERRUPTED)
    except OSError as exc:
        if isinstance(exc, BrokenPipeError):
            # Our reader went away (e.g. "| head"); silence the interpreter's flush error.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            return int(ExitStatus.FAILED)
        if debug:
            raise
        stderr.write(f"capkeeper: error: {printable(str(exc))}\n")
        return int(ExitStatus.FAILED)
    except Exception as exc:
        if debug:
            raise
        stderr.write(
            f"capkeeper: internal error: {exc.__class__.__name__}: {printable(str(exc))} "
            "(run with --debug for a traceback, and please report it)\n"
        )
        return int(ExitStatus.FAILED)
