"""Settings: one merge (defaults < settings file < CAPKEEPER_* < options), every value
checked by its field's one rule, and a settings file held to the state's trust rules."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path, PurePosixPath

import pytest
from hypothesis import given
from hypothesis import strategies as st

from capkeeper.cli import ExitStatus, main
from capkeeper.errors import SettingsError
from capkeeper.settings import RULES, SETTINGS_FILE_VARIABLE, Settings, load_settings, pure_path
from tests.conftest import make_binary, setcap

OTHER = 4242  # a uid that is not root (no passwd entry needed)
FILE_TEXT = (
    'state = "/from/file.toml"\nlog_level = "warning"\nrescan_interval = 60\n'
    'settle_time = 1.5\nlog_format = "json"\n'
)


def _file(path: Path, text: str, mode: int = 0o644) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    os.chmod(path, mode)
    return path


def _load(settings_file: Path, overrides: dict[str, object] | None = None, **env: str) -> Settings:
    return load_settings(overrides, environ={SETTINGS_FILE_VARIABLE: str(settings_file), **env})


def _error(settings_file: Path, overrides: dict[str, object] | None = None, **env: str) -> str:
    with pytest.raises(SettingsError) as info:
        _load(settings_file, overrides, **env)
    return str(info.value)


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    out = io.StringIO()
    code = main(["--log-format", "console", *argv], out=out)
    return code, out.getvalue(), capsys.readouterr().err


def test_defaults_without_a_settings_file(tmp_path: Path) -> None:
    """No settings file, no variable, no option: every field has its default."""
    settings = _load(tmp_path / "absent.toml")
    assert settings == Settings()
    assert list(Settings._fields) == list(RULES)
    assert all(getattr(settings, name) == Settings._field_defaults[name] for name in RULES)
    assert settings.state == "/etc/capkeeper/state.toml"
    assert settings.log_level is None


def test_file_then_environment_then_options(tmp_path: Path) -> None:
    """Each source overrides the one before it, field by field."""
    path = _file(tmp_path / "settings.toml", FILE_TEXT)
    from_file = _load(path)
    assert (from_file.state, from_file.log_level, from_file.rescan_interval) == (
        "/from/file.toml",
        "warning",
        60.0,
    )
    assert (from_file.settle_time, from_file.log_format) == (1.5, "json")
    from_env = _load(path, CAPKEEPER_STATE="/from/env.toml", CAPKEEPER_LOG_LEVEL="ERROR")
    assert (from_env.state, from_env.log_level, from_env.rescan_interval) == (
        "/from/env.toml",
        "error",
        60.0,
    )
    from_cli = _load(
        path,
        {"state": "/from/cli.toml", "log_level": None, "rescan_interval": 5.0},
        CAPKEEPER_STATE="/from/env.toml",
        CAPKEEPER_LOG_LEVEL="error",
    )
    assert (from_cli.state, from_cli.log_level, from_cli.rescan_interval) == (
        "/from/cli.toml",
        "error",  # an option not given (None) leaves the variable's value
        5.0,
    )


def test_every_source_is_checked_by_the_same_rule(tmp_path: Path) -> None:
    """A bad value names where it came from: the variable, the file's key, the option."""
    absent = tmp_path / "absent.toml"
    rule = "must be one of debug, info, warning, error, critical, got 'bogus'"
    assert _error(absent, CAPKEEPER_LOG_LEVEL="bogus") == (
        f"invalid setting: CAPKEEPER_LOG_LEVEL: {rule}"
    )
    path = _file(tmp_path / "settings.toml", 'log_level = "bogus"\n')
    assert _error(path) == f"invalid setting: {path}: log_level: {rule}"
    assert _error(absent, {"log_level": "bogus"}) == f"invalid setting: --log-level: {rule}"
    with pytest.raises(SettingsError, match=f"invalid setting: log_level: {rule}"):
        Settings(log_level="bogus")
    # Every problem at once, on one line.
    message = _error(absent, {"rescan_interval": 0.5}, CAPKEEPER_SETTLE_TIME="nan")
    assert message == (
        "invalid setting: --rescan-interval: must be a number of seconds from 1 to 86400, got "
        "0.5; CAPKEEPER_SETTLE_TIME: must be a number of seconds from 0 to 60, got 'nan'"
    )
    assert "\n" not in message


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("rescan_interval = true\n", "rescan_interval: must be a number of seconds from 1 to "
         "86400, got True"),
        ('log_format = "xml"\n', "log_format: must be one of auto, console, json, journal, "
         "got 'xml'"),
        ('state = ""\n', "state: must not be empty (name the state file, or unset it)"),
        ('status_file = "a\\u0000b"\n', "status_file: must not contain a NUL character"),
        ("metrics_file = 3\n", "metrics_file: must be a path, got 3"),
    ],
)  # fmt: skip
def test_file_values_are_checked(tmp_path: Path, text: str, problem: str) -> None:
    """A settings file value of the wrong type or out of range is refused, never converted."""
    path = _file(tmp_path / "settings.toml", text)
    assert _error(path) == f"invalid setting: {path}: {problem}"


def test_unknown_keys_and_bad_toml_in_the_file(tmp_path: Path) -> None:
    """Unknown keys are named (a typo must not be ignored); invalid TOML is one line."""
    path = _file(tmp_path / "settings.toml", 'statee = "/x"\n[watch]\nrescan = 1\n')
    assert _error(path) == (
        f"invalid settings file: {path}: unknown keys 'statee', 'watch' (known: state, "
        "rescan_interval, settle_time, log_format, log_level, status_file, metrics_file, "
        "cache_directory)"
    )
    _file(path, "state = \n")
    assert _error(path).startswith(f"invalid settings file: {path}: Invalid value (at line 1")


def test_empty_settings_file_variable(tmp_path: Path) -> None:
    """An empty CAPKEEPER_SETTINGS_FILE (an unset unit variable) is an error, not the default."""
    with pytest.raises(SettingsError) as info:
        load_settings(environ={SETTINGS_FILE_VARIABLE: ""})
    assert str(info.value) == (
        "invalid setting: CAPKEEPER_SETTINGS_FILE: must not be empty (name the settings file, "
        "or unset it)"
    )


def test_settings_file_writable_by_others_is_refused(tmp_path: Path) -> None:
    """Whoever can write the settings file could point capkeeper at their own state: a
    file writable by group or others, owned by another user, or below a directory
    another user owns is refused, and what it holds is never read."""
    path = _file(tmp_path / "etc" / "settings.toml", "[[not toml\n", mode=0o666)
    assert _error(path) == (
        "settings file refused: settings.toml: writable by group or others (mode 0666): "
        "whoever can edit the settings can point capkeeper at another state "
        f"(chmod go-w {path})"
    )
    os.chmod(path, 0o644)
    os.chown(path, OTHER, OTHER)
    assert _error(path) == (
        f"settings file refused: settings.toml: owned by uid {OTHER}: whoever can edit the "
        f"settings can point capkeeper at another state (chown root {path})"
    )
    os.chown(path, 0, 0)
    os.chown(path.parent, OTHER, OTHER)
    assert _error(path) == (
        f"settings file refused: directory {path.parent} is owned by uid {OTHER}, not by "
        "root: whoever can edit the settings can point capkeeper at another state "
        f"(chown root {path.parent})"
    )


def test_dangling_settings_symlink_is_an_error(tmp_path: Path) -> None:
    """A settings file that is a symlink to nothing is refused, not taken as absent."""
    link = tmp_path / "settings.toml"
    link.symlink_to(tmp_path / "gone.toml")
    assert _error(link) == (
        f"settings file refused: {link}: dangling symlink to {tmp_path / 'gone.toml'}: not read"
    )


@pytest.fixture
def state(tree: Path) -> Path:
    make_binary(tree / "ping")
    setcap("cap_net_raw=ep", tree / "ping")
    main_file = tree / "state.toml"
    main_file.write_text(f'[[binary]]\npath = "{tree}/ping"\ncaps = "cap_net_raw=ep"\n')
    return main_file


def test_cli_reads_the_state_named_by_the_settings_file(
    state: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The CLI merges through load_settings: the file names the state, an option wins."""
    settings_file = _file(state.parent / "settings.toml", f'state = "{state}"\n')
    monkeypatch.setenv(SETTINGS_FILE_VARIABLE, str(settings_file))
    code, out, err = _run(["check"], capsys)
    assert (code, err) == (ExitStatus.OK, "")
    assert out.splitlines()[-1] == "1 declared: 1 in-sync"
    code, _, err = _run(["check", "--state", str(state.parent / "other.toml")], capsys)
    assert code == ExitStatus.CONFIG
    assert "other.toml: not found" in err


def test_cli_refuses_an_untrusted_settings_file(
    state: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An untrusted settings file stops every command with exit 78, one line, even when
    the state is given on the command line."""
    settings_file = _file(state.parent / "settings.toml", f'state = "{state}"\n', mode=0o646)
    monkeypatch.setenv(SETTINGS_FILE_VARIABLE, str(settings_file))
    code, out, err = _run(["apply", "--state", str(state)], capsys)
    assert (code, out) == (ExitStatus.CONFIG, "")
    assert err.startswith("capkeeper: error: settings file refused: settings.toml: writable ")
    assert err.count("\n") == 1


def test_bogus_log_level_is_one_line_and_exit_78(tmp_path: Path) -> None:
    """CAPKEEPER_LOG_LEVEL=bogus capkeeper check: one line on stderr, exit 78 (it was
    "internal error: KeyError: 'BOGUS'" and exit 2)."""
    env = {
        **os.environ,
        "CAPKEEPER_LOG_LEVEL": "bogus",
        SETTINGS_FILE_VARIABLE: str(tmp_path / "absent.toml"),
    }
    result = subprocess.run(
        [sys.executable, "-m", "capkeeper", "check", "--state", str(tmp_path / "s.toml")],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert result.returncode == ExitStatus.CONFIG
    assert result.stdout == ""
    assert result.stderr == (
        "capkeeper: error: invalid setting: CAPKEEPER_LOG_LEVEL: must be one of debug, info, "
        "warning, error, critical, got 'bogus'\n"
    )


_SOURCES: list[tuple[str, dict[str, object], dict[str, str]]] = [
    (FILE_TEXT, {}, {}),
    (FILE_TEXT, {}, {"CAPKEEPER_STATE": "/from/env.toml", "CAPKEEPER_LOG_LEVEL": "ERROR"}),
    (FILE_TEXT, {"state": "/from/cli.toml", "log_level": None, "rescan_interval": 5.0}, {}),
    ("", {}, {"CAPKEEPER_CACHE_DIRECTORY": "/var/cache/other", "CAPKEEPER_METRICS_FILE": "/m"}),
    ("", {}, {"CAPKEEPER_LOG_LEVEL": "bogus"}),
    ('log_level = "bogus"\n', {}, {}),
    ("", {"rescan_interval": 0.5}, {"CAPKEEPER_SETTLE_TIME": "nan"}),
    ("rescan_interval = true\nmetrics_file = 3\n", {"settle_time": 1.0}, {}),
    ('status_file = "a\\u0000b"\n', {}, {"CAPKEEPER_STATE": ""}),
    ('state = "/caf\\u00e9\\udcff"\n', {}, {"CAPKEEPER_LOG_FORMAT": "xml\udcff"}),
]


def _outcome(
    path: Path, overrides: dict[str, object], env: dict[str, str], isolate: bool
) -> object:
    environ = {SETTINGS_FILE_VARIABLE: str(path), **env}
    try:
        return load_settings(overrides, environ=environ, isolate=isolate)
    except SettingsError as exc:
        return ("SettingsError", str(exc))


@pytest.mark.parametrize(("text", "overrides", "env"), _SOURCES)
def test_isolated_check_gives_the_same_settings_and_errors(
    tmp_path: Path, text: str, overrides: dict[str, object], env: dict[str, str]
) -> None:
    """The daemon's check in a child process gives what the in-process one gives: the
    same values, or the same one-line error."""
    path = _file(tmp_path / "settings.toml", text)
    expected = _outcome(path, overrides, env, isolate=False)
    assert _outcome(path, overrides, env, isolate=True) == expected


def test_isolated_check_without_a_child_checks_here(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No child (fork fails) or a child that dies: the check is made in this process."""
    path = _file(tmp_path / "settings.toml", FILE_TEXT)
    expected = _outcome(path, {}, {"CAPKEEPER_LOG_LEVEL": "bogus"}, isolate=False)

    def failing() -> int:
        raise OSError(11, "Resource temporarily unavailable")

    with monkeypatch.context() as patch:
        patch.setattr(os, "fork", failing)
        assert _outcome(path, {}, {"CAPKEEPER_LOG_LEVEL": "bogus"}, isolate=True) == expected
    with monkeypatch.context() as patch:  # the child exits at once, answering nothing
        patch.setattr(
            "capkeeper.settings._validate_with_pydantic_settings", _exit_in_child(os.getpid())
        )
        with pytest.raises(SettingsError, match="CAPKEEPER_LOG_LEVEL: must be one of"):
            load_settings(
                {},
                environ={SETTINGS_FILE_VARIABLE: str(path), "CAPKEEPER_LOG_LEVEL": "bogus"},
                isolate=True,
            )


def _exit_in_child(parent: int) -> object:
    from capkeeper.settings import _validate_with_pydantic_settings as real

    def validate(*args: object) -> object:
        if os.getpid() != parent:
            os._exit(3)
        return real(*args)  # type: ignore[arg-type]

    return validate


WATCH_MODULES = """
import sys
import capkeeper.daemon
capkeeper.daemon.watch = lambda settings: print(
    settings.cache_directory, sorted(m for m in sys.modules if m.startswith("pydantic"))
) or 0
from capkeeper.cli import main
sys.exit(main(["watch", "--state", sys.argv[1]]))
"""


def test_watch_never_imports_pydantic(tmp_path: Path) -> None:
    """``capkeeper watch`` with ``CAPKEEPER_*`` variables and a settings file: checked by
    pydantic-settings, in a child; the daemon's own heap never holds pydantic (~19 MB)."""
    path = _file(tmp_path / "settings.toml", "rescan_interval = 60\n")
    env = {
        **os.environ,
        SETTINGS_FILE_VARIABLE: str(path),
        "CAPKEEPER_CACHE_DIRECTORY": str(tmp_path / "cache"),
    }
    result = subprocess.run(
        [sys.executable, "-c", WATCH_MODULES, str(tmp_path / "state.toml")],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{tmp_path / 'cache'} []\n"
    env["CAPKEEPER_LOG_LEVEL"] = "bogus"
    result = subprocess.run(
        [sys.executable, "-c", WATCH_MODULES, str(tmp_path / "state.toml")],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == ExitStatus.CONFIG
    assert "invalid setting: CAPKEEPER_LOG_LEVEL: must be one of" in result.stderr
    assert result.stdout == ""


def test_replace_and_make_check_like_the_constructor() -> None:
    """Settings built by _replace or _make pass every rule, as Settings() does."""
    assert Settings()._replace(rescan_interval="60").rescan_interval == 60.0
    with pytest.raises(SettingsError, match="rescan_interval"):
        Settings()._replace(rescan_interval=-5.0)
    assert Settings._make(Settings()) == Settings()
    with pytest.raises(SettingsError, match="log_format"):
        Settings._make([*Settings()[:3], "bogus", *Settings()[4:]])


@given(st.text(alphabet="/.a\\ ", max_size=12))
def test_a_path_setting_is_spelt_as_pathlib_spells_it(text: str) -> None:
    """Path settings are kept as text, normalised as ``pathlib.PurePosixPath`` does: a
    value, and every message naming it, reads as it did when the settings held Paths."""
    assert pure_path(text) == str(PurePosixPath(text))


@pytest.mark.parametrize(
    ("name", "given", "kept"),
    [
        ("state", "/etc//capkeeper/./state.toml/", "/etc/capkeeper/state.toml"),
        ("status_file", Path("/run/x/../status.json"), "/run/x/../status.json"),
        ("cache_directory", "//var/cache/", "//var/cache"),
        ("metrics_file", "m.prom", "m.prom"),
    ],
)
def test_a_path_setting_is_kept_as_text(name: str, given: object, kept: str) -> None:
    """A path setting, given as text or as a Path, is kept as text (type and spelling)."""
    value = getattr(Settings()._replace(**{name: given}), name)
    assert (type(value), value) == (str, kept)
