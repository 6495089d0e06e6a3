"""The codec interface: Kafka message values to Arrow columns and back."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa


@dataclass
class Decoded:
    """The result of decoding the values of one partition's fetch.

    ``batch`` contains the value columns of every row decoded. ``rows_from[j]``
    is the index, in the input list, of the message that row ``j`` came
    from; most codecs give one row per message, the Arrow codec may give
    several. ``errors`` lists ``(index, reason)`` for every message that could
    not be decoded: those go to the dead-letter topic.
    """

    batch: pa.RecordBatch
    rows_from: np.ndarray
    errors: list[tuple[int, str]] = field(default_factory=list)


class Codec:
    """Decodes message values to a record batch and encodes rows to values."""

    name = "codec"

    def decode(self, values: list[bytes | None]) -> Decoded:
        raise NotImplementedError

    def encode(self, batch: pa.RecordBatch) -> list[bytes]:
        """Encode each row of ``batch`` (without metadata columns) as one value."""
        raise NotImplementedError


def without_rows(count: int, bad: list[tuple[int, str]]) -> np.ndarray:
    """Return the indices 0..count-1 that are not among the bad ones."""
    if not bad:
        return np.arange(count, dtype=np.int64)
    return np.delete(np.arange(count, dtype=np.int64), [i for i, _ in bad])


def empty_batch() -> pa.RecordBatch:
    return pa.RecordBatch.from_pydict({})


def keep_types(decoded: Decoded,
               learned: pa.Schema | None) -> tuple[Decoded, pa.Schema | None, bool]:
    """Give ``decoded`` the column types that earlier messages established.

    Without a declared schema, each fetch's types are inferred from its own
    messages. ``learned`` is the schema of the fetches before. Returns the
    batch in those types, the schema to remember, and whether a column had
    a type that does not merge with the known one:

    - a field missing from this fetch becomes a null column;
    - types that Arrow can merge (null and any type, int64 and double,
      structs with more fields) merge, and the batch is cast to the result;
    - a value of another type, such as the string "lots" in a column of
      doubles, removes its message from the batch with a reason, so it
      goes to the dead-letter topic instead of failing the dataflow;
    - new fields are added after the known ones.
    """
    batch = decoded.batch
    if batch.num_columns == 0 and batch.num_rows == 0:
        return decoded, learned, False
    if learned is None:
        return decoded, batch.schema, False
    if batch.schema.equals(learned):
        return decoded, learned, False
    count = batch.num_rows
    names = batch.schema.names
    fields: list[pa.Field] = []
    columns: list[pa.Array] = []
    bad: dict[int, str] = {}
    for known in learned:
        if known.name not in names:
            fields.append(known)
            columns.append(pa.nulls(count, known.type))
            continue
        column = batch.column(known.name)
        if column.type == known.type:
            fields.append(known)
            columns.append(column)
            continue
        merged = _merge(known, column)
        if merged is not None:
            fields.append(known.with_type(merged.type))
            columns.append(merged)
            continue
        # Every value present in this column has the other type.
        for row in np.flatnonzero(column.is_valid().to_numpy(zero_copy_only=False)).tolist():
            bad.setdefault(row, type_reason(known, column, row, "earlier messages"))
        fields.append(known)
        columns.append(pa.nulls(count, known.type))
    for name in names:
        if learned.get_field_index(name) < 0:
            fields.append(batch.schema.field(name))
            columns.append(batch.column(name))
    schema = pa.schema(fields)
    conformed = pa.RecordBatch.from_arrays(columns, schema=schema)
    if not bad:
        return Decoded(conformed, decoded.rows_from, decoded.errors), schema, False
    keep = np.ones(count, dtype=bool)
    keep[list(bad)] = False
    errors = decoded.errors + [(int(decoded.rows_from[row]), reason)
                               for row, reason in bad.items()]
    errors.sort()
    return (Decoded(conformed.filter(pa.array(keep)), decoded.rows_from[keep], errors),
            schema, True)


def _merge(field: pa.Field, column: pa.Array) -> pa.Array | None:
    """Return ``column`` cast to the type it shares with ``field``, or None if there is none."""
    try:
        merged = pa.unify_schemas(
            [pa.schema([field]), pa.schema([pa.field(field.name, column.type)])],
            promote_options="permissive",
        ).field(0).type
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
        return None
    if merged == column.type:
        return column
    try:
        return column.cast(merged)
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
        return None


def type_reason(field: pa.Field, column: pa.Array, row: int, source: str) -> str:
    """Describe a value of ``column`` whose type does not fit ``field`` from ``source``."""
    value = repr(column[row].as_py())
    if len(value) > 60:
        value = value[:57] + "..."
    return (f"field {field.name!r} is {value} ({column.type}), but {source} made it "
            f"{field.type}; send {field.type} values, or declare the value types with "
            f"schema= on the dataflow")
