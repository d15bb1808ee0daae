"""Generate the manual pages capkeeper(8) and capkeeper-state(5) from the code.

``capkeeper(8)``: the commands and their options come from the argparse parser
(argparse-manpage), EXIT STATUS from ``ExitStatus`` and ENVIRONMENT from
``Settings``; the prose is hand-written in ``man/capkeeper.8.include``.
``capkeeper-state(5)``: ``man/capkeeper-state.5.in`` with its KEYS section made
from the ``[[binary]]`` model. The date is the newest entry of the Debian
changelog, so a page only changes when the code or the text does.

Usage: ``python packaging/manpages.py [OUTDIR]`` (default ``man/``; ``make man``).
"""

from __future__ import annotations

import email.utils
import re
import sys
import tomllib
from pathlib import Path
from typing import Any

from argparse_manpage.manpage import Manpage

from capkeeper.cli import ExitStatus, build_parser
from capkeeper.settings import Settings
from capkeeper.state import TABLE_KEYS, _BinaryTable

REPO = Path(__file__).resolve().parents[1]
MAN = REPO / "man"

EXIT_STATUS = {
    "OK": "Success: everything is in sync (or was done).",
    "DRIFT": "check, audit, doctor: drift or problems found; "
    "systemd-dropin --check: the drop-in is out of date.",
    "FAILED": "Some binary was refused, is missing or could not be written, "
    "or the command could not do its job (the message says why).",
    "USAGE": "Bad command line (EX_USAGE).",
    "CONFIG": "Invalid state or settings (EX_CONFIG); nothing was changed.",
    "INTERRUPTED": "Interrupted (SIGINT, Ctrl-C) in a one-shot command.",
}

SETTINGS = {
    "state": "The main state file (default /etc/capkeeper/state.toml); --state overrides it.",
    "rescan_interval": "Seconds between the daemon's full rescans (default 300), which catch "
    "changes that raise no inotify event.",
    "settle_time": "Seconds a file may stay open for writing before the daemon checks it anyway "
    "(default 0.25).",
    "log_format": "auto, console, json or journal (default auto: the journal when stderr is "
    "connected to it, readable lines on a terminal, JSON lines otherwise).",
    "log_level": "debug, info, warning, error or critical.",
    "status_file": "Where the daemon writes, and capkeeper status reads, its status "
    "(default /run/capkeeper/status.json).",
    "metrics_file": "Also write a Prometheus textfile there (node_exporter).",
    "cache_directory": "Where the daemon keeps what it can rebuild but would rather not at "
    "every start: the validated state and the ELF facts of the declared files (default "
    "/var/cache/capkeeper, created by the unit's CacheDirectory=); apply and check read the "
    "state cache for a state of 64 KiB or more. Used only when it and its "
    "files are owned by root (or the daemon's user) and writable by nobody else; an empty "
    "value disables caching.",
}

KEYS = {
    "path": "Absolute path of the binary It may name a file that does not exist "
    "yet: it gets its capabilities when it appears. Control characters are refused.",
    "caps": "The capabilities, in the libcap text form that setcap(8) takes and getcap(8) "
    'prints, for example "cap_net_bind_service=+ep" or "cap_chown,cap_fowner=p". '
    "The file gets exactly this set: missing capabilities are added, others removed.",
    "sha256": "Hexadecimal SHA-256 of the only content that may get the capabilities; any "
    "other content is refused (and loses capabilities it carries).",
    "owner": "User name or uid that must own the file and may own the directories and "
    "symlinks on its path. capkeeper validate warns about other owners: "
    "that user can rewrite the binary without losing its capabilities.",
    "allow_inheritable": "Allow inheritable capabilities in caps.",
    "allow_interpreter": "Allow capabilities on an interpreter such as python, node or bash "
    "(every script it runs would get them).",
}


SEE_ALSO = (
    ".BR capkeeper\\-state (5),\n.BR capabilities (7),\n.BR setcap (8),\n"
    ".BR getcap (8),\n.BR systemd.exec (5),\n.BR journalctl (1)\n"
)


def escape(text: str) -> str:
    """``text`` as roff body text: backslashes and hyphens escaped, no leading control dot."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "\\&" + text if text.startswith((".", "'")) else text


def changelog_date() -> tuple[str, int]:
    """The date (YYYY-MM-DD) and timestamp of the newest Debian changelog entry."""
    text = (REPO / "packaging" / "debian" / "changelog").read_text()
    match = re.search(r"^ -- .+?>  (.+)$", text, re.MULTILINE)
    if match is None:
        raise SystemExit("packaging/debian/changelog: no trailer line")
    when = email.utils.parsedate_to_datetime(match[1])
    return when.strftime("%Y-%m-%d"), int(when.timestamp())


def version() -> str:
    data = tomllib.loads((REPO / "pyproject.toml").read_text())
    return str(data["project"]["version"])


def _missing(kind: str, names: set[str]) -> None:
    if names:
        raise SystemExit(
            f"packaging/manpages.py: describe the new {kind} {', '.join(sorted(names))}, "
            "then run make man"
        )


def exit_status_section() -> str:
    _missing("exit statuses", {s.name for s in ExitStatus} - EXIT_STATUS.keys())
    return "".join(f".TP\n.B {int(s)}\n{escape(EXIT_STATUS[s.name])}\n" for s in ExitStatus)


def environment_section() -> str:
    fields = Settings.model_fields
    _missing("settings", set(fields) - SETTINGS.keys())
    lines = [f".TP\n.B CAPKEEPER_{name.upper()}\n{escape(SETTINGS[name])}\n" for name in fields]
    lines.append(
        ".TP\n.B CAPKEEPER_SETTINGS_FILE\n"
        + escape("The settings file (default /etc/capkeeper/settings.toml; it may be absent).")
        + "\n"
    )
    lines.append(
        ".PP\nThese override the settings file; command-line options override these. "
        "capkeeper watch also reads "
        "\\fBNOTIFY_SOCKET\\fR, \\fBWATCHDOG_USEC\\fR and \\fBWATCHDOG_PID\\fR "
        "(systemd notifications), and \\fBJOURNAL_STREAM\\fR (is stderr the journal?).\n"
    )
    return "".join(lines)


def _type_name(annotation: Any) -> str:
    text = getattr(annotation, "__name__", None) or str(annotation)
    return {"str": "string", "bool": "boolean", "str | None": "string"}.get(text, text)


def keys_section() -> str:
    _missing("state keys", set(TABLE_KEYS) - KEYS.keys())
    defaults = _BinaryTable._field_defaults
    chunks = []
    for name, (annotation, required, _rule) in TABLE_KEYS.items():
        kind = _type_name(annotation)
        if required:
            head = f".TP\n\\fB{name}\\fR = \\fI{kind}\\fR (required)\n"
        else:
            default = defaults[name]
            shown = "none" if default is None else str(default).lower()
            head = f".TP\n\\fB{name}\\fR = \\fI{kind}\\fR (optional, default {escape(shown)})\n"
        chunks.append(head + escape(KEYS[name]) + "\n")
    return "".join(chunks).rstrip("\n")


def capkeeper_8(date: str) -> str:
    parser = build_parser()
    page = Manpage(
        parser,
        _data={
            "project_name": "capkeeper",
            "version": version(),
            "description": "keep declared file capabilities on binaries",
            "manual_section": "8",
            "manual_title": "System Administration",
            "date": date.replace("-", "\\-"),
            "include": str(MAN / "capkeeper.8.include"),
            "url": "https://github.com/capkeeper/capkeeper",
        },
    )
    # Appended in this order after the include file's sections.
    page.add_section("EXIT STATUS", "=", exit_status_section())
    page.add_section("ENVIRONMENT", "=", environment_section())
    page.add_section("SEE ALSO", "=", SEE_ALSO)
    header = (
        '.\\" Generated from capkeeper/cli.py and man/capkeeper.8.include by\n'
        ".\\\" packaging/manpages.py ('make man'); edit those, not this file.\n"
    )
    return header + str(page).rstrip("\n") + "\n"


def capkeeper_state_5(date: str) -> str:
    text = (MAN / "capkeeper-state.5.in").read_text()
    return (
        text.replace("@DATE@", date.replace("-", "\\-"))
        .replace("@VERSION@", version())
        .replace("@KEYS@", keys_section())
    )


def main(argv: list[str]) -> int:
    out = Path(argv[1]) if len(argv) > 1 else MAN
    out.mkdir(parents=True, exist_ok=True)
    date, _ = changelog_date()
    (out / "capkeeper.8").write_text(capkeeper_8(date))
    (out / "capkeeper-state.5").write_text(capkeeper_state_5(date))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
