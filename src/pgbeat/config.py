"""Configuration from the environment (README, "Configuration"). Every variable is optional."""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field
from pathlib import Path

from pgbeat.egress import HttpPolicy
from pgbeat.limits import MIN_INTERVAL_FLOOR, MIN_INTERVAL_SECONDS

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return float(raw)
    except ValueError as exc:
        raise SystemExit(f"{name}: expected a number, got {raw!r}") from exc


def parse_networks(text: str) -> tuple[Network, ...]:
    """PGBEAT_TRUSTED_PROXIES: comma-separated addresses or CIDR networks."""
    try:
        return tuple(
            ipaddress.ip_network(part.strip(), strict=False) for part in text.split(",") if part.strip()
        )
    except ValueError as exc:
        raise SystemExit(f"PGBEAT_TRUSTED_PROXIES: {exc}") from None


def _list(name: str) -> tuple[str, ...]:
    """A comma-separated variable's items, blanks dropped."""
    return tuple(item.strip() for item in os.environ.get(name, "").split(",") if item.strip())


@dataclass(frozen=True)
class Config:
    database_url: str | None = None
    data_dir: Path = Path(".pgbeat")
    api_keys: tuple[str, ...] = ()
    log_format: str | None = None  # "json", "text", or None for "text on a TTY"
    retention_days: float = 30.0
    shutdown_grace: float = 30.0
    rate_limit_per_minute: int = 3000  # per API key (or address); 0 turns rate limiting off
    auth_failures_per_minute: int = 20  # per client address, then 429 until the minute ends
    trusted_proxies: tuple[Network, ...] = ()  # networks whose X-Forwarded-For names the client
    min_interval: float = MIN_INTERVAL_SECONDS  # shortest `every` the API accepts
    http: HttpPolicy = field(default_factory=HttpPolicy)  # the http kind's limits and egress policy
    ui_secret: str | None = None  # signs the dashboard's sessions and CSRF tokens (pgbeat.api.dashboard)
    metrics_port: int = 9100  # a scheduler's or worker's /health and /metrics; 0: none
    cors_origins: tuple[str, ...] = ()  # origins whose browser apps may call the API; none: CORS off
    extra: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_env(cls) -> Config:
        keys = _list("PGBEAT_API_KEYS")
        return cls(
            database_url=os.environ.get("PGBEAT_DATABASE_URL") or None,
            data_dir=Path(os.environ.get("PGBEAT_DATA_DIR", ".pgbeat")),
            api_keys=keys,
            log_format=os.environ.get("PGBEAT_LOG_FORMAT") or None,
            retention_days=_float("PGBEAT_RETENTION_DAYS", 30.0),
            shutdown_grace=_float("PGBEAT_SHUTDOWN_GRACE", 30.0),
            rate_limit_per_minute=int(_float("PGBEAT_RATE_LIMIT", 3000)),
            auth_failures_per_minute=int(_float("PGBEAT_AUTH_FAILURE_LIMIT", 20)),
            trusted_proxies=parse_networks(os.environ.get("PGBEAT_TRUSTED_PROXIES", "")),
            min_interval=max(MIN_INTERVAL_FLOOR, _float("PGBEAT_MIN_INTERVAL", MIN_INTERVAL_SECONDS)),
            http=HttpPolicy.from_env(),
            ui_secret=os.environ.get("PGBEAT_UI_SECRET") or None,
            cors_origins=_list("PGBEAT_CORS_ORIGINS"),
            metrics_port=int(_float("PGBEAT_METRICS_PORT", 9100)),
        )
