"""The pinned versions (constraints.txt) and which of them an artifact really holds: a
venv, a wheelhouse, a Debian package's or an image's file list."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from pathlib import Path

from packaging.utils import canonicalize_name
from packaging.version import Version

CONSTRAINTS = Path(__file__).resolve().parents[2] / "constraints.txt"
#: Not pinned: the project itself, and the installer's own tools that a venv is made with.
UNPINNED = frozenset({"pudu-fleet-bridge", "pip", "setuptools", "wheel"})
_DIST_INFO = re.compile(r"(?:^|/)([^/]+?)-([^-/]+)\.dist-info(?:/|$)")


def pins(path: Path = CONSTRAINTS) -> dict[str, str]:
    """``name==version`` lines, by canonical name; comments and blank lines skipped."""
    found: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            found[canonicalize_name(name)] = version.strip()
    return found


def in_paths(paths: Iterable[str]) -> dict[str, str]:
    """The distributions whose ``NAME-VERSION.dist-info`` directory is among ``paths``."""
    found: dict[str, str] = {}
    for path in paths:
        if match := _DIST_INFO.search(path):
            found[canonicalize_name(match[1])] = match[2]
    return found


def in_wheelhouse(house: Path) -> dict[str, str]:
    """Each wheel's distribution and version, from its file name (PEP 427)."""
    return {canonicalize_name(wheel.name.split("-")[0]): wheel.name.split("-")[1]
            for wheel in house.glob("*.whl")}


def off_pin(found: Mapping[str, str]) -> dict[str, tuple[str, str | None]]:
    """Each distribution in ``found`` not at its pin: name -> (version found, pin or None)."""
    pinned = pins()
    return {name: (version, pinned.get(name)) for name, version in found.items()
            if name not in UNPINNED
            and (name not in pinned or Version(version) != Version(pinned[name]))}
