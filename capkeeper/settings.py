"""Runtime settings: environment ``CAPKEEPER_*`` overridden by command-line options."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from capkeeper.errors import SettingsError
from capkeeper.log import LEVELS, LogFormat
from capkeeper.state import DEFAULT_STATE

RESCAN_INTERVAL = (1.0, 86_400.0)  # seconds: bounds of --rescan-interval
SETTLE_TIME = (0.0, 60.0)  # seconds: bounds of --settle-time


class Settings(BaseSettings):
    """Where the state lives and how the daemon behaves."""

    model_config = SettingsConfigDict(env_prefix="CAPKEEPER_", extra="ignore", frozen=True)

    state: Path = DEFAULT_STATE
    rescan_interval: float = Field(
        default=300.0,
        ge=RESCAN_INTERVAL[0],
        le=RESCAN_INTERVAL[1],
        allow_inf_nan=False,
        description="seconds between full rescans",
    )
    settle_time: float = Field(
        default=0.25,
        ge=SETTLE_TIME[0],
        le=SETTLE_TIME[1],
        allow_inf_nan=False,
        description="seconds a write may stay open",
    )
    log_format: LogFormat = "auto"
    log_level: str | None = None
    status_file: Path = Path("/run/capkeeper/status.json")
    metrics_file: Path | None = None

    @field_validator("state", mode="before")
    @classmethod
    def _not_empty(cls, value: object) -> object:
        # Path("") is ".", the working directory: an empty CAPKEEPER_STATE (an
        # unset variable in a unit file) must not quietly name some other state.
        if isinstance(value, str) and not value:
            raise ValueError("must not be empty (name the state file, or unset it)")
        return value


def load_settings(overrides: Mapping[str, object] | None = None) -> Settings:
    """Defaults < environment ``CAPKEEPER_*`` < ``overrides`` (by field name), merged once.

    Raises :class:`SettingsError` (one line) for any invalid value.
    """
    values: dict[str, Any] = dict(overrides or {})
    try:
        settings = Settings(**values)
    except ValidationError as exc:
        problems = "; ".join(
            f"CAPKEEPER_{'_'.join(map(str, e['loc'])).upper()}: "
            + e["msg"].removeprefix("Value error, ")
            for e in exc.errors()
        )
        raise SettingsError(f"invalid setting: {problems}") from None
    level = settings.log_level
    if level is not None and level.lower() not in LEVELS:
        raise SettingsError(
            f"invalid setting: CAPKEEPER_LOG_LEVEL: must be one of {', '.join(LEVELS)}, "
            f"got {level!r}"
        )
    return settings
