"""The changelog: how a store's changes are written to Kafka and read back.

Each store has one compacted topic, ``{app_id}-{store}-changelog``, with as
many partitions as its source topic; source partition *p* logs to changelog
partition *p*. Records of one source partition, for one batch:

    key                                  value                     header sabot.offset
    topic NUL [fixed-width keys] key     msgpack map of the row    applied source offset
    topic NUL [fixed-width keys] key     None (tombstone)          applied source offset
    NUL "meta" NUL topic                 msgpack map (schema...)   applied source offset
    ... after the batch's sink sends and these records are acknowledged:
    NUL "applied" NUL topic              msgpack {"offset": n}     n

A row's key bytes are the store's key columns: every column after the first
as 8 big-endian bytes (window starts), then the first column's bytes as the
sink would send them. Special records start with NUL, which a topic name
cannot contain.

The "applied" marker is written only after everything the batch produced
(sink messages, changes, late records) was acknowledged. On restore, the
highest marker over the pipeline's stores is the applied offset *A*.
Changes tagged with an offset at or below *A* are kept, the last per key
winning. Later ones come from a batch cut short by a crash, so they are
dropped, and restore writes the kept value (or a tombstone) for their keys
again. That keeps the log correct once newer markers pass their tag.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from sabot import ext
from sabot.state.base import Changes, Store
from sabot.stream.operators import key_to_binary

logger = logging.getLogger(__name__)

OFFSET_HEADER = "sabot.offset"
#: Topic configs of every changelog topic. The compaction lag keeps a crashed
#: batch's records from replacing older values before restore can drop them.
CHANGELOG_CONFIG = {"cleanup.policy": "compact", "min.compaction.lag.ms": "3600000"}

_META = b"meta"
_APPLIED = b"applied"
_FENCE = b"fence"


def changelog_topic(app_id: str, store: str) -> str:
    return f"{app_id}-{store}-changelog"


def special_key(kind: bytes, source_topic: str) -> bytes:
    return b"\x00" + kind + b"\x00" + source_topic.encode()


@dataclass
class Record:
    """One changelog record to send: key, value (None deletes) and headers."""

    key: bytes
    value: bytes | None
    headers: list[tuple[str, bytes]]


# -- writing -----------------------------------------------------------------------------


def row_keys(rows: pa.Table, key_columns: tuple[str, ...], source_topic: str) -> list[bytes]:
    """Return the changelog record key of each row, built column-wise."""
    parts: list[Any] = [pa.scalar(source_topic.encode() + b"\x00", type=pa.binary())]
    for name in key_columns[1:]:
        values = pc.fill_null(rows.column(name).combine_chunks().cast(pa.int64()), 0)
        data = values.to_numpy().astype(">i8").tobytes()
        fixed = pa.FixedSizeBinaryArray.from_buffers(pa.binary(8), len(values),
                                                     [None, pa.py_buffer(data)])
        parts.append(fixed.cast(pa.binary()))
    parts.append(key_to_binary(rows.column(key_columns[0]).combine_chunks()))
    joined = pc.binary_join_element_wise(*parts, pa.scalar(b"", type=pa.binary()))
    return joined.to_pylist()


def change_records(store: Store, changes: Changes, source_topic: str,
                   offset: int) -> list[Record]:
    """Encode a batch's changes and the store's meta, all tagged with ``offset``."""
    tag = [(OFFSET_HEADER, str(offset).encode())]
    records: list[Record] = []
    if changes.upserts is not None and changes.upserts.num_rows:
        upserts = changes.upserts.combine_chunks()
        keys = row_keys(upserts, store.key_columns, source_topic)
        values = ext.encode_msgpack_rows(upserts.to_batches()[0]) if upserts.num_rows else []
        records.extend(Record(k, v, tag) for k, v in zip(keys, values, strict=True))
    if changes.deletes is not None and changes.deletes.num_rows:
        keys = row_keys(changes.deletes, store.key_columns, source_topic)
        records.extend(Record(k, None, tag) for k in keys)
    records.append(meta_record(store, source_topic, offset))
    return records


def meta_record(store: Store, source_topic: str, offset: int) -> Record:
    schema = store.schema()
    meta = {"store": store.meta(),
            "schema": schema.serialize().to_pybytes() if schema is not None else None}
    return Record(special_key(_META, source_topic), msgpack.packb(meta),
                  [(OFFSET_HEADER, str(offset).encode())])


def applied_record(source_topic: str, offset: int) -> Record:
    return Record(special_key(_APPLIED, source_topic), msgpack.packb({"offset": offset}),
                  [(OFFSET_HEADER, str(offset).encode())])


def fence_record(source_topic: str) -> Record:
    return Record(special_key(_FENCE, source_topic), b"", [])


# -- reading -----------------------------------------------------------------------------


@dataclass
class StoreLog:
    """The records of one store for one source topic, in log order."""

    keys: list[bytes] = field(default_factory=list)
    values: list[bytes | None] = field(default_factory=list)
    tags: list[int] = field(default_factory=list)
    metas: list[tuple[int, bytes]] = field(default_factory=list)
    applied: int = -1

    def add(self, record: Any, source_topic: str) -> None:
        """Add one aiokafka ConsumerRecord read from the changelog partition."""
        key: bytes = record.key or b""
        prefix = source_topic.encode() + b"\x00"
        if key.startswith(b"\x00"):
            kind, _, topic = key[1:].partition(b"\x00")
            if topic.decode(errors="replace") != source_topic:
                return
            if kind == _META:
                self.metas.append((_tag(record), record.value))
            elif kind == _APPLIED:
                self.applied = max(self.applied, msgpack.unpackb(record.value)["offset"])
            return
        if not key.startswith(prefix):
            return
        self.keys.append(key)
        self.values.append(record.value)
        self.tags.append(_tag(record))


@dataclass
class Restored:
    """A store's state rebuilt from its changelog, and the records that fix the log."""

    rows: pa.Table
    meta: dict[str, Any]
    corrections: list[Record]


def rebuild(log: StoreLog, applied: int) -> Restored:
    """Keep the changes tagged at or below ``applied``, the last one per key."""
    tags = np.asarray(log.tags, dtype=np.int64)
    valid = tags <= applied
    meta: dict[str, Any] = {}
    schema = None
    for tag, value in reversed(log.metas):
        if tag <= applied:
            unpacked = msgpack.unpackb(value)
            meta = unpacked.get("store") or {}
            if unpacked.get("schema"):
                schema = pa.ipc.read_schema(pa.py_buffer(unpacked["schema"]))
            break

    last: dict[bytes, bytes | None] = {}
    for key, value, ok in zip(log.keys, log.values, valid, strict=True):
        if ok:
            last[key] = value
    corrections = []
    dropped = {key for key, ok in zip(log.keys, valid, strict=True) if not ok}
    for key in dropped:
        # A record of an unfinished batch: put back the value that counts.
        corrections.append(Record(key, last.get(key), [(OFFSET_HEADER, str(applied).encode())]))

    values = [value for value in last.values() if value is not None]
    if schema is None:
        if values:
            logger.warning("changelog contains %d rows but no metadata record with their "
                           "schema; the store starts empty", len(values))
        return Restored(pa.table({}), meta, corrections)
    rows = [msgpack.unpackb(value, timestamp=3) for value in values]
    table = pa.Table.from_pylist(rows, schema=schema)
    return Restored(table, meta, corrections)


def _tag(record: Any) -> int:
    for name, value in record.headers or ():
        if name == OFFSET_HEADER:
            return int(value)
    return -1
