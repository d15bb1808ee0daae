"""The version, read at run time without :mod:`importlib.metadata` (60 ms of every
run that reads the cache, which is keyed by it). ``pyproject.toml`` names it too, for
the build and the packaging; ``tests/test_cli.py`` checks that the two agree."""

__version__ = "0.1.0"
