"""The package version (also in pyproject.toml)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("nervedet")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.1.0"
