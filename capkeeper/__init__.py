"""capkeeper: keep declared file capabilities on binaries across deploys."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("capkeeper")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0+unknown"

__all__ = ["__version__"]
