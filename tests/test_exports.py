"""The public surface of the ``sabot`` package."""

from __future__ import annotations

import sabot

EXPECTED = [
    "AgentError",
    "Aggregation",
    "BrokerError",
    "CodecError",
    "ConfigError",
    "DataflowError",
    "Sabot",
    "SabotError",
    "SchemaError",
    "Stream",
    "UnifiedCoordinator",
    "__version__",
    "hopping",
    "session",
    "tumbling",
]


def test_all_is_sorted_and_expected():
    # Adding or dropping a public name must update this list on purpose.
    assert sabot.__all__ == sorted(sabot.__all__)
    assert sabot.__all__ == EXPECTED


def test_every_public_name_resolves():
    for name in sabot.__all__:
        assert getattr(sabot, name) is not None, name


def test_unknown_name_raises_attribute_error():
    try:
        sabot.NoSuchThing  # noqa: B018
    except AttributeError as exc:
        assert "NoSuchThing" in str(exc)
    else:
        raise AssertionError("sabot.NoSuchThing did not raise")


def test_errors_share_one_root():
    for name in ("AgentError", "BrokerError", "CodecError", "ConfigError",
                 "DataflowError", "SchemaError"):
        assert issubclass(getattr(sabot, name), sabot.SabotError), name
    assert issubclass(sabot.ConfigError, ValueError)
    assert issubclass(sabot.SchemaError, KeyError)
