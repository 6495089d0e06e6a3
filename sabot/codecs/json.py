"""JSON values, decoded in bulk into Arrow columns."""

from __future__ import annotations

import logging

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc

from sabot import ext
from sabot.codecs.base import Codec, Decoded, empty_batch, keep_types, type_reason, without_rows
from sabot.ext import JoinedValues

logger = logging.getLogger(__name__)


class JsonCodec(Codec):
    """One JSON object per message.

    The values of a fetch are joined with newlines and parsed in one call
    to ``sabot.ext.decode_json_objects``: the compiled kernel reads flat
    objects, and Arrow's ``pyarrow.json.read_json`` reads the rest with the
    same result. Only when that fails are the values checked one by one,
    to find the malformed ones and parse the rest.
    """

    name = "json"

    def __init__(self, schema: pa.Schema | None = None):
        self.schema = schema
        #: Without ``schema``, the types that the messages decoded so far
        #: established (see ``keep_types``).
        self.learned: pa.Schema | None = None

    def decode(self, values: list[bytes | None] | pa.Array,
               joined: JoinedValues | None = None) -> Decoded:
        """Decode ``values``, reading them from ``joined`` when it is given.

        ``values`` is a list of bytes or None, or a binary array. ``joined``
        is the same values joined as ``sabot.ext.record_columns`` and
        ``sabot.ext.parse_record_batches`` join them with ``join_values=True``,
        so they are not joined a second time.
        """
        if self.schema is not None:
            return self._decode(values, joined, self.schema, "the schema of the dataflow")
        decoded, learned, conflict = keep_types(
            self._decode(values, joined, None, "", known=self.learned), self.learned)
        if conflict:
            # Parse again in the known types, so that only the messages whose
            # values do not fit them fail, each with its own reason.
            decoded, learned, _ = keep_types(
                self._decode(values, joined, self.learned, "earlier messages"), self.learned)
        self.learned = learned
        return decoded

    def _decode(self, values: list[bytes | None] | pa.Array, joined: JoinedValues | None,
                schema: pa.Schema | None, source: str,
                known: pa.Schema | None = None) -> Decoded:
        """Decode in the types of ``schema`` when given; ``source`` names where it came from.

        ``known`` is the learned schema, against which rows of mixed types
        are checked when the fetch needs parsing row by row.
        """
        if joined is None and isinstance(values, pa.Array):
            values = values.to_pylist()
        if joined is None or joined.empty_count:
            bad = [(i, "empty value: expected a JSON object") for i in _empty_rows(values)]
        else:
            bad = []
        if len(bad) == len(values):
            return Decoded(empty_batch(), without_rows(len(values), bad), bad)

        if joined is not None:
            batch = _read(joined.data, joined.count, joined.newline_in_values, schema)
        else:
            batch = _parse(values if not bad else [v for v in values if v], schema)
        if batch is None:
            if isinstance(values, pa.Array):
                values = values.to_pylist()
            return _decode_slowly(values, bad, schema, source, known)
        return Decoded(batch, without_rows(len(values), bad), bad)

    def encode(self, batch: pa.RecordBatch) -> list[bytes]:
        return ext.encode_json_rows(batch)


def _parse(values: list[bytes], schema: pa.Schema | None) -> pa.RecordBatch | None:
    data = b"\n".join(values)
    return _read(data, len(values), data.count(b"\n") != len(values) - 1, schema)


def _read(data: bytes, count: int, newlines_in_values: bool,
          schema: pa.Schema | None) -> pa.RecordBatch | None:
    """Parse ``count`` JSON objects separated by newlines; None if that fails."""
    # Pretty-printed values contain newlines between tokens, so the reader
    # must not treat a newline as the end of a record. The compiled kernel
    # reads flat objects itself and gives the rest to Arrow's reader.
    return ext.decode_json_objects(data, count, newlines_in_values, schema)


def _decode_slowly(values: list[bytes | None], bad: list[tuple[int, str]],
                   schema: pa.Schema | None, source: str,
                   known: pa.Schema | None = None) -> Decoded:
    """Check the values one by one: the malformed ones are bad, the rest are parsed."""
    bad = list(bad)
    known_bad = {i for i, _ in bad}
    for i, value in enumerate(values):
        if i in known_bad:
            continue
        try:
            parsed = orjson.loads(value)
        except orjson.JSONDecodeError as exc:
            bad.append((i, f"invalid JSON: {exc}"))
            continue
        if not isinstance(parsed, dict):
            bad.append((i, f"expected a JSON object, got {type(parsed).__name__}"))
    bad.sort()
    rows = without_rows(len(values), bad)
    good = [values[i] for i in rows]
    if not good:
        return Decoded(empty_batch(), rows, bad)
    batch = _parse(good, schema)
    if batch is not None:
        return Decoded(batch, rows, bad)

    # orjson accepted values that Arrow rejects (mixed types across rows,
    # integers beyond int64, values that do not fit the schema): parse each
    # alone and merge the schemas.
    tables = []
    kept_rows = []
    for i in rows:
        single = _parse([values[i]], schema)
        if single is None:
            bad.append((int(i), _row_reason(values[i], schema, source)))
        else:
            tables.append(pa.Table.from_batches([single]))
            kept_rows.append(int(i))
    bad.sort()
    if not tables:
        return Decoded(empty_batch(), without_rows(len(values), bad), bad)
    # Keep each row whose types merge with those of the rows kept before it,
    # and with the types of earlier messages when they are known.
    merged_schema = known if known is not None else tables[0].schema
    others = "earlier messages" if known is not None else "the other messages of the fetch"
    merged = []
    for index, table in zip(kept_rows, tables, strict=True):
        try:
            merged_schema = pa.unify_schemas([merged_schema, table.schema],
                                             promote_options="permissive")
        except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
            logger.debug("JSON message %d has types that do not merge: %s", index, exc)
            bad.append((index, _conflict_reason(table, merged_schema, others)))
        else:
            merged.append(table)
    bad.sort()
    if not merged:
        return Decoded(empty_batch(), without_rows(len(values), bad), bad)
    table = pa.concat_tables(merged, promote_options="permissive")
    return Decoded(_one_batch(table), without_rows(len(values), bad), bad)


def _row_reason(value: bytes, schema: pa.Schema | None, source: str) -> str:
    """Explain why one JSON object that orjson reads does not become Arrow columns."""
    if schema is not None:
        alone = _parse([value], None)
        if alone is not None:
            return _conflict_reason(pa.Table.from_batches([alone]), schema, source)
    return "the JSON object cannot be converted to Arrow columns (nested values of " \
           "mixed types or numbers beyond 64 bits)"


def _conflict_reason(table: pa.Table, schema: pa.Schema, source: str) -> str:
    """Name the first field of a one-row ``table`` whose type ``schema`` does not take."""
    for field in schema:
        if field.name not in table.schema.names:
            continue
        column = table.column(field.name).combine_chunks()
        if column.type != field.type and column.null_count < len(column):
            return type_reason(field, column, 0, source)
    return f"the column types {table.schema} do not fit those of {source} ({schema})"


def _empty_rows(values: list[bytes | None] | pa.Array) -> list[int]:
    """Return the indices of the values that are None or empty."""
    if isinstance(values, pa.Array):
        empty = pc.fill_null(pc.equal(pc.binary_length(values), 0), True)
        return np.flatnonzero(empty.to_numpy(zero_copy_only=False)).tolist()
    return [i for i, value in enumerate(values) if not value]


def _one_batch(table: pa.Table) -> pa.RecordBatch:
    # After combine_chunks a table has one batch, or none when it is empty.
    batches = table.combine_chunks().to_batches()
    if batches:
        return batches[0]
    return pa.RecordBatch.from_pylist([], schema=table.schema)
