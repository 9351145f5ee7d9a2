"""constraints.txt: every dependency pyproject.toml names is pinned inside its range, and
the pins are what this suite runs on, so a green run vouches for what a build installs."""

from __future__ import annotations

import tomllib
from collections.abc import Iterator
from importlib import metadata

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.support.pins import CONSTRAINTS, off_pin, pins


def requirements() -> Iterator[tuple[str, Requirement]]:
    """pyproject.toml's requirements, each with the extra that names it ('' for none)."""
    project = tomllib.loads((CONSTRAINTS.parent / "pyproject.toml").read_text())["project"]
    for text in project["dependencies"]:
        yield "", Requirement(text)
    for extra, texts in project["optional-dependencies"].items():
        for text in texts:
            yield extra, Requirement(text)


def test_every_requirement_is_pinned_inside_its_range() -> None:
    pinned = pins()
    outside = {}
    for extra, req in requirements():
        if req.marker is not None and not req.marker.evaluate({"extra": extra}):
            continue
        pin = pinned.get(canonicalize_name(req.name))
        if pin is None or not req.specifier.contains(pin, prereleases=True):
            outside[f"{req} ({extra or 'dependencies'})"] = pin
    assert not outside, f"pyproject.toml asks for what constraints.txt does not pin " \
                        f"(make lock re-pins): {outside}"


def test_this_suite_runs_on_the_pinned_versions() -> None:
    """Each pinned distribution installed here is at its pin (a tool of your own in the
    venv is yours; what a build may hold is checked on the builds themselves)."""
    pinned = pins()
    installed: dict[str, str] = {canonicalize_name(dist.metadata["Name"]): dist.version
                                 for dist in metadata.distributions()}
    assert "fastapi" in installed and "paho-mqtt" in installed
    ours = {name: version for name, version in installed.items() if name in pinned}
    assert off_pin(ours) == {}, (
        "this venv is not at constraints.txt's pins, so a green run would not vouch for "
        "them: `make venv` installs them (after `make lock`, the new ones)")
