"""Planning of a bounded job for the agent pool: its stages and its partitions.

A job without stateful operators is one stage: the input is cut into
contiguous slices, one per agent, and the outputs are concatenated in
input order. A stateful operator (``stateful = True`` on its class) needs
every row of a key in one place, so the chain is cut before it. The rows
reaching it are partitioned by the ``_key`` column that ``key_by`` sets
(or by the column named by ``Stream.key``), and every row of a key goes to
one agent in input order. A stateful operator on an unkeyed stream runs
the whole job on one agent.

NOTE: an event-time window on an agent receives only its keys' rows, so
its watermark can trail the one ``collect()`` computes over all rows. The pool
then drops fewer records as late, and results differ from ``collect()``
when the input has late records. On input in event-time order they match.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from sabot.errors import DataflowError, SchemaError
from sabot.stream import operators as ops

logger = logging.getLogger(__name__)

# Partitioning modes: the division of a stage's input between agents.
SPLIT = "split"      # contiguous slices, one per agent
BY_KEY = "by-key"    # every row of a key on one agent
SINGLE = "single"    # everything on one agent
LOCAL = "local"      # in the coordinator's process, without IPC

#: Minimum input rows per partition. A partition costs a round trip to an
#: agent (0.35 ms median on a 2-core x86_64 machine, measured by
#: benchmarks/overhead.py), which vectorised operators spend on roughly this
#: many rows (an estimate), so a smaller input runs on fewer agents.
MIN_ROWS_PER_PARTITION = 8_192

# Operators that only rearrange columns, without user code: a stage made
# of these alone costs less to run in-process than a round trip to agents.
_COLUMN_ONLY = (ops.KeyBy, ops.Select, ops.Rename)


@dataclass(frozen=True)
class Stage:
    """Steps ``start:end`` of a job's chain and how their input is partitioned."""

    start: int
    end: int
    partitioning: str


def materialize(stream: Any) -> list[pa.RecordBatch]:
    """Read a bounded stream's whole source into a list of record batches.

    Tables in the source are cut into their batches, as ``collect()`` does.
    Raises ConfigError for a stream without a source or with a Kafka source.
    """
    source = stream._local_source()
    batches: list[pa.RecordBatch] = []
    for item in source:
        if isinstance(item, pa.Table):
            batches.extend(item.to_batches())
        elif isinstance(item, pa.RecordBatch):
            batches.append(item)
        else:
            raise TypeError(f"a stream's source must yield pyarrow RecordBatch or Table "
                            f"objects; it yielded {type(item).__name__}")
    return batches


def is_stateful(operator: ops.Operator) -> bool:
    return bool(getattr(operator, "stateful", False))


def plan_stages(operators: list[ops.Operator], stream_key: str | None) -> list[Stage]:
    """Cut a chain of operators into stages at its stateful operators."""
    count = len(operators)
    stateful = [i for i, operator in enumerate(operators) if is_stateful(operator)]
    if not stateful:
        return [Stage(0, count, SPLIT)]
    first = stateful[0]
    keyed = stream_key is not None or any(isinstance(op, ops.KeyBy)
                                          for op in operators[:first])
    if not keyed:
        return [Stage(0, count, SINGLE)]

    # A later stateful operator needs a new partitioning only if the
    # stream was keyed again since the last cut.
    cuts = [first]
    rekeyed = False
    for i in range(first + 1, count):
        if isinstance(operators[i], ops.KeyBy):
            rekeyed = True
        elif rekeyed and is_stateful(operators[i]):
            cuts.append(i)
            rekeyed = False

    stages = []
    if first > 0:
        prefix = operators[:first]
        column_only = all(type(op) in _COLUMN_ONLY for op in prefix)
        stages.append(Stage(0, first, LOCAL if column_only else SPLIT))
    for start, end in zip(cuts, [*cuts[1:], count], strict=True):
        stages.append(Stage(start, end, BY_KEY))
    return stages


def split_contiguous(batches: list[pa.RecordBatch], parts: int,
                     min_rows: int = MIN_ROWS_PER_PARTITION) -> list[list[pa.RecordBatch]]:
    """Cut batches into at most ``parts`` runs of consecutive rows of near-equal size.

    Each run gets at least ``min_rows`` rows, so a small input makes fewer runs.
    Batch boundaries inside a run are kept; a batch that straddles a cut
    is sliced, without copying. Empty runs are left out.
    """
    total = sum(batch.num_rows for batch in batches)
    parts = min(parts, total // max(1, min_rows) or 1)
    if parts <= 1:
        return [batches]
    base, extra = divmod(total, parts)
    sizes = [base + 1 if i < extra else base for i in range(parts)]
    runs: list[list[pa.RecordBatch]] = []
    current: list[pa.RecordBatch] = []
    room = sizes[0]
    for batch in batches:
        offset = 0
        while offset < batch.num_rows:
            take = min(room, batch.num_rows - offset)
            current.append(batch.slice(offset, take) if take < batch.num_rows else batch)
            offset += take
            room -= take
            if room == 0:
                runs.append(current)
                current = []
                room = sizes[len(runs)] if len(runs) < parts else 0
    if current:
        runs.append(current)
    return runs


def find_key_column(schema: pa.Schema, stream_key: str | None) -> str | None:
    """Name the column to partition a stateful stage by, or None if there is none."""
    if ops.KEY_COLUMN in schema.names:
        return ops.KEY_COLUMN
    if stream_key is not None and stream_key in schema.names:
        return stream_key
    return None


def split_by_key(table: pa.Table, column: str, parts: int,
                 min_rows: int = MIN_ROWS_PER_PARTITION) -> list[pa.Table]:
    """Partition rows so that every row of a key lands in one part, in input order.

    Distinct keys are numbered in order of first appearance and dealt out
    round-robin, so the parts have about as many keys each. There are at
    most ``table.num_rows // min_rows`` parts. A key type that Arrow cannot
    dictionary-encode (lists, structs) gives one part.
    """
    parts = min(parts, table.num_rows // max(1, min_rows) or 1)
    if parts <= 1:
        return [table]
    keys = table.column(column).combine_chunks()
    if pa.types.is_dictionary(keys.type):
        keys = keys.dictionary_decode()
    try:
        encoded = pc.dictionary_encode(keys, null_encoding="encode")
    except (pa.ArrowNotImplementedError, pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        logger.debug("cannot partition by key column %r of type %s (%s); "
                     "running the stage on one agent", column, keys.type, exc)
        return [table]
    assignment = encoded.indices.to_numpy(zero_copy_only=False) % parts
    result = []
    for part in range(parts):
        rows = np.flatnonzero(assignment == part)
        if len(rows):
            result.append(table.take(pa.array(rows)))
    return result


def combine(tables: list[pa.Table]) -> pa.Table:
    """Concatenate partition outputs in partition order, without copying.

    Each column has one chunk per partition with output rows, where
    ``collect()`` gives one chunk in all; the values are the same.
    """
    filled = [table for table in tables if table.num_rows]
    if not filled:
        return tables[0] if tables else pa.table({})
    if len(filled) == 1:
        return filled[0]
    try:
        return pa.concat_tables(filled)
    except pa.ArrowInvalid as exc:
        schemas = "; ".join(f"partition {i}: {t.schema.to_string(show_schema_metadata=False)}"
                            .replace("\n", ", ") for i, t in enumerate(filled))
        raise DataflowError(
            f"the agents' outputs have different schemas, so they cannot be "
            f"concatenated ({schemas}). Make the pipeline return the same column types "
            f"for every input, for example by casting inside map()."
        ) from exc


def check_same_schema(batches: list[pa.RecordBatch]) -> pa.Schema:
    """Return the batches' common schema; raise SchemaError naming the first difference."""
    schema = batches[0].schema
    for index, batch in enumerate(batches):
        if not batch.schema.equals(schema):
            raise SchemaError(
                f"input batch {index} has schema {batch.schema} but batch 0 has {schema}; "
                f"a job's input batches must share one schema. Cast them first, or use "
                f"Stream.from_table() on one table."
            )
    return schema
