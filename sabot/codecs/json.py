"""JSON values, decoded in bulk into Arrow columns."""

from __future__ import annotations

import logging

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc

from sabot import ext
from sabot.codecs.base import Codec, Decoded, empty_batch, without_rows
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

    def decode(self, values: list[bytes | None] | pa.Array,
               joined: JoinedValues | None = None) -> Decoded:
        """Decode ``values``, reading them from ``joined`` when it is given.

        ``values`` is a list of bytes or None, or a binary array. ``joined``
        is the same values joined as ``sabot.ext.record_columns`` and
        ``sabot.ext.parse_record_batches`` join them with ``join_values=True``,
        so they are not joined a second time.
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
            batch = self._read(joined.data, joined.count, joined.newline_in_values)
        else:
            batch = self._parse(values if not bad else [v for v in values if v])
        if batch is None:
            if isinstance(values, pa.Array):
                values = values.to_pylist()
            return self._decode_slowly(values, bad)
        return Decoded(batch, without_rows(len(values), bad), bad)

    def _parse(self, values: list[bytes]) -> pa.RecordBatch | None:
        data = b"\n".join(values)
        return self._read(data, len(values), data.count(b"\n") != len(values) - 1)

    def _read(self, data: bytes, count: int,
              newlines_in_values: bool) -> pa.RecordBatch | None:
        """Parse ``count`` JSON objects separated by newlines; None if that fails."""
        # Pretty-printed values contain newlines between tokens, so the reader
        # must not treat a newline as the end of a record. The compiled kernel
        # reads flat objects itself and gives the rest to Arrow's reader.
        return ext.decode_json_objects(data, count, newlines_in_values, self.schema)

    def _decode_slowly(self, values: list[bytes | None],
                       bad: list[tuple[int, str]]) -> Decoded:
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
        batch = self._parse(good)
        if batch is not None:
            return Decoded(batch, rows, bad)

        # orjson accepted values that Arrow rejects (mixed types across rows,
        # integers beyond int64): parse each alone and merge the schemas.
        tables = []
        kept = []
        for i in rows:
            one = self._parse([values[i]])
            if one is None:
                bad.append((int(i), "the JSON object cannot be converted to Arrow columns"))
            else:
                tables.append(pa.Table.from_batches([one]))
                kept.append(int(i))
        bad.sort()
        if not tables:
            return Decoded(empty_batch(), without_rows(len(values), bad), bad)
        try:
            table = pa.concat_tables(tables, promote_options="permissive")
        except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
            logger.warning("JSON rows have types that cannot be merged: %s", exc)
            first_schema = tables[0].schema
            merged, kept2 = [], []
            for index, table in zip(kept, tables, strict=True):
                if table.schema.equals(first_schema):
                    merged.append(table)
                    kept2.append(index)
                else:
                    bad.append((index, f"column types {table.schema} differ from "
                                       f"the rest of the batch ({first_schema})"))
            table = pa.concat_tables(merged)
            bad.sort()
        return Decoded(_one_batch(table), without_rows(len(values), bad), bad)

    def encode(self, batch: pa.RecordBatch) -> list[bytes]:
        return ext.encode_json_rows(batch)


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
