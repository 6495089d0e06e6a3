"""A registered dataflow: a user function from a Stream to a Stream."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from sabot.codecs import Codec, get_codec
from sabot.errors import ConfigError
from sabot.stream import Stream
from sabot.stream.operators import describe_function

SinkTarget = str | Callable[[pa.RecordBatch], Any] | None


@dataclass
class Dataflow:
    """A dataflow as registered by ``@app.dataflow``.

    ``sink`` is a topic name, an (async) callable that receives each output
    batch, or None to drop the output.
    """

    name: str
    fn: Callable[[Stream], Stream]
    topics: list[str]
    sink: SinkTarget
    codec: Codec
    sink_codec: Codec
    stream: Stream | None = field(default=None, repr=False)

    def build(self) -> Stream:
        """Call the user function once on an empty stream and check what it returns."""
        if self.stream is None:
            result = self.fn(Stream())
            if not isinstance(result, Stream):
                raise ConfigError(
                    f"dataflow {self.name!r} ({describe_function(self.fn)}) must return "
                    f"a Stream, got {type(result).__name__}; did you forget 'return'?"
                )
            self.stream = result
        return self.stream


def make_dataflow(fn: Callable, topics: str | list[str], sink: SinkTarget, codec: Any,
                  name: str | None, schema: pa.Schema | None,
                  sink_codec: Any, codecs: dict | None = None) -> Dataflow:
    """Validate a registration and build its Dataflow.

    ``codecs`` caches decoders by (name, schema, topics), so dataflows that
    read the same topics with the same codec share its instance and the
    worker decodes each fetch of those topics once for all of them.
    """
    if isinstance(topics, str):
        topics = [topics]
    topics = list(topics)
    if not topics or not all(isinstance(t, str) and t for t in topics):
        raise ConfigError(f"dataflow topics must be a topic name or a list of names, "
                          f"got {topics!r}")
    if sink is not None and not (isinstance(sink, str) and sink) and not callable(sink):
        raise ConfigError(f"dataflow sink must be a topic name, a callable or None, "
                          f"got {sink!r}")
    if isinstance(sink, str) and sink in topics:
        raise ConfigError(f"dataflow sink {sink!r} is also one of its source topics; "
                          f"that would feed its own output back forever")
    if isinstance(codec, str) and codecs is not None:
        # The topics are part of the key because a decoder remembers the
        # value types of what it decoded (see sabot.codecs.base.keep_types).
        key = (codec, schema, tuple(sorted(topics)))
        decoder = codecs.get(key)
        if decoder is None:
            decoder = codecs[key] = get_codec(codec, schema)
    else:
        decoder = get_codec(codec, schema)
    encoder = get_codec(sink_codec if sink_codec is not None else codec)
    return Dataflow(name or fn.__name__, fn, topics, sink, decoder, encoder)
