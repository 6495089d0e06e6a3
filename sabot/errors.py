"""Exceptions raised by Sabot.

The tree::

    SabotError
     +-- ConfigError (also ValueError)        invalid setting, broker URL or app path
     +-- SchemaError (also KeyError)          a column that an operator needs is missing
     +-- CodecError (also ValueError)         a value that a codec cannot decode or encode
     +-- DataflowError                        user code in a dataflow raised
     +-- BrokerError                          the broker failed or cannot be reached
     |    +-- BrokerStartError                the embedded broker did not come up
     |    +-- CorruptRecordError              fetched record batches are malformed
     +-- AgentError                           an agent process died or failed a job
     +-- MissingExtraError (also ImportError) an optional package is not installed

Each class has a ``retriable`` attribute: the consumer loop retries an
operation whose error has ``retriable = True`` and stops on the others.
"""

from __future__ import annotations


class SabotError(Exception):
    """Root of every error Sabot raises on purpose."""

    retriable = False


class ConfigError(SabotError, ValueError):
    """An invalid setting, broker URL or app path."""


class SchemaError(SabotError, KeyError):
    """A column an operator needs is not in the batch."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class CodecError(SabotError, ValueError):
    """A value that a codec cannot decode or encode."""


class DataflowError(SabotError):
    """User code in a dataflow raised; the cause is chained."""


class BrokerError(SabotError):
    """The Kafka broker failed or cannot be reached."""

    retriable = True


class BrokerStartError(BrokerError):
    """The embedded broker process did not start or did not respond."""

    retriable = False


class CorruptRecordError(BrokerError):
    """Fetched Kafka record batches are malformed or fail their CRC-32C check.

    Not retriable, because fetching the same offsets again returns the same bytes.
    """

    retriable = False


class AgentError(SabotError):
    """An agent process of the pool died or failed a job."""


class MissingExtraError(SabotError, ImportError):
    """An optional dependency is not installed; the message names the extra."""


def require(module: str, extra: str):
    """Import ``module`` or raise MissingExtraError naming the extra to install."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingExtraError(
            f"{module} is not installed; install it with: pip install 'sabot[{extra}]'"
        ) from exc
