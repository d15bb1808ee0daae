"""Runtime settings: ONE :class:`Settings`, merged in ONE place, :func:`load_settings`.

Each setting comes from the first of these that gives it: the command line
(the overrides the CLI passes), the environment (``CAPKEEPER_STATE``, ...), the
settings file, the default. The settings file is TOML with the fields below as
top-level keys, at ``$CAPKEEPER_SETTINGS_FILE`` or
``/etc/capkeeper/settings.toml``; it may be absent. It can name another
state, so it passes the state's own trust rules (root-owned route, not
writable by group or others, read from the checked descriptor:
:func:`capkeeper.state.read_trusted_file`) or nothing is run.

Every value from every source goes through the one rule of its field
(:data:`RULES`); any invalid value is a :class:`~capkeeper.errors.SettingsError`
naming where it came from, on one line (exit 78).

pydantic-settings (the design card's tool) merges and validates the sources
whenever a source besides the command line is present: a settings file or a
``CAPKEEPER_*`` variable (the daemon's unit sets them). Its field validators are
the rules of :data:`RULES`, so no rule is written twice. The daemon has it check
them in a short-lived child process, so its own heap never holds pydantic. A one-shot command with
neither, e.g. ``ExecStartPre=+capkeeper apply ...`` in another service's unit
(which does not carry capkeeper's environment), checks its options with the same
rules and never imports pydantic: ``pydantic_settings`` alone costs 8.8 times a
bare ``python -I -c pass`` (pydantic 3.2 times; medians of 15 runs), twice the
whole budget of such a one-shot ``apply`` (4 times).
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple, Self

from capkeeper.errors import SettingsError, StateError
from capkeeper.log import FORMATS, LEVELS, LogFormat
from capkeeper.state import DEFAULT_STATE, read_trusted_file

if TYPE_CHECKING:
    from _typeshed import StrPath  # a path as text or os.PathLike (pathlib.Path)

RESCAN_INTERVAL = (1.0, 86_400.0)  # seconds: bounds of --rescan-interval
SETTLE_TIME = (0.0, 60.0)  # seconds: bounds of --settle-time
SETTINGS_FILE = "/etc/capkeeper/settings.toml"
DEFAULT_CACHE_DIRECTORY = "/var/cache/capkeeper"  # the unit's CacheDirectory=capkeeper
SETTINGS_FILE_VARIABLE = "CAPKEEPER_SETTINGS_FILE"
ENV_PREFIX = "CAPKEEPER_"
_WHY = "whoever can edit the settings can point capkeeper at another state"


def pure_path(text: str) -> str:
    """``text`` spelt as ``str(pathlib.PurePosixPath(text))`` (``a//b/./`` is ``a/b``).

    Paths are kept as text: pathlib, with the modules it imports, is a tenth of what a
    one-shot ``capkeeper apply`` costs an ``ExecStartPre=``.
    """
    leading = len(text) - len(text.lstrip("/"))
    root = "/" * leading if leading < 3 else "/"  # POSIX leaves a leading "//" alone
    return root + "/".join(part for part in text.split("/") if part not in ("", ".")) or "."


def _path(empty: str) -> Callable[[object], str]:
    """The rule of a path setting; ``empty`` is the hint for an empty one."""

    def check(value: object) -> str:
        if not isinstance(value, str | os.PathLike):
            raise ValueError(f"must be a path, got {value!r}")
        text = os.fspath(value)
        if not isinstance(text, str):
            raise ValueError(f"must be a path, got {value!r}")
        # An empty value (an unset variable in a unit file) must not quietly name the
        # working directory, which is what "" is as a path.
        if not text:
            raise ValueError(f"must not be empty ({empty})")
        if "\0" in text:
            raise ValueError("must not contain a NUL character")
        return pure_path(text)

    return check


def _cache_directory(value: object) -> str | None:
    """The rule of ``cache_directory``: an absolute path, or empty (None) for no cache."""
    if value is None or value == "":
        return None
    path = _path("")(value)
    if not path.startswith("/"):
        raise ValueError(f"must be an absolute path, or empty to disable caching, got {value!r}")
    return path


def _seconds(low: float, high: float) -> Callable[[object], float]:
    """The rule of a number of seconds within ``[low, high]`` (text or number)."""

    def check(value: object) -> float:
        number = math.nan
        if isinstance(value, str):
            with contextlib.suppress(ValueError):  # not a number: refused below
                number = float(value)
        elif isinstance(value, int | float) and not isinstance(value, bool):
            number = float(value)
        if not low <= number <= high:  # also refuses nan
            raise ValueError(f"must be a number of seconds from {low:g} to {high:g}, got {value!r}")
        return number

    return check


def _choice(options: tuple[str, ...]) -> Callable[[object], str]:
    """The rule of one of ``options`` (any case)."""

    def check(value: object) -> str:
        if isinstance(value, str) and value.lower() in options:
            return value.lower()
        raise ValueError(f"must be one of {', '.join(options)}, got {value!r}")

    return check


def _optional(rule: Callable[[object], object]) -> Callable[[object], object]:
    """``rule``, or None (the default: unset)."""
    return lambda value: None if value is None else rule(value)


Rule = Callable[[object], object]
"""A setting's rule: the value as kept, or ValueError saying what is wrong."""

RULES: dict[str, Rule] = {
    "state": _path("name the state file, or unset it"),
    "rescan_interval": _seconds(*RESCAN_INTERVAL),
    "settle_time": _seconds(*SETTLE_TIME),
    "log_format": _choice(FORMATS),
    "log_level": _optional(_choice(LEVELS)),  # None: info
    "status_file": _path("name the status file"),
    "metrics_file": _optional(_path("name the metrics file, or unset it")),
    "cache_directory": _cache_directory,  # None: no cache
}
"""Every setting and its one rule, in the order they are documented. The defaults are
:class:`Settings`'; what each means is written once, for people, in capkeeper(8)
(``packaging/manpages.py``)."""


class _SettingsFields(NamedTuple):
    state: str = DEFAULT_STATE
    rescan_interval: float = 300.0
    settle_time: float = 0.25
    log_format: LogFormat = "auto"
    log_level: str | None = None
    status_file: str = "/run/capkeeper/status.json"
    metrics_file: str | None = None
    cache_directory: str | None = DEFAULT_CACHE_DIRECTORY


_DEFAULTS = _SettingsFields()


class Settings(_SettingsFields):
    """Where the state lives and how the daemon behaves; every field checked by its rule.

    ``Settings(**values)`` raises :class:`SettingsError` for an invalid value.
    Build it with :func:`load_settings`, which also says where a value came from.
    """

    __slots__ = ()

    # Every setting's name, as pydantic's BaseSettings called it (packaging/manpages.py).
    model_fields: ClassVar[Mapping[str, Rule]] = RULES

    def __new__(
        cls,
        *,
        state: StrPath = _DEFAULTS.state,
        rescan_interval: float = _DEFAULTS.rescan_interval,
        settle_time: float = _DEFAULTS.settle_time,
        log_format: LogFormat = _DEFAULTS.log_format,
        log_level: str | None = _DEFAULTS.log_level,
        status_file: StrPath = _DEFAULTS.status_file,
        metrics_file: StrPath | None = _DEFAULTS.metrics_file,
        cache_directory: StrPath | None = _DEFAULTS.cache_directory,
    ) -> Settings:
        given = (
            state,
            rescan_interval,
            settle_time,
            log_format,
            log_level,
            status_file,
            metrics_file,
            cache_directory,
        )
        checked = _check(dict(zip(RULES, given, strict=True)), dict.fromkeys(RULES, ""))
        return super().__new__(cls, **checked)  # type: ignore[arg-type]

    # A NamedTuple's own _make and _replace build the tuple directly: these check.
    @classmethod
    def _make(cls, iterable: Iterable[Any]) -> Self:  # type: ignore[override]  # typeshed: generic
        return cls(**dict(zip(RULES, iterable, strict=True)))

    def _replace(self, **changes: Any) -> Settings:
        return Settings(**{**self._asdict(), **changes})


def option_type(name: str) -> Callable[[str], object]:
    """An argparse ``type=`` for the option of setting ``name``: checked by its rule."""
    rule = RULES[name]

    def convert(text: str) -> object:
        try:
            return rule(text)
        except ValueError as exc:
            import argparse  # noqa: PLC0415 - the CLI has imported it already

            raise argparse.ArgumentTypeError(str(exc)) from None

    return convert


def _check(values: Mapping[str, object], sources: Mapping[str, str]) -> dict[str, object]:
    """Apply each field's rule; raise one :class:`SettingsError` naming every problem.

    ``sources`` says where each value came from (``CAPKEEPER_LOG_LEVEL``, a file's
    key, an option); an empty source is named by the field.
    """
    checked: dict[str, object] = {}
    problems: list[str] = []
    for name in (name for name in RULES if name in values):  # problems in RULES order
        try:
            checked[name] = RULES[name](values[name])
        except ValueError as exc:
            problems.append(f"{sources[name] or name}: {exc}")
    if problems:
        raise SettingsError("invalid setting: " + "; ".join(problems))
    return checked


def _from_file(path: str) -> tuple[dict[str, object], dict[str, str]]:
    """The settings in the file at ``path`` (none when it is absent), and their sources."""
    try:
        data = read_trusted_file(path, why=_WHY, names=SETTINGS_FILE_VARIABLE)
    except StateError as exc:
        raise SettingsError("settings file refused: " + "; ".join(exc.problems)) from None
    if data is None:
        return {}, {}
    import tomllib  # noqa: PLC0415 - only when there is a settings file

    try:
        document = tomllib.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        message = str(exc) if not isinstance(exc, RecursionError) else "nested too deeply"
        raise SettingsError(f"invalid settings file: {path}: {message}") from None
    unknown = sorted(set(document) - set(RULES))
    if unknown:
        raise SettingsError(
            f"invalid settings file: {path}: unknown key{'s' if len(unknown) > 1 else ''} "
            + ", ".join(repr(key) for key in unknown)
            + f" (known: {', '.join(RULES)})"
        )
    return dict(document), {name: f"{path}: {name}" for name in document}


def load_settings(
    overrides: Mapping[str, object] | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    isolate: bool = False,
) -> Settings:
    """Merge the settings: defaults < settings file < ``CAPKEEPER_*`` < ``overrides``.

    ``overrides`` are the command line's values by field name (an option not
    given is left out, or None). Raises :class:`SettingsError` for an unknown
    name, an untrusted or invalid settings file, or any invalid value.
    ``isolate`` (the daemon): pydantic-settings checks the sources in a child
    process (:func:`_validate_isolated`), so this one never holds pydantic.
    """
    env = os.environ if environ is None else environ
    given = {name: value for name, value in (overrides or {}).items() if value is not None}
    unknown = sorted(set(given) - set(RULES))
    if unknown:  # a programming error in a command, reported like any setting
        raise SettingsError(f"invalid setting: unknown setting {', '.join(unknown)}")
    path = env.get(SETTINGS_FILE_VARIABLE)
    if path == "":
        raise SettingsError(
            f"invalid setting: {SETTINGS_FILE_VARIABLE}: must not be empty (name the "
            "settings file, or unset it)"
        )
    values, sources = _from_file(path or SETTINGS_FILE)
    from_env: dict[str, object] = {}
    for name in RULES:
        variable = ENV_PREFIX + name.upper()
        if variable in env:
            from_env[name], sources[name] = env[variable], variable
    for name in given:
        sources[name] = "--" + name.replace("_", "-")
    if values or from_env:
        validate = _validate_isolated if isolate else _validate_with_pydantic_settings
        checked = validate(given, from_env, values, sources)
    else:  # only options: the same rules, without importing pydantic
        checked = _check(given, sources)
    return Settings(**checked)  # type: ignore[arg-type]


# What _validate_with_pydantic_settings takes: options, environment, file, sources.
_Values = Mapping[str, object]
_Sources = tuple[_Values, _Values, _Values, Mapping[str, str]]


class _Child(NamedTuple):
    """pydantic-settings checking the sources in a forked child (:func:`_validate_isolated`)."""

    pid: int
    answer: int  # the read end of the pipe the child answers on
    sources: _Sources


_pending: _Child | None = None  # the daemon's check, still running (see confirm_settings)


def _validate_isolated(
    options: Mapping[str, object],
    environment: Mapping[str, object],
    file: Mapping[str, object],
    sources: Mapping[str, str],
) -> dict[str, object]:
    """:func:`_validate_with_pydantic_settings` in a forked child; here the same rules
    (:data:`RULES`) on the same merge (options > environment > file) give the values.

    Importing pydantic and pydantic-settings grows a process by ~19 MB (measured:
    VmRSS before and after) that no deletion gives back: the daemon keeps that heap
    for its whole life, 10,000 entries' worth of state. The child's verdict is the
    verdict: its :class:`SettingsError` text is raised unchanged. A child that
    cannot run or dies otherwise changes nothing: the check is then made here.

    When the rules accept the values, they are returned at once and the child goes on
    checking (importing pydantic takes ~0.25 s) while the daemon starts up:
    :func:`confirm_settings` waits for its verdict, before ``READY=1``. When the rules
    refuse them, the child's verdict is waited for here (its text, as always).
    """
    global _pending  # noqa: PLW0603 - the one check a daemon leaves running
    _discard_pending()
    child = _start_child((options, environment, file, sources))
    if child is None:
        return _validate_with_pydantic_settings(options, environment, file, sources)
    try:
        values = _check({**file, **environment, **options}, sources)
    except SettingsError:
        _verdict(child)  # its error, if it has one: pydantic-settings' text
        raise
    _pending = child
    return values


def confirm_settings() -> None:
    """Wait for the check :func:`load_settings` (``isolate``) left running; raise its
    :class:`SettingsError`. Nothing to do when none is running."""
    global _pending
    child, _pending = _pending, None
    if child is not None:
        _verdict(child)


def _discard_pending() -> None:
    """Reap a check an earlier load left running and nobody confirmed (tests do)."""
    with contextlib.suppress(SettingsError):
        confirm_settings()


def _start_child(sources: _Sources) -> _Child | None:
    """Fork the child that checks ``sources`` with pydantic-settings; None if it cannot."""
    try:
        read_end, write_end = os.pipe2(os.O_CLOEXEC)
    except OSError:
        return None
    try:
        pid = os.fork()
    except OSError:
        os.close(read_end)
        os.close(write_end)
        return None
    if pid == 0:  # pragma: no cover - the child: coverage does not follow fork
        code = 1
        try:
            os.close(read_end)
            try:
                _validate_with_pydantic_settings(*sources)
                answer = b"ok"
            except SettingsError as exc:
                answer = b"error " + exc.message.encode(errors="surrogateescape")
            view = memoryview(answer)
            while view:
                view = view[os.write(write_end, view) :]
            code = 0
        finally:
            os._exit(code)  # no atexit handler, no flush of the parent's buffers
    os.close(write_end)
    return _Child(pid, read_end, sources)


def _verdict(child: _Child) -> None:
    """The child's verdict: nothing, or its :class:`SettingsError`. A child that died
    or answered nothing readable: the check is made here."""
    chunks = []
    try:
        while chunk := os.read(child.answer, 1 << 16):
            chunks.append(chunk)
    finally:
        os.close(child.answer)
        _, status = os.waitpid(child.pid, 0)
    answer = b"".join(chunks)
    if os.waitstatus_to_exitcode(status) != 0 or not answer.startswith((b"ok", b"error ")):
        _validate_with_pydantic_settings(*child.sources)
        return
    if answer != b"ok":
        raise SettingsError(answer.removeprefix(b"error ").decode(errors="surrogateescape"))


def _validate_with_pydantic_settings(
    options: Mapping[str, object],
    environment: Mapping[str, object],
    file: Mapping[str, object],
    sources: Mapping[str, str],
) -> dict[str, object]:
    """Merge options > environment > file > defaults and validate every field with
    pydantic-settings, whose validators are :data:`RULES`; one :class:`SettingsError`
    naming each invalid value's source."""
    # Imported here: the cost a one-shot command with only options never pays.
    from pydantic import ValidationError, ValidationInfo, field_validator  # noqa: PLC0415
    from pydantic_settings import (  # noqa: PLC0415
        BaseSettings,
        PydanticBaseSettingsSource,
        SettingsConfigDict,
    )

    class Layer(PydanticBaseSettingsSource):
        """One source's values by field name, already read (the file from its checked fd)."""

        def __init__(self, settings_cls: type[BaseSettings], values: Mapping[str, object]):
            super().__init__(settings_cls)
            self.values = dict(values)

        def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
            return self.values.get(field_name), field_name, False

        def __call__(self) -> dict[str, Any]:
            return dict(self.values)

    defaults = Settings()

    class SettingsModel(BaseSettings):
        """:class:`Settings` as pydantic-settings sees it: same fields and defaults."""

        model_config = SettingsConfigDict(extra="forbid", frozen=True)

        state: object = defaults.state
        rescan_interval: object = defaults.rescan_interval
        settle_time: object = defaults.settle_time
        log_format: object = defaults.log_format
        log_level: object = defaults.log_level
        status_file: object = defaults.status_file
        metrics_file: object = defaults.metrics_file
        cache_directory: object = defaults.cache_directory

        @field_validator("*", mode="before")
        @classmethod
        def _rule(cls, value: object, info: ValidationInfo) -> object:
            return RULES[str(info.field_name)](value)

        @classmethod
        def settings_customise_sources(
            cls,
            settings_cls: type[BaseSettings],
            init_settings: PydanticBaseSettingsSource,
            env_settings: PydanticBaseSettingsSource,
            dotenv_settings: PydanticBaseSettingsSource,
            file_secret_settings: PydanticBaseSettingsSource,
        ) -> tuple[PydanticBaseSettingsSource, ...]:
            # The options (init), then the environment, then the file: first one wins.
            return (
                init_settings,
                Layer(settings_cls, environment),
                Layer(settings_cls, file),
            )

    if set(SettingsModel.model_fields) != set(RULES):  # one table of fields, kept in step
        raise RuntimeError("SettingsModel and RULES disagree")
    try:
        merged = SettingsModel(**options)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            name = str(error["loc"][0]) if error["loc"] else "?"
            cause = (error.get("ctx") or {}).get("error")
            message = str(cause) if cause is not None else error["msg"]
            problems.append(f"{sources.get(name) or name}: {message}")
        raise SettingsError("invalid setting: " + "; ".join(problems)) from None
    return {name: getattr(merged, name) for name in RULES}
