"""State stores and the changelog record format, without a broker.

What crosses Kafka (restore on assignment, crashes) is tested against the
broker in test_windows_kafka.py and test_table.py. These tests check the
stores' batch operations, and the encoding and rebuilding of changelog
records, on their own.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pytest

from sabot import SchemaError, Stream, tumbling
from sabot.state.base import Changes
from sabot.state.changelog import StoreLog, applied_record, change_records, rebuild, row_keys
from sabot.state.memory import MemoryStore
from sabot.state.windowed import SessionStore, WindowStore


@dataclass
class FakeRecord:
    """The fields of an aiokafka ConsumerRecord that restore reads."""

    key: bytes
    value: bytes | None
    headers: list
    offset: int


def as_log(records, source_topic: str = "src") -> StoreLog:
    log = StoreLog()
    for offset, record in enumerate(records):
        log.add(FakeRecord(record.key, record.value, record.headers, offset), source_topic)
    return log


# -- memory store ---------------------------------------------------------------------------


def test_memory_store_put_get_delete():
    store = MemoryStore("t", "user")
    store.put({"user": ["a", "b", "a"], "n": [1, 2, 3]})
    assert store.get(["a", "b", "c"]).to_pylist() == [
        {"user": "a", "n": 3}, {"user": "b", "n": 2}, {"user": "c", "n": None}]
    store.put(pa.table({"user": ["b"], "n": [20]}))
    store.delete(["a", "zzz"])
    assert store.to_table().to_pylist() == [{"user": "b", "n": 20}]
    assert len(store) == 1


def test_memory_store_drain_reports_final_state_per_key():
    store = MemoryStore("t", "user")
    store.put({"user": ["a", "b"], "n": [1, 2]})
    store.drain()
    store.put({"user": ["a"], "n": [5]})
    store.delete(["b"])
    store.put({"user": ["c"], "n": [7]})
    store.delete(["c"])
    changes = store.drain()
    assert changes.upserts.to_pylist() == [{"user": "a", "n": 5}]
    assert sorted(changes.deletes.column("user").to_pylist()) == ["b", "c"]
    assert not store.drain()


def test_memory_store_rejects_null_keys():
    store = MemoryStore("t", "user")
    with pytest.raises(SchemaError, match="null"):
        store.put({"user": ["a", None], "n": [1, 2]})
    with pytest.raises(SchemaError, match="key column"):
        store.put({"name": ["a"]})


def test_memory_store_widens_types():
    store = MemoryStore("t", "k")
    store.put({"k": [1], "x": pa.array([1], pa.int64())})
    store.put({"k": [2], "x": [2.5]})
    assert store.to_table().schema.field("x").type == pa.float64()


# -- window stores --------------------------------------------------------------------------


def test_window_store_drain_and_purge():
    store = WindowStore("w")
    rows = pa.table({"key": ["a", "b"], "n": [1, 2]})
    store.set_window(0, rows, rows)
    store.set_window(60_000, rows.slice(0, 1), rows.slice(0, 1))
    changes = store.drain()
    assert sorted(zip(changes.upserts.column("key").to_pylist(),
                      changes.upserts.column("window_start").to_pylist(), strict=True)) == \
        [("a", 0), ("a", 60_000), ("b", 0)]
    assert changes.deletes is None

    store.set_window(0, rows, rows)
    assert store.pop_window(0).num_rows == 2
    changes = store.drain()
    # A window emitted in the same batch it changed leaves only its deletes.
    assert changes.upserts is None
    assert sorted(changes.deletes.column("key").to_pylist()) == ["a", "b"]
    assert list(store.windows) == [60_000]


def test_session_store_drain_keeps_latest_live_sessions():
    store = SessionStore("s")
    first = pa.table({"key": ["a"], "window_start": [0], "window_end": [10], "n": [1]})
    store.replace(removed=None, kept=None, added=first)
    moved = pa.table({"key": ["a"], "window_start": [-5], "window_end": [10], "n": [2]})
    store.replace(removed=first, kept=None, added=moved)
    changes = store.drain()
    assert changes.upserts.to_pylist() == moved.to_pylist()
    assert changes.deletes.to_pylist() == [{"key": "a", "window_start": 0}]


# -- changelog records ----------------------------------------------------------------------


def test_row_keys_are_distinct_and_stable():
    rows = pa.table({"key": ["a", "a", "ab", "b"], "window_start": [0, 60_000, 0, -1]})
    keys = row_keys(rows, ("key", "window_start"), "src")
    assert len(set(keys)) == 4
    assert keys == row_keys(rows, ("key", "window_start"), "src")
    assert all(k.startswith(b"src\x00") for k in keys)
    assert row_keys(rows, ("key", "window_start"), "other") != keys


def test_changes_round_trip_with_types():
    store = WindowStore("w")
    rows = pa.table({
        "key": ["a", "b"],
        "n": pa.array([1, 2], pa.int64()),
        "mean.sum": [1.5, float("nan")],
        "first": ["x", None],
        "d": pa.array([[1, 2], []], pa.list_(pa.int64())),
        "when": pa.array([1_000, 2_000], pa.int64()).cast(pa.timestamp("ms", "UTC")),
        "custom": pa.array([b"\x80\x04", None], pa.binary()),
    })
    store.set_window(60_000, rows, rows)
    store.max_time = 123_456
    store.time_type = "UTC"
    records = change_records(store, store.drain(), "src", offset=41)
    records.append(applied_record("src", 41))

    restored = rebuild(as_log(records), applied=41)
    assert restored.corrections == []
    assert restored.meta == {"max_time": 123_456, "time_type": "UTC"}
    table = restored.rows.sort_by("key")
    assert table.schema == store.schema()
    expected = rows.add_column(1, "window_start", pa.array([60_000, 60_000]))
    assert table.drop_columns(["mean.sum"]).equals(expected.drop_columns(["mean.sum"]))
    assert table.column("mean.sum")[0].as_py() == 1.5
    assert np.isnan(table.column("mean.sum")[1].as_py())

    fresh = WindowStore("w")
    fresh.restore(restored.rows, restored.meta)
    assert list(fresh.windows) == [60_000]
    assert fresh.max_time == 123_456


def test_unfinished_batch_is_dropped_and_corrected():
    store = MemoryStore("t", "user")
    store.put({"user": ["a", "b"], "n": [1, 2]})
    records = change_records(store, store.drain(), "src", offset=10)
    records.append(applied_record("src", 10))
    # Batch at offset 20: its changes were written, its marker never was.
    store.put({"user": ["a", "c"], "n": [100, 300]})
    store.delete(["b"])
    records.extend(change_records(store, store.drain(), "src", offset=20))

    log = as_log(records)
    assert log.applied == 10
    restored = rebuild(log, log.applied)
    assert sorted(restored.rows.to_pylist(), key=lambda r: r["user"]) == [
        {"user": "a", "n": 1}, {"user": "b", "n": 2}]
    by_key = {record.key: record.value for record in restored.corrections}
    assert len(by_key) == 3
    keys = row_keys(pa.table({"user": ["a", "b", "c"]}), ("user",), "src")
    assert by_key[keys[2]] is None  # c did not exist: a tombstone
    assert by_key[keys[0]] is not None and by_key[keys[1]] is not None

    # After the corrections, a later marker past offset 20 keeps the old values.
    later = records + restored.corrections + [applied_record("src", 30)]
    again = rebuild(as_log(later), 30)
    assert sorted(again.rows.to_pylist(), key=lambda r: r["user"]) == [
        {"user": "a", "n": 1}, {"user": "b", "n": 2}]


def test_records_of_other_source_topics_are_ignored():
    store = MemoryStore("t", "user")
    store.put({"user": ["a"], "n": [1]})
    records = change_records(store, store.drain(), "other", offset=5)
    records.append(applied_record("other", 5))
    log = as_log(records, source_topic="src")
    assert log.applied == -1
    assert log.keys == []


def test_restore_with_no_changelog_is_empty():
    restored = rebuild(StoreLog(), -1)
    assert restored.rows.num_rows == 0
    assert restored.meta == {}


def test_restored_window_state_continues_counting():
    base = 1_700_000_000_000 - 1_700_000_000_000 % 60_000
    table = pa.table({"k": ["a", "a", "b", "a"],
                      "t": [base + 1_000, base + 2_000, base + 3_000, base + 65_000]})
    stream = (Stream.from_table(table).key_by("k")
              .window(tumbling("1m"), time="t").agg(n=("*", "count")))
    first = stream.compile()
    first.process(table.slice(0, 3).to_batches()[0])
    store = first.operators[-1].store
    records = change_records(store, store.drain(), "src", offset=2)
    records.append(applied_record("src", 2))
    restored = rebuild(as_log(records), 2)

    second = stream.compile()
    operator = second.operators[-1]
    operator._context()  # binds a local context and creates the store
    operator.store.restore(restored.rows, restored.meta)
    out = pa.Table.from_batches(second.process(table.slice(3).to_batches()[0]))
    assert out.select(["k", "n"]).to_pylist() == [{"k": "a", "n": 2}, {"k": "b", "n": 1}]


def test_empty_changes_are_falsy():
    assert not Changes()
    assert Changes(upserts=pa.table({"k": [1]}))


def test_keys_on_a_foreign_partition_are_reported(caplog):
    from aiokafka import TopicPartition

    from sabot import ext
    from sabot.state.context import StateContext

    keys = pa.array([f"user-{i}" for i in range(40)])
    partitions = np.asarray(ext.partitions_for_keys(keys.cast(pa.binary()), 4))
    own = keys.filter(pa.array(partitions == 0))
    foreign = keys.filter(pa.array(partitions != 0))

    context = StateContext("flow", TopicPartition("src", 0), num_partitions=4)
    context.check_partitioning(own)
    assert context.misrouted_count == 0
    context.check_partitioning(pa.concat_arrays([own, foreign.slice(0, 2)]))
    assert context.misrouted_count == 2
    assert "hash to other partitions of src" in caplog.text
