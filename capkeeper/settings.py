"""Runtime settings: environment ``CAPKEEPER_*`` overridden by command-line options."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from capkeeper.log import LogFormat
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
