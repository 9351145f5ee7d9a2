"""What leaves the site: which channels and callback types are forwarded, and how often
superseded state may be (FORWARD_CHANNELS, DROP_TYPES, MIN_INTERVAL_SECONDS).

AWS IoT Core bills every published message, and a robot reporting its pose every second
is 86,400 messages a day: an operator chooses here what is worth sending. Only the
settings' shape lives here; the webhook applies the policy, edge_agent/downsample.py
does the timing.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any, Final

from pydantic import AfterValidator, BeforeValidator

from bridge.pudu.normalize import CHANNELS, DOCUMENTED_TYPES
from bridge.service.settings_loader import as_list, parse_pairs

__all__ = [
    "DOWNSAMPLABLE",
    "FORWARDABLE",
    "DropTypes",
    "ForwardChannels",
    "ForwardPolicy",
    "Intervals",
    "warnings",
]

#: The robot channels, plus ``callback`` for every ``callback/{type}`` (and shop-level ones).
FORWARDABLE: Final = ("status", "event", "power", "pose", "move", "task", "callback")
#: Channels whose messages supersede each other: only these may be downsampled. Status,
#: events and tasks are transitions: each one matters.
DOWNSAMPLABLE: Final = frozenset({"pose", "power", "move"})
#: Leaving these out loses transitions no later message repeats: check-config warns.
_MUST_SEE: Final = ("status", "event")
_DOCUMENTED: Final = frozenset(t.lower() for t in DOCUMENTED_TYPES)


def _known_channels(value: tuple[str, ...]) -> tuple[str, ...]:
    unknown = [v for v in value if v not in FORWARDABLE]
    if unknown:
        raise ValueError(f"unknown channel(s) {', '.join(unknown)}; "
                         f"choose from {', '.join(FORWARDABLE)}")
    return tuple(dict.fromkeys(value))


def _parse_intervals(value: object) -> object:
    # MIN_INTERVAL_SECONDS="pose=5,power=30"; YAML may give the mapping itself.
    return parse_pairs(value, "channel=seconds, e.g. pose=5,power=30")


def _downsamplable(value: dict[str, float]) -> dict[str, float]:
    wrong = [c for c in value if c not in DOWNSAMPLABLE]
    if wrong:
        raise ValueError(f"{', '.join(wrong)} cannot be downsampled; only "
                         f"{', '.join(sorted(DOWNSAMPLABLE))} (state that supersedes itself)")
    bad = [c for c, s in value.items() if not 0 <= s <= 86_400]
    if bad:
        raise ValueError(f"{', '.join(bad)}: seconds must be between 0 and 86400")
    return {c: float(s) for c, s in value.items() if s > 0}  # 0: not downsampled


ForwardChannels = Annotated[tuple[str, ...], BeforeValidator(as_list),
                            AfterValidator(_known_channels)]
DropTypes = Annotated[tuple[str, ...], BeforeValidator(as_list)]
Intervals = Annotated[dict[str, float], BeforeValidator(_parse_intervals),
                      AfterValidator(_downsamplable)]


@dataclass(frozen=True, slots=True)
class ForwardPolicy:
    """The three settings in the form the hot path asks them."""

    channels: frozenset[str] = frozenset(FORWARDABLE)
    drop_types: frozenset[str] = frozenset()  # lower-cased: types compare case-insensitively
    intervals: Mapping[str, float] = field(default_factory=dict)

    @classmethod
    def of(cls, settings: Any) -> ForwardPolicy:
        """From EdgeSettings (duck-typed: config imports this module)."""
        return cls(frozenset(settings.forward_channels),
                   frozenset(t.lower() for t in settings.drop_types),
                   dict(settings.min_interval_seconds))

    @property
    def everything(self) -> bool:
        """Nothing filtered: the webhook can skip the check."""
        return self.channels >= set(FORWARDABLE) and not self.drop_types

    def forwards(self, channel: str, callback_type: str) -> bool:
        group = "callback" if channel.startswith("callback/") else channel
        return group in self.channels and callback_type.lower() not in self.drop_types


def warnings(policy: ForwardPolicy) -> list[str]:
    """What check-config and run say about a policy that is allowed but likely a mistake."""
    found = [f"FORWARD_CHANNELS leaves out {c}: its messages are answered 200 and dropped"
             for c in _MUST_SEE if c not in policy.channels]
    for ctype, channel in CHANNELS.items():
        if channel in _MUST_SEE and ctype.lower() in policy.drop_types:
            found.append(f"DROP_TYPES drops {ctype}, a {channel} callback")
    for t in sorted(policy.drop_types - _DOCUMENTED):
        found.append(f"DROP_TYPES: {t} is not a documented Pudu callback type (a typo?)")
    return found
