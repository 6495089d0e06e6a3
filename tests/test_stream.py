"""Local-mode operators: no broker, no agents."""

from __future__ import annotations

import doctest

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

import sabot.app.base
import sabot.stream.core
from sabot import Stream
from sabot.errors import ConfigError, DataflowError, SchemaError


@pytest.fixture
def orders():
    return pa.table({
        "id": [1, 2, 3, 4, 5],
        "amount": [10.0, 70.0, None, 55.5, 51.0],
        "customer": ["a", "b", "a", None, "c"],
    })


def test_filter_select_collect(orders):
    out = (Stream.from_table(orders, batch_size=2)
           .filter(lambda b: pc.greater(b["amount"], 50))
           .select("id", "amount")
           .collect())
    assert out.column_names == ["id", "amount"]
    assert out.column("id").to_pylist() == [2, 4, 5]


def test_filter_null_mask_drops_row(orders):
    out = Stream.from_table(orders).filter(lambda b: pc.greater(b["amount"], 0)).collect()
    assert 3 not in out.column("id").to_pylist()
    assert out.num_rows == 4


def test_filter_accepts_numpy_and_list_masks(orders):
    numpy_out = Stream.from_table(orders).filter(
        lambda b: np.array([True, False, True, False, True])).collect()
    list_out = Stream.from_table(orders).filter(
        lambda b: [True, False, True, False, True]).collect()
    assert numpy_out.column("id").to_pylist() == [1, 3, 5]
    assert list_out.column("id").to_pylist() == [1, 3, 5]


def test_filter_rejects_non_boolean(orders):
    stream = Stream.from_table(orders).filter(lambda b: b["amount"])
    with pytest.raises(DataflowError, match="boolean array"):
        stream.collect()


def test_filter_rejects_wrong_length(orders):
    stream = Stream.from_table(orders).filter(lambda b: [True])
    with pytest.raises(DataflowError, match="1 values for a batch of 5 rows"):
        stream.collect()


def test_map_replaces_batch(orders):
    def double(batch):
        return batch.set_column(1, "amount", pc.multiply(batch["amount"], 2))

    out = Stream.from_table(orders).map(double).collect()
    assert out.column("amount").to_pylist() == [20.0, 140.0, None, 111.0, 102.0]


def test_map_returning_none_drops_batch(orders):
    assert Stream.from_table(orders).map(lambda b: None).collect().num_rows == 0


def test_map_rejects_other_types(orders):
    with pytest.raises(DataflowError, match="returned dict"):
        Stream.from_table(orders).map(lambda b: {"x": 1}).collect()


def test_with_columns_adds_and_replaces(orders):
    out = (Stream.from_table(orders)
           .with_columns(total=lambda b: pc.multiply(b["amount"], 2),
                         id=lambda b: pc.add(b["id"], 100),
                         source=lambda b: pa.scalar("web"))
           .collect())
    assert out.column_names == ["id", "amount", "customer", "total", "source"]
    assert out.column("id").to_pylist() == [101, 102, 103, 104, 105]
    assert out.column("total").to_pylist()[:3] == [20.0, 140.0, None]
    assert set(out.column("source").to_pylist()) == {"web"}


def test_rename_updates_key(orders):
    stream = Stream.from_table(orders).key_by("customer").rename(customer="buyer")
    assert stream.key == "buyer"
    out = stream.collect()
    assert "buyer" in out.column_names
    assert "customer" not in out.column_names


def test_key_by_sets_key_column_kept_by_select(orders):
    out = Stream.from_table(orders).key_by("customer").select("id").collect()
    assert out.column_names == ["id", "_key"]
    assert out.column("_key").to_pylist() == ["a", "b", "a", None, "c"]


def test_select_missing_column_names_it(orders):
    stream = Stream.from_table(orders).select("id", "amuont")
    with pytest.raises(SchemaError) as info:
        stream.collect()
    message = str(info.value)
    assert "'amuont'" in message
    assert "['id', 'amount', 'customer']" in message


def test_missing_column_in_user_function(orders):
    stream = Stream.from_table(orders).filter(lambda b: pc.greater(b["price"], 1))
    with pytest.raises(SchemaError, match="'price' not found"):
        stream.collect()


@pytest.mark.parametrize("make", [
    lambda s: s.key_by("nope"),
    lambda s: s.rename(nope="x"),
])
def test_missing_column_other_operators(orders, make):
    with pytest.raises(SchemaError, match="'nope'"):
        make(Stream.from_table(orders)).collect()


def test_invalid_arguments_fail_where_written():
    with pytest.raises(ValueError, match="at least one column"):
        Stream().select()
    with pytest.raises(TypeError, match="callable"):
        Stream().filter("amount > 5")
    with pytest.raises(TypeError, match="callable"):
        Stream().with_columns(x=5)


def test_empty_batches_pass_without_calling_user_code():
    calls = []

    def record(batch):
        calls.append(batch.num_rows)
        return pc.greater(batch["x"], 0)

    schema = pa.schema([("x", pa.int64())])
    batches = [pa.RecordBatch.from_pylist([], schema=schema),
               pa.RecordBatch.from_pylist([{"x": 1}, {"x": -1}], schema=schema),
               pa.RecordBatch.from_pylist([], schema=schema)]
    out = Stream.from_batches(batches).filter(record).collect()
    assert out.column("x").to_pylist() == [1]
    assert calls == [2]


def test_empty_input_keeps_schema():
    table = pa.table({"id": pa.array([], pa.int64()), "amount": pa.array([], pa.float64())})
    out = Stream.from_table(table).filter(lambda b: pc.greater(b["amount"], 1)) \
        .select("amount").collect()
    assert out.num_rows == 0
    assert out.column_names == ["amount"]


def test_all_rows_filtered_keeps_schema(orders):
    out = Stream.from_table(orders).filter(lambda b: pc.greater(b["amount"], 1e9)) \
        .select("id").collect()
    assert out.num_rows == 0
    assert out.schema.names == ["id"]


def test_iteration_yields_batches(orders):
    batches = list(Stream.from_table(orders, batch_size=2).select("id"))
    assert [b.num_rows for b in batches] == [2, 2, 1]
    assert all(isinstance(b, pa.RecordBatch) for b in batches)


def test_stream_is_reusable_and_immutable(orders):
    base = Stream.from_table(orders)
    filtered = base.filter(lambda b: pc.greater(b["amount"], 50))
    assert base.collect().num_rows == 5
    assert filtered.collect().num_rows == 3
    assert filtered.collect().num_rows == 3


def test_from_table_rejects_bad_input(orders):
    with pytest.raises(TypeError, match="pyarrow.Table"):
        Stream.from_table([1, 2, 3])
    with pytest.raises(ConfigError, match="batch_size"):
        Stream.from_table(orders, batch_size=0)


def test_stream_without_source_explains():
    with pytest.raises(ConfigError, match="no source"):
        Stream().collect()


def test_from_batches_accepts_tables(orders):
    out = Stream.from_batches([orders, orders]).collect()
    assert out.num_rows == 10


def test_chunked_array_results_accepted(orders):
    table_mask = pa.chunked_array([[True, False, True, False, True]])
    out = Stream.from_table(orders).filter(lambda b: table_mask).collect()
    assert out.num_rows == 3


@pytest.mark.parametrize("module", [sabot.stream.core, sabot.app.base])
def test_docstring_examples(module):
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0
    assert result.failed == 0
