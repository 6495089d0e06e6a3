"""Value codecs: how message values become Arrow columns and back."""

from __future__ import annotations

import pyarrow as pa

from sabot.codecs.base import Codec, Decoded
from sabot.codecs.json import JsonCodec
from sabot.codecs.others import ArrowCodec, MsgpackCodec, RawCodec
from sabot.errors import ConfigError

CODECS = {"json": JsonCodec, "msgpack": MsgpackCodec, "arrow": ArrowCodec, "raw": RawCodec}


def get_codec(codec: str | Codec, schema: pa.Schema | None = None) -> Codec:
    """Return a codec instance for a name (``json``, ``msgpack``, ``arrow``, ``raw``)."""
    if isinstance(codec, Codec):
        return codec
    try:
        cls = CODECS[codec]
    except (KeyError, TypeError):
        raise ConfigError(
            f"unknown codec {codec!r}; use one of {sorted(CODECS)} or a Codec instance"
        ) from None
    if schema is not None and cls in (JsonCodec, MsgpackCodec):
        return cls(schema=schema)
    return cls()


__all__ = ["CODECS", "ArrowCodec", "Codec", "Decoded", "JsonCodec", "MsgpackCodec",
           "RawCodec", "get_codec"]
