"""App settings: every knob with its unit, default and environment variable."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, fields
from typing import Any

from sabot.errors import ConfigError


@dataclass
class Settings:
    """Settings of a Sabot app, given as keyword arguments to ``Sabot(...)``.

    Each setting can also come from the environment as ``SABOT_<NAME>`` in
    upper case (for example ``SABOT_TOPIC_PARTITIONS=16``); a keyword
    argument wins over the environment.
    """

    #: Partitions of each topic the app creates because it was missing.
    topic_partitions: int = 8
    #: Replication factor of the topics the app creates.
    topic_replication_factor: int = 1
    #: Consumer group id; the app id when empty.
    group_id: str = ""
    #: Where a new consumer group starts: "earliest" or "latest".
    auto_offset_reset: str = "earliest"
    #: Consumer session timeout, ms. Kafka brokers accept 6,000 and up by default.
    session_timeout_ms: int = 10_000
    #: Upper bound on the records one fetch returns across all partitions.
    max_records: int = 20_000
    #: How the worker fetches records. "arrow" sends the Fetch requests itself
    #: and reads the record batches straight into Arrow columns. "aiokafka"
    #: uses the consumer's ``getmany``, one Python object per record. Both
    #: keep group membership and commits in the aiokafka consumer.
    fetcher: str = "arrow"
    #: Whether the "arrow" fetcher verifies each record batch's CRC-32C, as
    #: aiokafka's consumer does by default.
    check_crcs: bool = True
    #: Bytes fetched per partition per request.
    max_partition_fetch_bytes: int = 4 * 1024 * 1024
    #: Bytes fetched per request across all partitions.
    fetch_max_bytes: int = 64 * 1024 * 1024
    #: How long the producer waits to fill a batch, ms.
    linger_ms: int = 5
    #: Producer batch size, bytes.
    max_batch_size: int = 1024 * 1024
    #: Producer acknowledgements: 0, 1 or "all".
    acks: Any = "all"
    #: Producer compression: None, "gzip", "lz4", "snappy" or "zstd".
    compression_type: str | None = None
    #: Dead-letter topic; "{app_id}-dlq" when empty.
    dead_letter_topic: str = ""
    #: What a dataflow's exception does. "stop" stops the worker without
    #: committing the fetch. "dead-letter" runs the fetch again in halves
    #: until the records that fail alone are found, then sends those to the
    #: dead-letter topic and goes on. It applies to dataflows without
    #: windows or tables; the others still stop.
    dataflow_errors: str = "stop"
    #: Seconds between progress lines in the log; 0 turns them off.
    progress_interval: float = 5.0
    #: Seconds a graceful stop waits for in-flight batches before giving up.
    stop_timeout: float = 30.0

    @classmethod
    def from_kwargs(cls, values: dict[str, Any]) -> Settings:
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ConfigError(
                f"unknown setting(s) {unknown}; valid settings are {sorted(known)}"
            )
        merged: dict[str, Any] = {}
        for name, field in known.items():
            env = os.environ.get(f"SABOT_{name.upper()}")
            if name in values:
                merged[name] = values[name]
            elif env is not None:
                merged[name] = _from_env(name, env, field)
        settings = cls(**merged)
        settings.validate()
        return settings

    def validate(self) -> None:
        for name in ("topic_partitions", "topic_replication_factor", "max_records",
                     "session_timeout_ms", "max_partition_fetch_bytes", "fetch_max_bytes",
                     "max_batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"setting {name} must be a positive integer, got {value!r}")
        if self.auto_offset_reset not in ("earliest", "latest"):
            raise ConfigError(
                f"setting auto_offset_reset must be 'earliest' or 'latest', "
                f"got {self.auto_offset_reset!r}"
            )
        if self.fetcher not in ("arrow", "aiokafka"):
            raise ConfigError(
                f"setting fetcher must be 'arrow' or 'aiokafka', got {self.fetcher!r}"
            )
        if self.dataflow_errors not in ("stop", "dead-letter"):
            raise ConfigError(
                f"setting dataflow_errors must be 'stop' or 'dead-letter', "
                f"got {self.dataflow_errors!r}"
            )
        if self.acks not in (0, 1, "all", -1):
            raise ConfigError(f"setting acks must be 0, 1 or 'all', got {self.acks!r}")
        if self.linger_ms < 0 or self.progress_interval < 0 or self.stop_timeout <= 0:
            raise ConfigError(
                "settings linger_ms and progress_interval must be >= 0 and "
                "stop_timeout > 0"
            )

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)


def _from_env(name: str, raw: str, field: dataclasses.Field) -> Any:
    default = field.default
    try:
        if isinstance(default, bool):
            return raw.lower() in ("1", "true", "yes", "on")
        if isinstance(default, int):
            return int(raw)
        if isinstance(default, float):
            return float(raw)
    except ValueError:
        raise ConfigError(
            f"environment variable SABOT_{name.upper()}={raw!r} is not a valid "
            f"{type(default).__name__}"
        ) from None
    if name == "acks" and raw.lstrip("-").isdigit():
        return int(raw)
    return raw or None if name == "compression_type" else raw
