"""capkeeper: keep declared file capabilities on binaries across deploys."""

from capkeeper._version import __version__

__all__ = ["__version__"]
