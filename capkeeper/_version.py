"""The version, read by the build (``pyproject.toml``) and at run time without
:mod:`importlib.metadata` (60 ms of every run that reads the cache, which is
keyed by it)."""

__version__ = "0.1.0"
