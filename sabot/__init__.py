"""Sabot: Kafka-native stream processing on Apache Arrow record batches.

Public names are loaded on first use, so ``import sabot`` imports neither
aiokafka nor DuckDB and starts nothing.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "AgentError": "sabot.errors",
    "Aggregation": "sabot.stream.windows",
    "BrokerError": "sabot.errors",
    "CodecError": "sabot.errors",
    "ConfigError": "sabot.errors",
    "DataflowError": "sabot.errors",
    "Sabot": "sabot.app.base",
    "SabotError": "sabot.errors",
    "SchemaError": "sabot.errors",
    "Stream": "sabot.stream.core",
    "UnifiedCoordinator": "sabot.agents.coordinator",
    "hopping": "sabot.stream.windows",
    "session": "sabot.stream.windows",
    "tumbling": "sabot.stream.windows",
}

__all__ = sorted([*_EXPORTS, "__version__"])

if TYPE_CHECKING:
    from sabot.agents.coordinator import UnifiedCoordinator
    from sabot.app.base import Sabot
    from sabot.errors import (AgentError, BrokerError, CodecError, ConfigError,
                              DataflowError, SabotError, SchemaError)
    from sabot.stream.core import Stream
    from sabot.stream.windows import Aggregation, hopping, session, tumbling


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'sabot' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
