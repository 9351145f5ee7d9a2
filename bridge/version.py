"""The product's version, from the installed package's metadata (one place for both services)."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

__all__ = ["VERSION"]

try:
    VERSION = version("pudu-fleet-bridge")
except PackageNotFoundError:  # running from a source tree that was never installed
    VERSION = "0.0.0"
