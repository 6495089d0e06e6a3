"""Operators: the steps of a pipeline, each applied to whole record batches.

An operator instance keeps the state of one pipeline instance, which in the
Kafka runtime means one source partition. Stateless operators hold nothing.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from sabot.errors import DataflowError, SchemaError

logger = logging.getLogger(__name__)

KEY_COLUMN = "_key"
METADATA_COLUMNS = ("_key", "_partition", "_offset", "_timestamp")


_MISSING_FIELD = re.compile(r'Field "(.*)" does not exist')


def missing_column_name(exc: KeyError) -> str:
    """Return the column a KeyError from ``batch[name]`` was about."""
    text = str(exc.args[0]) if exc.args else ""
    match = _MISSING_FIELD.search(text)
    return match.group(1) if match else text


def describe_function(fn: Callable) -> str:
    """Name a user function for error messages: module, qualified name and line."""
    code = getattr(fn, "__code__", None)
    name = getattr(fn, "__qualname__", None) or repr(fn)
    if code is None:
        return name
    return f"{name} ({code.co_filename}:{code.co_firstlineno})"


def require_columns(batch: pa.RecordBatch, columns: Sequence[str], operator: str) -> None:
    """Raise SchemaError naming the first missing column and the columns present."""
    names = batch.schema.names
    for column in columns:
        if column not in names:
            raise SchemaError(
                f"{operator}: column {column!r} not found; the batch has columns "
                f"{names}. Check the spelling, or add the column before this step."
            )


class Operator:
    """One step of a pipeline.

    ``process`` is called once per input batch, in order, and returns the
    batches to pass on (possibly none). ``flush`` is called once when a
    bounded input ends and returns whatever the operator still holds.
    """

    name = "operator"
    stateful = False  #: True if output depends on earlier rows of a key (windows, aggregations)

    def process(self, batch: pa.RecordBatch) -> list[pa.RecordBatch]:
        raise NotImplementedError

    def flush(self) -> list[pa.RecordBatch]:
        return []


class BatchFunction(Operator):
    """Base of operators that call a user function on every batch."""

    def __init__(self, fn: Callable):
        if not callable(fn):
            raise TypeError(f"{self.name}() needs a callable, got {fn!r}")
        self.fn = fn

    def call(self, batch: pa.RecordBatch) -> Any:
        try:
            return self.fn(batch)
        except SchemaError:
            raise
        except KeyError as exc:
            # Indexing a RecordBatch with a missing name raises KeyError;
            # name the requested column and the existing ones.
            raise SchemaError(
                f"{self.name}({describe_function(self.fn)}): column {missing_column_name(exc)!r} "
                f"not found; the batch has columns {batch.schema.names}"
            ) from exc


def _to_mask(result: Any, batch: pa.RecordBatch, fn: Callable) -> pa.Array:
    if isinstance(result, pa.ChunkedArray):
        result = result.combine_chunks()
    if isinstance(result, np.ndarray):
        result = pa.array(result, type=pa.bool_())
    elif isinstance(result, (list, tuple)):
        result = pa.array(result, type=pa.bool_())
    if not isinstance(result, pa.Array) or not pa.types.is_boolean(result.type):
        kind = getattr(result, "type", type(result).__name__)
        raise DataflowError(
            f"filter({describe_function(fn)}) must return a boolean array with one "
            f"value per row; it returned {kind}. Use pyarrow.compute, for example "
            f"pc.greater(batch['amount'], 50)."
        )
    if len(result) != batch.num_rows:
        raise DataflowError(
            f"filter({describe_function(fn)}) returned {len(result)} values for a "
            f"batch of {batch.num_rows} rows; return one boolean per row."
        )
    return result


class Filter(BatchFunction):
    """Keep the rows where ``fn(batch)`` is true; a null counts as false."""

    name = "filter"

    def process(self, batch):
        mask = _to_mask(self.call(batch), batch, self.fn)
        out = batch.filter(mask, null_selection_behavior="drop")
        return [out] if out.num_rows else []


class Map(BatchFunction):
    """Replace each batch with ``fn(batch)``, a RecordBatch or Table."""

    name = "map"

    def process(self, batch):
        result = self.call(batch)
        if result is None:
            return []
        if isinstance(result, pa.Table):
            return [b for b in result.to_batches() if b.num_rows]
        if not isinstance(result, pa.RecordBatch):
            raise DataflowError(
                f"map({describe_function(self.fn)}) must return a pyarrow.RecordBatch "
                f"or Table; it returned {type(result).__name__}."
            )
        return [result] if result.num_rows else []


class Select(Operator):
    """Keep the named columns, in that order, plus ``_key`` when present."""

    name = "select"

    def __init__(self, columns: Sequence[str]):
        if not columns:
            raise ValueError("select() needs at least one column name")
        for column in columns:
            if not isinstance(column, str):
                raise TypeError(f"select() takes column names, got {column!r}")
        self.columns = list(columns)

    def process(self, batch):
        require_columns(batch, self.columns, "select")
        columns = self.columns
        if KEY_COLUMN in batch.schema.names and KEY_COLUMN not in columns:
            columns = [*columns, KEY_COLUMN]
        return [batch.select(columns)]


class WithColumns(Operator):
    """Add or replace columns computed by functions of the batch."""

    name = "with_columns"

    def __init__(self, columns: Mapping[str, Callable]):
        if not columns:
            raise ValueError("with_columns() needs at least one name=function")
        for name, fn in columns.items():
            if not callable(fn):
                raise TypeError(f"with_columns({name}=...) needs a callable, got {fn!r}")
        self.columns = dict(columns)

    def process(self, batch):
        for name, fn in self.columns.items():
            try:
                value = fn(batch)
            except KeyError as exc:
                raise SchemaError(
                    f"with_columns({name}={describe_function(fn)}): column "
                    f"{missing_column_name(exc)!r} not found; the batch has columns "
                    f"{batch.schema.names}"
                ) from exc
            value = _to_column(value, batch.num_rows, name, fn)
            index = batch.schema.get_field_index(name)
            if index >= 0:
                batch = batch.set_column(index, name, value)
            else:
                batch = batch.append_column(name, value)
        return [batch]


def _to_column(value: Any, num_rows: int, name: str, fn: Callable) -> pa.Array:
    if isinstance(value, pa.ChunkedArray):
        value = value.combine_chunks()
    if isinstance(value, pa.Scalar):
        value = pa.array([value.as_py()] * num_rows, type=value.type)
    elif isinstance(value, np.ndarray):
        value = pa.array(value)
    elif not isinstance(value, pa.Array):
        try:
            value = pa.array([value] * num_rows) if np.isscalar(value) else pa.array(value)
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError) as exc:
            raise DataflowError(
                f"with_columns({name}={describe_function(fn)}) returned "
                f"{type(value).__name__}, which is not an array; return a pyarrow array"
            ) from exc
    if len(value) != num_rows:
        raise DataflowError(
            f"with_columns({name}={describe_function(fn)}) returned {len(value)} values "
            f"for a batch of {num_rows} rows; return one value per row."
        )
    return value


class Rename(Operator):
    """Rename columns: ``rename(old="new")``."""

    name = "rename"

    def __init__(self, mapping: Mapping[str, str]):
        if not mapping:
            raise ValueError("rename() needs at least one old=new pair")
        self.mapping = dict(mapping)

    def process(self, batch):
        require_columns(batch, list(self.mapping), "rename")
        names = [self.mapping.get(name, name) for name in batch.schema.names]
        return [batch.rename_columns(names)]


class KeyBy(Operator):
    """Set ``_key`` to a column's values; the sink uses it as the message key."""

    name = "key_by"

    def __init__(self, column: str):
        if not isinstance(column, str):
            raise TypeError(f"key_by() takes a column name, got {column!r}")
        self.column = column

    def process(self, batch):
        require_columns(batch, [self.column], "key_by")
        key = batch.column(self.column)
        index = batch.schema.get_field_index(KEY_COLUMN)
        if index >= 0:
            return [batch.set_column(index, KEY_COLUMN, key)]
        return [batch.append_column(KEY_COLUMN, key)]


def key_to_binary(column: pa.Array) -> pa.Array:
    """Convert a key column to the bytes sent as Kafka message keys.

    Binary keys pass unchanged, strings are their UTF-8 bytes and other types
    their string form (``42`` becomes ``b"42"``), so a Java client reading the
    topic gets the same key text.
    """
    if pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type):
        return column
    if pa.types.is_dictionary(column.type):
        column = column.cast(column.type.value_type)
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        column = pc.cast(column, pa.string())
    return column.cast(pa.binary())
