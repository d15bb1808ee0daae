"""The Prometheus alert rules in ``packaging/prometheus/``, checked by the real promtool.

promtool comes from Debian's ``prometheus`` package, unpacked into
``.cache/prometheus`` by ``make promtool`` (installing the package would add a
prometheus.service to every sandbox booted on this host).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from capkeeper.capabilities import format_text, parse
from capkeeper.enforce import reconcile
from capkeeper.model import Entry
from capkeeper.status import StatusBook, metrics_text
from tests.conftest import make_binary

REPO = Path(__file__).resolve().parents[1]
RULES_DIR = REPO / "packaging" / "prometheus"
RULES = RULES_DIR / "capkeeper.rules.yml"
RULE_TESTS = RULES_DIR / "capkeeper.rules.test.yml"
PROMTOOL = REPO / ".cache" / "prometheus" / "usr" / "bin" / "promtool"


@pytest.fixture(scope="module")
def promtool() -> str:
    if not PROMTOOL.is_file():
        pytest.skip(f"needs promtool at {PROMTOOL} (make promtool)")
    return str(PROMTOOL)


def _run(*argv: str, cwd: Path, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, cwd=cwd, input=stdin, capture_output=True, text=True, timeout=60, check=False
    )


def _alerts(text: str) -> list[str]:
    return re.findall(r"^\s*- alert: (\w+)$", text, re.MULTILINE)


def _book(tree: Path) -> StatusBook:
    """A book with one restored, one refused and one missing entry, as the daemon keeps it."""
    caps = parse("cap_net_raw=ep", last_cap=40)
    text = format_text(caps, last_cap=40)
    good = Entry(path=str(make_binary(tree / "good")), caps=caps, caps_text=text)
    bad = Entry(path=str(make_binary(tree / "bad", mode=0o777)), caps=caps, caps_text=text)
    gone = Entry(path=str(tree / "gone"), caps=caps, caps_text=text)
    book = StatusBook(rescan_interval=300.0)
    book.load({e.path: e.caps_text for e in (good, bad, gone)}, ["state.toml"])
    for entry in (good, bad, gone):
        book.record(reconcile(entry, write=True), cause="startup", now=100.0)
    return book


def test_rules_pass_promtool_check(promtool: str) -> None:
    """promtool check rules accepts the file and counts every alert."""
    result = _run(promtool, "check", "rules", RULES.name, cwd=RULES_DIR)
    assert result.returncode == 0, result.stdout + result.stderr
    alerts = _alerts(RULES.read_text())
    assert alerts == [
        "CapkeeperBinaryOutOfSync",
        "CapkeeperRestoresUnusuallyOften",
        "CapkeeperRestoreRefused",
        "CapkeeperMetricsStale",
    ]
    assert f"SUCCESS: {len(alerts)} rules found" in result.stdout


def test_rule_unit_tests_pass(promtool: str) -> None:
    """promtool test rules: every expected alert fires with its labels and summary, no other."""
    result = _run(promtool, "test", "rules", RULE_TESTS.name, cwd=RULES_DIR)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_has_a_firing_and_a_silent_case() -> None:
    """Each alert is evaluated at least once expecting no alert, and once expecting some."""
    evaluations = re.split(r"^\s*- eval_time: ", RULE_TESTS.read_text(), flags=re.MULTILINE)[1:]
    silent: set[str] = set()
    firing: set[str] = set()
    for block in evaluations:
        name = re.search(r"alertname: (\w+)", block)
        assert name is not None, block
        if re.search(r"exp_alerts: \[\]", block):
            silent.add(name.group(1))
        elif "exp_labels:" in block:
            firing.add(name.group(1))
    alerts = set(_alerts(RULES.read_text()))
    assert silent >= alerts, f"no silent case for {sorted(alerts - silent)}"
    assert firing >= alerts, f"no firing case for {sorted(alerts - firing)}"


@pytest.mark.parametrize("alert", _alerts(RULES.read_text()))
def test_unit_tests_fail_when_an_alert_never_fires(
    promtool: str, tmp_path: Path, alert: str
) -> None:
    """Mutation check: with the alert's expression made empty, promtool test rules fails."""
    text = RULES.read_text()
    start = text.index(f"- alert: {alert}\n")
    expr = re.compile(r"expr: (\|\n(?:\s{10}.*\n)+|.*\n)")
    match = expr.search(text, start)
    assert match is not None
    mutated = text[: match.start()] + "expr: vector(1) == 2\n" + text[match.end() :]
    shutil.copy(RULE_TESTS, tmp_path / RULE_TESTS.name)
    (tmp_path / RULES.name).write_text(mutated)
    assert _run(promtool, "check", "rules", RULES.name, cwd=tmp_path).returncode == 0
    result = _run(promtool, "test", "rules", RULE_TESTS.name, cwd=tmp_path)
    assert result.returncode != 0
    assert f"alertname: {alert}" in result.stdout + result.stderr


def test_rules_use_only_metrics_the_daemon_writes(tree: Path) -> None:
    """Every capkeeper_* name in the rules is in the textfile the daemon writes."""
    written = set(re.findall(r"^(capkeeper_\w+)[{ ]", metrics_text(_book(tree)), re.MULTILINE))
    used = set(re.findall(r"\b(capkeeper_\w+)", RULES.read_text()))
    assert used <= written, f"not written by capkeeper: {sorted(used - written)}"


def test_metrics_textfile_passes_promtool_lint(promtool: str, tree: Path) -> None:
    """promtool check metrics finds nothing wrong with the daemon's textfile."""
    text = metrics_text(_book(tree), now=1_700_000_000.0)
    result = _run(promtool, "check", "metrics", cwd=tree, stdin=text)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (result.stdout + result.stderr).strip() == ""
