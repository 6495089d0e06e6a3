"""Broker URLs: ``kafka://host:port[,host:port...]``."""

from __future__ import annotations

import os

from sabot.errors import ConfigError

DEFAULT_BROKER = "kafka://localhost:9092"


def resolve_broker(broker: str | None) -> str:
    """Return the broker URL to use: the argument, else SABOT_BROKER, else localhost."""
    if broker:
        return broker
    return os.environ.get("SABOT_BROKER") or DEFAULT_BROKER


def parse_broker_url(url: str) -> str:
    """Turn ``kafka://h1:9092,h2:9092`` into aiokafka's ``h1:9092,h2:9092``.

    A bare ``host:port`` list is accepted too. A missing port means 9092.
    """
    if not isinstance(url, str) or not url.strip():
        raise ConfigError(f"invalid broker URL {url!r}; expected kafka://host:port")
    rest = url.strip()
    if "://" in rest:
        scheme, rest = rest.split("://", 1)
        if scheme.lower() != "kafka":
            raise ConfigError(
                f"invalid broker URL {url!r}: scheme {scheme!r} is not supported; "
                f"use kafka://host:port"
            )
    servers = []
    for part in rest.rstrip("/").split(","):
        part = part.strip()
        if not part:
            continue
        host, sep, port = part.rpartition(":")
        if not sep:
            host, port = part, "9092"
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(
                f"invalid broker address {part!r} in {url!r}; expected host:port "
                f"with a port between 1 and 65535"
            )
        servers.append(f"{host}:{int(port)}")
    if not servers:
        raise ConfigError(f"invalid broker URL {url!r}: no host:port given")
    return ",".join(servers)
