"""config.example/ lists every key (its README and README.md say so): each setting of the
edge agent's and the callback server's models is in its example, set or commented out
(``# key: value``, the default then applying), and nothing there is unknown."""

from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from callback_server.settings import CallbackSettings
from edge_agent.settings import EdgeSettings

EXAMPLES = Path(__file__).resolve().parents[1] / "config.example"
#: ``# key: value`` at the start of a line: a key shown commented out (its default applies).
_COMMENTED = re.compile(r"^# ?(?=\s*[a-z_]+:(\s|$))")


def shown(path: Path) -> dict[str, Any]:
    """The example's keys, set or commented out."""
    text = "\n".join(_COMMENTED.sub("", line) for line in path.read_text().splitlines())
    loaded = yaml.safe_load(text)
    assert isinstance(loaded, dict)
    return loaded


def _nested(annotation: Any) -> type | None:
    """The settings group a field holds (a model or a dataclass), if any."""
    for candidate in typing.get_args(annotation) or (annotation,):
        if isinstance(candidate, type) and (issubclass(candidate, BaseModel)
                                            or dataclasses.is_dataclass(candidate)):
            return candidate
    return None


def _names(group: type) -> dict[str, Any]:
    if issubclass(group, BaseModel):
        return {name: f.annotation for name, f in group.model_fields.items()}
    assert dataclasses.is_dataclass(group)
    return {f.name: f.type for f in dataclasses.fields(group)}


def missing(group: type, example: dict[str, Any], prefix: str = "") -> list[str]:
    """Keys of ``group`` absent from ``example`` (dotted), and keys there it does not know."""
    names = _names(group)
    found = [f"{prefix}{name}" for name in names if name not in example]
    found += [f"{prefix}{key} (unknown)" for key in example if key not in names]
    for name, annotation in names.items():
        inner = _nested(annotation)
        if inner is not None and isinstance(example.get(name), dict):
            found += missing(inner, example[name], f"{prefix}{name}.")
    return found


@pytest.mark.parametrize(("model", "example"), [
    (EdgeSettings, "edge-agent.yaml"), (CallbackSettings, "callback-server.yaml")])
def test_every_setting_is_in_its_example(model: type[BaseModel], example: str) -> None:
    assert missing(model, shown(EXAMPLES / example)) == []


def test_the_example_leaves_aws_pacing_to_the_backend() -> None:
    """Installed as /etc/edge-agent/config.yaml: a 0 there would switch AWS IoT's pacing
    off for every installation on mqtt_backend awsiot."""
    set_keys = yaml.safe_load((EXAMPLES / "edge-agent.yaml").read_text())
    assert "publish_rate_limit" not in set_keys and "publish_byte_limit" not in set_keys
