"""Runtime settings: environment ``CAPKEEPER_*`` overridden by command-line options."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from capkeeper.log import LogFormat
from capkeeper.state import DEFAULT_STATE


class Settings(BaseSettings):
    """Where the state lives and how the daemon behaves."""

    model_config = SettingsConfigDict(env_prefix="CAPKEEPER_", extra="ignore", frozen=True)

    state: Path = DEFAULT_STATE
    rescan_interval: float = Field(default=300.0, gt=0, description="seconds between full rescans")
    settle_time: float = Field(default=0.25, ge=0, description="seconds a write may stay open")
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
