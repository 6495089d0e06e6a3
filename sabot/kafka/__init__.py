"""Everything that speaks Kafka: URLs, topic admin, the embedded broker."""

from sabot.kafka.urls import parse_broker_url, resolve_broker

__all__ = ["parse_broker_url", "resolve_broker"]
