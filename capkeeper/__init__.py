"""capkeeper: keep declared file capabilities on binaries across deploys."""

__all__ = ["__version__"]


def __getattr__(name: str) -> str:
    # Read lazily: importlib.metadata costs more than a one-shot ``apply`` should pay.
    if name != "__version__":
        raise AttributeError(f"module 'capkeeper' has no attribute {name!r}")
    from importlib.metadata import PackageNotFoundError, version  # noqa: PLC0415

    try:
        return version("capkeeper")
    except PackageNotFoundError:  # running from a source tree without installation
        return "0+unknown"
