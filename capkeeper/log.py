"""structlog configuration, done once at the entry point, and paid for only when used.

Events are named (``capability_restored``) and carry fields. On a terminal
they render as readable lines, in a pipe as JSON lines, and under systemd
(when stderr is journald's stream) as native journal entries.

Importing structlog costs about four times a bare interpreter start, more than
a one-shot ``capkeeper apply`` in ``ExecStartPre=`` may spend in total, and an
in-sync apply logs nothing above debug. So :func:`configure` only records the
configuration while structlog is not imported yet, and :func:`get_logger`
returns a logger that drops an event below the configured level without
importing anything; the first event at or above it imports and configures
structlog, then goes through it like every later one. Once structlog is
imported (the daemon, tests), both act on it directly.

The logger keeps the bound logger structlog assembled for the configuration in
force, and assembles a new one only when that configuration changes (by
:func:`configure`, or by ``structlog.configure``, as tests do): structlog's lazy
proxy would assemble one at every call, ~10 µs even for a dropped debug event,
on the daemon's path from an inotify event to the restore.
"""

from __future__ import annotations

import importlib
import sys
from types import ModuleType
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, TextIO

if TYPE_CHECKING:
    from collections.abc import Callable

LogFormat = Literal["auto", "console", "json", "journal"]
FORMATS: tuple[LogFormat, ...] = ("auto", "console", "json", "journal")
LEVELS = ("debug", "info", "warning", "error", "critical")
# The numbers of the logging module's levels (logging.DEBUG ... logging.CRITICAL),
# by every name a structlog bound logger answers to: the gate needs no import.
_NUMBERS = {
    "debug": 10,
    "info": 20,
    "msg": 20,
    "warning": 30,
    "warn": 30,
    "error": 40,
    "exception": 40,
    "critical": 50,
    "fatal": 50,
}


class ConsoleRenderer:
    """``HH:MM:SS level sentence`` lines for people at a terminal."""

    def __call__(self, _logger: Any, method: str, event_dict: dict[str, Any]) -> str:
        from capkeeper.events import render_message  # noqa: PLC0415 - the registry, when logging

        event = str(event_dict.pop("event", ""))
        stamp = str(event_dict.pop("timestamp", ""))[11:19]
        level = str(event_dict.pop("level", method))
        exc = event_dict.pop("exception", None)
        line = f"{stamp} {level:<8} {render_message(event, event_dict)}"
        return f"{line}\n{exc}" if exc else line


def resolve_format(fmt: LogFormat, stream: TextIO) -> LogFormat:
    """Pick the concrete format for ``auto``."""
    if fmt != "auto":
        return fmt
    from capkeeper.journal import stderr_is_journal  # noqa: PLC0415 - only for "auto"

    if stream is sys.stderr and stderr_is_journal():
        return "journal"
    return "console" if stream.isatty() else "json"


class _Config(NamedTuple):  # not a dataclass: creating one costs ~1 ms of every run
    fmt: LogFormat  # concrete
    level: int
    stream: TextIO


_pending: _Config | None = None  # recorded by configure(), not yet given to structlog


# Modules structlog imports but capkeeper never has it use: asyncio (~35 ms, for its
# async methods) and uuid (~4 ms with platform, for the deprecated threadlocal.wrap_dict).
# Its modules only look them up inside functions, at a call.
_ON_USE = ("asyncio", "uuid")


class _OnUse(ModuleType):
    """What structlog's modules hold as one of :data:`_ON_USE`: the real module,
    imported at its first use (an attribute asked for). Only structlog's import sees it
    in ``sys.modules``; anyone else importing that module gets the real one."""

    def __getattr__(self, name: str) -> Any:
        module = self.__name__
        if sys.modules.get(module) is self:  # asked during structlog's own import
            del sys.modules[module]
        return getattr(importlib.import_module(module), name)  # the real one, on first use


def _import_structlog() -> ModuleType:
    """structlog, imported (if it is not yet) with the modules of :data:`_ON_USE`
    imported only when used, unless another thread runs: it could import one of them
    meanwhile and keep the stand-in, and its import of a submodule (``asyncio.subprocess``)
    would load that submodule a second time. A module imported already is the one
    structlog gets."""
    imported = sys.modules.get("structlog")
    if imported is not None:  # every event after the first: one lookup
        return imported
    # The import system hands a module found in sys.modules to any thread, unlocked.
    threading = sys.modules.get("threading")  # not imported: no thread was started
    if threading is not None and threading.active_count() > 1:
        import structlog  # noqa: PLC0415 - see the module docstring

        return structlog
    stand_ins = {name: _OnUse(name) for name in _ON_USE if name not in sys.modules}
    sys.modules.update(stand_ins)
    try:
        import structlog  # noqa: PLC0415 - see the module docstring
    finally:
        for name, stand_in in stand_ins.items():
            if sys.modules.get(name) is stand_in:
                del sys.modules[name]
    return structlog


def _apply(config: _Config) -> None:
    """Configure structlog for the whole process."""
    structlog = _import_structlog()

    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
    ]
    if config.fmt == "journal":
        from capkeeper.journal import JournalRenderer  # noqa: PLC0415

        processors.append(JournalRenderer(fallback=config.stream))
    elif config.fmt == "console":
        processors.append(ConsoleRenderer())
    else:
        processors.append(structlog.processors.JSONRenderer(sort_keys=False))
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(config.level),
        # One write(2) per event: print() writes the line and its newline apart.
        logger_factory=structlog.WriteLoggerFactory(file=config.stream),
        cache_logger_on_first_use=False,
    )


def configure(fmt: LogFormat = "auto", level: str = "info", stream: TextIO | None = None) -> str:
    """Configure logging for the whole process; return the concrete format used.

    ``level`` is one of :data:`LEVELS`. structlog is configured now if it is
    imported already, else when the first event at or above ``level`` is logged.
    """
    global _pending  # noqa: PLW0603 - the process's one logging configuration
    out = stream if stream is not None else sys.stderr
    config = _Config(resolve_format(fmt, out), _NUMBERS[level], out)
    if "structlog" in sys.modules:
        _pending = None
        _apply(config)  # a new configuration: the next event assembles a new bound logger
    else:
        _pending = config
    return config.fmt


def _drop(*_args: Any, **_kwargs: Any) -> None:
    """An event below the configured level: nothing to do."""


class _Bound(NamedTuple):
    """A bound logger and the structlog configuration it was assembled with."""

    logger: Any
    processors: object
    wrapper_class: object
    logger_factory: object
    context_class: object


_bound: _Bound | None = None  # the bound logger last assembled, and from what


class _Logger:
    """The capkeeper logger: see the module docstring."""

    def __getattr__(self, name: str) -> Callable[..., Any]:
        pending = _pending
        if pending is not None and _NUMBERS.get(name, pending.level) < pending.level:
            return _drop
        return getattr(_structlog_logger(), name)  # type: ignore[no-any-return]


_LOGGER = _Logger()


def _structlog_logger() -> Any:
    """structlog's bound ``capkeeper`` logger for the configuration in force (configured
    first if :func:`configure` left it pending)."""
    global _pending, _bound  # noqa: PLW0603 - the process's one logger, kept per configuration
    structlog = _import_structlog()

    if _pending is not None:
        config, _pending = _pending, None
        _apply(config)
    # get_config() is a new dict of the objects in force: compare them by identity (the
    # list of processors is the one structlog.testing.capture_logs() edits in place).
    current = structlog.get_config()
    bound = _bound
    if (
        bound is None
        or bound.processors is not current["processors"]
        or bound.wrapper_class is not current["wrapper_class"]
        or bound.logger_factory is not current["logger_factory"]
        or bound.context_class is not current["context_class"]
    ):
        bound = _bound = _Bound(
            structlog.get_logger("capkeeper").bind(),
            current["processors"],
            current["wrapper_class"],
            current["logger_factory"],
            current["context_class"],
        )
    return bound.logger


def keeps(logger: Any, level: str) -> bool:
    """Whether ``logger`` keeps events of ``level`` (one of :data:`LEVELS`), so that a
    caller can skip building one it would drop. structlog's filtering loggers say so
    (``is_enabled_for``), the stand-in from its pending configuration without importing
    structlog; any other logger (a test's) is taken to keep everything."""
    number = _NUMBERS[level]
    pending = _pending
    if isinstance(logger, _Logger) and pending is not None:
        return number >= pending.level
    try:
        kept = logger.is_enabled_for(number)
    except AttributeError:
        return True
    return kept if isinstance(kept, bool) else True


def get_logger() -> Any:
    """The ``capkeeper`` logger (structlog's, or a stand-in until it is needed)."""
    return _LOGGER
