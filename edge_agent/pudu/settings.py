"""Settings of the Pudu cloud API client and poller (``pudu:`` in the YAML, PUDU_* env)."""

from __future__ import annotations

import ipaddress
from typing import Annotated
from urllib.parse import urlsplit

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, SecretStr, field_validator

from bridge.service.settings_loader import as_list
from edge_agent.pudu.schedule import Schedule, parse

#: docs/pudu.md, "API 1": the cluster names the SDK knows, accepted as PUDU_API_URL.
CLUSTERS = {
    "cn": "open-platform.pudutech.com",
    "sea": "css-open-platform.pudutech.com",
    "de": "csg-open-platform.pudutech.com",
    "us": "csu-open-platform.pudutech.com",
}
#: The client adds this to PUDU_API_URL; every spec path lives below it.
ENTRY = "/pudu-entry"


def is_loopback(host: str) -> bool:
    name = host.lower().strip("[]").rstrip(".")
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


class PuduApiSettings(BaseModel):
    """Key, secret, cluster and the poll schedule; polling needs a key and shop ids."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    api_url: str = ""
    api_key: str = ""
    api_secret: SecretStr | None = None
    # Gateways sharing one key each poll only their own shops.
    shop_ids: Annotated[tuple[str, ...], BeforeValidator(as_list)] = ()
    poll_interval_seconds: float = Field(default=300.0, ge=0)  # 0: polling off
    # rate(...) / cron(...) as AWS writes them; wins over the interval (docs/schedules.md).
    poll_schedule: str = ""
    lookback_hours: float = Field(default=24.0, gt=0, le=24 * 31)
    # Pudu batches its logs (errors arrive ~10 min late): re-read this much of the last window.
    overlap_seconds: float = Field(default=900.0, ge=0)
    timeout_seconds: float = Field(default=15.0, gt=0)  # the SDK's
    max_retries: int = Field(default=3, ge=0, le=10)
    retry_max_seconds: float = Field(default=8.0, gt=0)

    @field_validator("api_url")
    @classmethod
    def _url(cls, value: str) -> str:
        value = value.strip()
        if not value:
            return ""
        if value.lower() in CLUSTERS:
            return f"https://{CLUSTERS[value.lower()]}"
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be https://host, or one of " + ", ".join(CLUSTERS))
        if parts.scheme == "http" and not is_loopback(parts.hostname):
            raise ValueError("plain http:// is allowed only for a loopback host (tests)")
        path = parts.path.rstrip("/")
        if path in ("", ENTRY):
            path = ""
        else:
            raise ValueError("give the scheme and host only; the client adds /pudu-entry")
        return f"{parts.scheme}://{parts.netloc}{path}"

    @field_validator("poll_schedule")
    @classmethod
    def _schedule(cls, value: str) -> str:
        value = value.strip()
        if value:
            parse(value)  # refused at load, saying why
        return value

    @property
    def schedule(self) -> Schedule:
        """When runs are due: the expression, else rate(interval); only read when polling."""
        return parse(self.poll_schedule or self.poll_interval_seconds)

    @property
    def configured(self) -> bool:
        """A key, its secret and a cluster: commands can call the API."""
        return bool(self.api_url and self.api_key and self.api_secret
                    and self.api_secret.get_secret_value())

    @property
    def polling(self) -> bool:
        """Scheduled polling is on: a key, shops, and an interval other than 0 (0 turns it
        off even with a schedule set: ``schedule_warnings`` says so)."""
        return self.configured and bool(self.shop_ids) and self.poll_interval_seconds > 0

    def schedule_warnings(self, now: float) -> list[str]:
        """What check-config says of the schedule: an interval of 0 beside a schedule (the
        0 wins: no polling), or a schedule with no run time left (the agent starts and
        does not poll)."""
        if self.poll_schedule and self.poll_interval_seconds == 0:
            return [f"PUDU_POLL_SCHEDULE={self.poll_schedule} is not used: "
                    "PUDU_POLL_INTERVAL=0 turns scheduled polling off (unset the interval "
                    "to poll on the schedule)"]
        if self.polling and self.schedule.next_after(now) is None:
            return [f"poll schedule {self.schedule.expression} has no run time left: the "
                    "agent starts and does not poll"]
        return []

    @property
    def host(self) -> str:
        return urlsplit(self.api_url).hostname or ""
