"""Broker URLs, settings and the app registry."""

from __future__ import annotations

import pytest

from sabot import Sabot, Stream
from sabot.app.settings import Settings
from sabot.errors import ConfigError
from sabot.kafka.urls import parse_broker_url, resolve_broker


@pytest.mark.parametrize("url, expected", [
    ("kafka://localhost:9092", "localhost:9092"),
    ("kafka://h1:9092,h2:9093", "h1:9092,h2:9093"),
    ("kafka://h1", "h1:9092"),
    ("h1:1234", "h1:1234"),
    ("KAFKA://h1:1/", "h1:1"),
])
def test_parse_broker_url(url, expected):
    assert parse_broker_url(url) == expected


@pytest.mark.parametrize("url", ["", "http://h:9092", "kafka://h:port", "kafka://h:0",
                                 "kafka://", "kafka://:9092"])
def test_parse_broker_url_rejects(url):
    with pytest.raises(ConfigError):
        parse_broker_url(url)


def test_resolve_broker_order(monkeypatch):
    monkeypatch.delenv("SABOT_BROKER", raising=False)
    assert resolve_broker(None) == "kafka://localhost:9092"
    monkeypatch.setenv("SABOT_BROKER", "kafka://env:1")
    assert resolve_broker(None) == "kafka://env:1"
    assert resolve_broker("kafka://arg:2") == "kafka://arg:2"


def test_settings_from_env_and_kwargs(monkeypatch):
    monkeypatch.setenv("SABOT_TOPIC_PARTITIONS", "16")
    monkeypatch.setenv("SABOT_PROGRESS_INTERVAL", "0.5")
    settings = Settings.from_kwargs({"linger_ms": 1})
    assert settings.topic_partitions == 16
    assert settings.progress_interval == 0.5
    assert settings.linger_ms == 1
    assert Settings.from_kwargs({"topic_partitions": 3}).topic_partitions == 3


def test_settings_reject_unknown_and_invalid(monkeypatch):
    with pytest.raises(ConfigError, match="unknown setting"):
        Settings.from_kwargs({"partitons": 3})
    with pytest.raises(ConfigError, match="positive integer"):
        Settings.from_kwargs({"topic_partitions": 0})
    with pytest.raises(ConfigError, match="auto_offset_reset"):
        Settings.from_kwargs({"auto_offset_reset": "beginning"})
    with pytest.raises(ConfigError, match="dataflow_errors must be 'stop' or 'dead-letter', "
                                          "got 'skip'"):
        Settings.from_kwargs({"dataflow_errors": "skip"})
    monkeypatch.setenv("SABOT_MAX_RECORDS", "many")
    with pytest.raises(ConfigError, match="SABOT_MAX_RECORDS='many'"):
        Settings.from_kwargs({})


def test_app_registers_dataflows_without_connecting():
    app = Sabot("orders-app", broker="kafka://127.0.0.1:1")

    @app.dataflow(["a", "b"], sink="out", codec="msgpack", name="flow")
    def flow(stream: Stream) -> Stream:
        return stream

    registered = app.dataflows["flow"]
    assert registered.topics == ["a", "b"]
    assert registered.sink == "out"
    assert registered.codec.name == "msgpack"
    assert app.dead_letter_topic == "orders-app-dlq"
    assert app.group_id == "orders-app"


def test_app_rejects_bad_dataflows():
    app = Sabot("x", broker="kafka://127.0.0.1:1")
    with pytest.raises(ConfigError, match="also one of its source topics"):
        app.dataflow("a", sink="a")(lambda s: s)
    with pytest.raises(ConfigError, match="unknown codec"):
        app.dataflow("a", codec="xml")(lambda s: s)
    app.dataflow("a", name="one")(lambda s: s)
    with pytest.raises(ConfigError, match="already registered"):
        app.dataflow("b", name="one")(lambda s: s)
    with pytest.raises(ConfigError, match="non-empty"):
        Sabot("")


def test_dataflow_must_return_stream():
    app = Sabot("x", broker="kafka://127.0.0.1:1")

    @app.dataflow("a")
    def broken(stream):
        stream.select("x")

    with pytest.raises(ConfigError, match="forget 'return'"):
        app.dataflows["broken"].build()


def test_dataflows_share_decoder_per_codec():
    # One decoder instance per (codec, schema, topics) lets the worker decode
    # each fetch of a topic once for every dataflow that reads it.
    app = Sabot("x", broker="kafka://127.0.0.1:1")
    app.dataflow("a", name="one")(lambda s: s)
    app.dataflow("a", name="two", sink_codec="msgpack")(lambda s: s)
    app.dataflow("a", name="three", codec="msgpack")(lambda s: s)
    assert app.dataflows["one"].codec is app.dataflows["two"].codec
    assert app.dataflows["one"].codec is not app.dataflows["three"].codec
    assert app.dataflows["two"].sink_codec.name == "msgpack"


def test_decoders_are_per_topic():
    # A decoder remembers the value types of its topics, so another topic
    # gets its own.
    app = Sabot("x", broker="kafka://127.0.0.1:1")
    app.dataflow("a", name="one")(lambda s: s)
    app.dataflow("b", name="two")(lambda s: s)
    app.dataflow(["b", "a"], name="both")(lambda s: s)
    app.dataflow(["a", "b"], name="both_again")(lambda s: s)
    assert app.dataflows["one"].codec is not app.dataflows["two"].codec
    assert app.dataflows["both"].codec is app.dataflows["both_again"].codec
    assert app.dataflows["both"].codec is not app.dataflows["one"].codec
