"""The msgpack, Arrow IPC and raw codecs."""

from __future__ import annotations

import msgpack
import numpy as np
import pyarrow as pa

from sabot import ext
from sabot.codecs.base import Codec, Decoded, empty_batch, keep_types, without_rows
from sabot.errors import CodecError


class MsgpackCodec(Codec):
    """One msgpack map per message."""

    name = "msgpack"

    def __init__(self, schema: pa.Schema | None = None):
        self.schema = schema
        #: Without ``schema``, the types that the messages decoded so far
        #: established (see ``keep_types``).
        self.learned: pa.Schema | None = None

    def decode(self, values: list[bytes | None]) -> Decoded:
        if self.schema is not None:
            return self._decode(values)
        decoded, self.learned, _ = keep_types(self._decode(values), self.learned)
        return decoded

    def _decode(self, values: list[bytes | None]) -> Decoded:
        rows, bad = [], []
        for i, value in enumerate(values):
            if not value:
                bad.append((i, "empty value: expected a msgpack map"))
                continue
            try:
                row = msgpack.unpackb(value, timestamp=3)
            except (ValueError, msgpack.UnpackException) as exc:
                bad.append((i, f"invalid msgpack: {exc}"))
                continue
            if not isinstance(row, dict):
                bad.append((i, f"expected a msgpack map, got {type(row).__name__}"))
                continue
            rows.append(row)
        if not rows:
            return Decoded(empty_batch(), without_rows(len(values), bad), bad)
        try:
            if self.schema is None:
                # Inferred from every row: from_pylist would take the first
                # row's keys only.
                batch = pa.RecordBatch.from_struct_array(pa.array(rows))
            else:
                batch = pa.RecordBatch.from_pylist(rows, schema=self.schema)
        except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
            # Rows whose types cannot share columns: keep those that fit the first.
            return _decode_row_by_row(values, rows, bad, exc, self.schema)
        return Decoded(batch, without_rows(len(values), bad), bad)

    def encode(self, batch: pa.RecordBatch) -> list[bytes]:
        return ext.encode_msgpack_rows(batch)


def _decode_row_by_row(values, rows, bad, exc, schema) -> Decoded:
    good_indices = without_rows(len(values), bad)
    kept_rows, first = [], None
    for index, row in zip(good_indices, rows, strict=True):
        try:
            one = pa.RecordBatch.from_pylist([row], schema=schema or first)
        except (pa.ArrowInvalid, pa.ArrowTypeError) as row_exc:
            bad.append((int(index), f"row does not fit the batch's columns: {row_exc}"))
            continue
        first = first or one.schema
        kept_rows.append(row)
    bad.sort()
    if not kept_rows:
        return Decoded(empty_batch(), without_rows(len(values), bad), bad)
    batch = pa.RecordBatch.from_pylist(kept_rows, schema=schema or first)
    return Decoded(batch, without_rows(len(values), bad), bad)


class ArrowCodec(Codec):
    """An Arrow IPC stream per message, holding one or more record batches."""

    name = "arrow"

    def decode(self, values: list[bytes | None]) -> Decoded:
        batches, rows_from, bad = [], [], []
        schema = None
        for i, value in enumerate(values):
            if not value:
                bad.append((i, "empty value: expected an Arrow IPC stream"))
                continue
            try:
                table = pa.ipc.open_stream(value).read_all()
            except (pa.ArrowInvalid, OSError) as exc:
                bad.append((i, f"invalid Arrow IPC stream: {exc}"))
                continue
            if schema is None:
                schema = table.schema
            elif not table.schema.equals(schema):
                bad.append((i, f"schema {table.schema} differs from the batch's {schema}"))
                continue
            batches.extend(table.to_batches())
            rows_from.append(np.full(table.num_rows, i, dtype=np.int64))
        if not batches:
            return Decoded(empty_batch(), np.zeros(0, dtype=np.int64), bad)
        table = pa.Table.from_batches(batches, schema=schema).combine_chunks()
        batch = table.to_batches()[0] if table.num_rows else \
            pa.RecordBatch.from_pylist([], schema=schema)
        return Decoded(batch, np.concatenate(rows_from), bad)

    def encode(self, batch: pa.RecordBatch) -> list[bytes]:
        out = []
        for i in range(batch.num_rows):
            sink = pa.BufferOutputStream()
            with pa.ipc.new_stream(sink, batch.schema) as writer:
                writer.write_batch(batch.slice(i, 1))
            out.append(sink.getvalue().to_pybytes())
        return out


class RawCodec(Codec):
    """The value bytes unchanged, in a binary column named ``value``."""

    name = "raw"

    def decode(self, values: list[bytes | None]) -> Decoded:
        batch = pa.RecordBatch.from_arrays([pa.array(values, type=pa.binary())], ["value"])
        return Decoded(batch, np.arange(len(values), dtype=np.int64), [])

    def encode(self, batch: pa.RecordBatch) -> list[bytes]:
        if "value" not in batch.schema.names:
            raise CodecError(
                f"the raw codec sends the 'value' column, but the batch has columns "
                f"{batch.schema.names}; select or rename a binary or string column to 'value'"
            )
        column = batch.column("value")
        if not (pa.types.is_binary(column.type) or pa.types.is_string(column.type)
                or pa.types.is_large_binary(column.type)
                or pa.types.is_large_string(column.type)):
            raise CodecError(
                f"the raw codec needs a binary or string 'value' column, got {column.type}"
            )
        return column.cast(pa.binary()).to_pylist()
