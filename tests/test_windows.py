"""Windowed aggregation in local mode, checked against DuckDB over the same rows.

The oracle computes each row's watermark: the max event time of the rows up
to it (in input order) minus the allowed lateness. It drops the (row,
window) pairs whose window ended at or before that watermark and groups
what is left with SQL. The Sabot operator must give the same rows.
"""

from __future__ import annotations

import doctest
import math
from datetime import timedelta

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from sabot import ConfigError, SchemaError, Stream, hopping, session, tumbling
from sabot.stream.windows import Aggregation, parse_duration

ALL_AGGS = dict(n=("v", "count"), total=("v", "sum"), mean=("v", "mean"), lo=("v", "min"),
                hi=("v", "max"), first_s=("s", "first"), last_s=("s", "last"),
                distinct_s=("s", "count_distinct"), rows=("*", "count"))

ORACLE_AGGS = """count(v) AS n, sum(v) AS total, avg(v) AS mean, min(v) AS lo, max(v) AS hi,
    arg_min(s, seq) FILTER (WHERE s IS NOT NULL) AS first_s,
    arg_max(s, seq) FILTER (WHERE s IS NOT NULL) AS last_s,
    count(DISTINCT s) AS distinct_s, count(*) AS rows"""


def oracle_windows(table: pa.Table, size: int, step: int, lateness: int,
                   aggs: str = ORACLE_AGGS, key: str = "k", time: str = "t",
                   part: str | None = None) -> list[dict]:
    """Windows of ``table`` by DuckDB; ``seq`` orders rows within a partition.

    ``time`` is epoch milliseconds (BIGINT). With ``part``, watermarks are
    per value of that column, as Sabot keeps them per source partition.
    """
    by_part = f"PARTITION BY {part}" if part else ""
    con = duckdb.connect()
    con.register("src", table)
    rows = con.sql(f"""
        WITH marked AS (
            SELECT *, max({time}) OVER ({by_part} ORDER BY seq ROWS BETWEEN UNBOUNDED
                                        PRECEDING AND CURRENT ROW) - {lateness} AS wm
            FROM src WHERE {key} IS NOT NULL AND {time} IS NOT NULL),
        pairs AS (
            SELECT marked.*, g * {step} AS window_start FROM marked, LATERAL (
                SELECT unnest(generate_series(
                    CAST(floor(({time} - {size}) / {step}) AS BIGINT) + 1,
                    CAST(floor({time} / {step}) AS BIGINT))) AS g))
        SELECT {key} AS key, window_start, {aggs}
        FROM pairs WHERE window_start + {size} > wm
        GROUP BY {key}, window_start ORDER BY window_start, {key}""").to_arrow_table()
    return rows.to_pylist()


def oracle_late_count(table: pa.Table, size: int, step: int, lateness: int,
                      part: str | None = None) -> int:
    by_part = f"PARTITION BY {part}" if part else ""
    con = duckdb.connect()
    con.register("src", table)
    return con.sql(f"""
        WITH marked AS (
            SELECT *, max(t) OVER ({by_part} ORDER BY seq ROWS BETWEEN UNBOUNDED PRECEDING
                                   AND CURRENT ROW) - {lateness} AS wm
            FROM src WHERE k IS NOT NULL AND t IS NOT NULL)
        SELECT count(*) FROM marked
        WHERE floor(t / {step}) * {step} + {size} <= wm""").fetchall()[0][0]


def epoch_ms(value) -> int:
    return round(value.timestamp() * 1000)


def assert_rows_equal(got: list[dict], expected: list[dict], columns: list[str],
                      key: str = "k") -> None:
    """Match rows by (key, window start) and compare each column; floats to 1e-9."""
    by_window = {(row[key], epoch_ms(row["window_start"])): row for row in got}
    assert len(by_window) == len(got), "a (key, window) was emitted twice"
    assert sorted(by_window) == sorted((row["key"], row["window_start"]) for row in expected)
    for row in expected:
        out = by_window[(row["key"], row["window_start"])]
        for column in columns:
            assert values_equal(out[column], row[column]), \
                f"{column} of {row['key']}@{row['window_start']}: {out[column]} != {row[column]}"


def values_equal(left, right) -> bool:
    if isinstance(left, float) or isinstance(right, float):
        if left is None or right is None:
            return left is None and right is None
        return math.isclose(left, right, rel_tol=1e-9, abs_tol=1e-9)
    return left == right


def random_events(n: int = 4000, seed: int = 7, disorder_ms: int = 120_000) -> pa.Table:
    """Events over an hour, out of order by up to ``disorder_ms``, with some nulls."""
    rng = np.random.default_rng(seed)
    times = np.sort(rng.integers(0, 3_600_000, n)) + 1_700_000_000_000
    times = times + rng.integers(-disorder_ms, disorder_ms // 2 + 1, n)
    keys = rng.choice(["a", "b", "c", "d", "e"], n).astype(object)
    values = rng.normal(size=n).round(2)
    values[rng.random(n) < 0.1] = np.nan
    labels = [f"x{i % 7}" if i % 5 else None for i in range(n)]
    return pa.table({"seq": np.arange(n), "k": pa.array(keys), "t": pa.array(times),
                     "v": pa.array(values, from_pandas=True), "s": pa.array(labels)})


def run_window(table: pa.Table, window, lateness="1m", batch_size: int = 333, **aggs):
    stream = (Stream.from_table(table, batch_size=batch_size).key_by("k")
              .window(window, time="t", allowed_lateness=lateness)
              .agg(**(aggs or ALL_AGGS)))
    return stream.collect().to_pylist()


def compiled(table: pa.Table, window, lateness="1m", batch_size=333, emit="final", **aggs):
    """Run a pipeline by hand; return its output batches and the window operator."""
    stream = (Stream.from_table(table).key_by("k")
              .window(window, time="t", allowed_lateness=lateness, emit=emit)
              .agg(**(aggs or {"n": ("*", "count")})))
    pipeline = stream.compile()
    outputs = []
    for batch in table.to_batches(max_chunksize=batch_size):
        outputs.extend(pipeline.process(batch))
    return outputs, pipeline.operators[-1], pipeline


# -- results equal the oracle ---------------------------------------------------------------


@pytest.mark.parametrize("batch_size", [1, 97, 5000])
def test_tumbling_equals_duckdb(batch_size):
    table = random_events(1500 if batch_size == 1 else 4000)
    got = run_window(table, tumbling("5m"), "1m", batch_size)
    expected = oracle_windows(table, 300_000, 300_000, 60_000)
    assert len(expected) > 40
    assert_rows_equal(got, expected, list(ALL_AGGS))


def test_hopping_equals_duckdb():
    table = random_events()
    got = run_window(table, hopping("5m", "1m"), "30s")
    expected = oracle_windows(table, 300_000, 60_000, 30_000)
    assert_rows_equal(got, expected, list(ALL_AGGS))


def test_hopping_with_uneven_step_equals_duckdb():
    table = random_events(seed=3)
    got = run_window(table, hopping("5m", "2m"), "1m", n=("*", "count"), total=("v", "sum"))
    expected = oracle_windows(table, 300_000, 120_000, 60_000,
                              aggs="count(*) AS n, sum(v) AS total")
    assert_rows_equal(got, expected, ["n", "total"])


def test_window_bounds_and_output_columns():
    table = random_events(500)
    out = (Stream.from_table(table).key_by("k")
           .window(tumbling("5m"), time="t").agg(n=("*", "count")).collect())
    assert out.schema.names == ["k", "window_start", "window_end", "n", "_key"]
    assert out.schema.field("window_start").type == pa.timestamp("ms", tz="UTC")
    for row in out.to_pylist():
        assert epoch_ms(row["window_start"]) % 300_000 == 0
        assert epoch_ms(row["window_end"]) - epoch_ms(row["window_start"]) == 300_000
        assert row["_key"] == row["k"]


def test_results_do_not_depend_on_batching():
    table = random_events(3000, seed=11, disorder_ms=600_000)
    runs = [run_window(table, tumbling("2m"), "1m", size) for size in (1, 50, 3000)]
    first, *others = [sorted(run, key=lambda r: (epoch_ms(r["window_start"]), r["k"]))
                      for run in runs]
    for other in others:
        assert len(other) == len(first)
        for left, right in zip(first, other, strict=True):
            # Float sums may differ in the last bits: batching changes the
            # order of additions.
            assert all(values_equal(left[c], right[c]) for c in left), (left, right)


# -- watermarks, lateness, emission -----------------------------------------------------------


@pytest.mark.parametrize("window,size,step", [(tumbling("5m"), 300_000, 300_000),
                                              (hopping("5m", "1m"), 300_000, 60_000)])
def test_late_records_counted_exactly(window, size, step):
    table = random_events(disorder_ms=900_000)
    expected = oracle_late_count(table, size, step, 60_000)
    assert expected > 50
    _, operator, _ = compiled(table, window)
    assert operator.context.late_count == expected


def test_window_emitted_once_when_watermark_passes_end():
    base = 1_700_000_000_000 - 1_700_000_000_000 % 60_000
    table = pa.table({"k": ["a", "a", "b", "a", "a"],
                      "t": [base + 1_000, base + 30_000, base + 59_000, base + 64_000,
                            base + 70_001]})
    stream = (Stream.from_table(table).key_by("k")
              .window(tumbling("1m"), time="t", allowed_lateness="10s")
              .agg(n=("*", "count")))
    pipeline = stream.compile()
    emitted = []
    for batch in table.to_batches(max_chunksize=1):
        emitted.append(pa.Table.from_batches(out) if (out := pipeline.process(batch))
                       else None)
    # Watermark = max time - 10 s reaches the first window's end (base + 60 s)
    # only with the row at base + 70.001 s.
    assert emitted[:4] == [None, None, None, None]
    assert emitted[4].to_pylist() == [
        {"k": "a", "window_start": emitted[4]["window_start"][0].as_py(),
         "window_end": emitted[4]["window_end"][0].as_py(), "n": 2, "_key": "a"},
        {"k": "b", "window_start": emitted[4]["window_start"][1].as_py(),
         "window_end": emitted[4]["window_end"][1].as_py(), "n": 1, "_key": "b"}]
    assert epoch_ms(emitted[4]["window_start"][0].as_py()) == base
    # Only the open window is left in memory.
    store = pipeline.operators[-1].store
    assert sorted(store.windows) == [base + 60_000]
    assert pa.Table.from_batches(pipeline.flush()).column("n").to_pylist() == [2]


def test_state_holds_only_open_windows():
    table = random_events(4000, disorder_ms=0)
    _, operator, _ = compiled(table, tumbling("1m"), lateness="0s", batch_size=200)
    store = operator.store
    watermark = store.max_time
    assert len(store.windows) <= 2
    assert all(start + 60_000 > watermark for start in store.windows)


def test_emit_update_sends_running_values_then_final():
    base = 1_700_000_040_000 - 1_700_000_040_000 % 60_000
    table = pa.table({"k": ["a", "a", "a", "a"],
                      "t": [base + 1_000, base + 2_000, base + 3_000, base + 61_000],
                      "x": [1, 2, 3, 4]})
    outputs, _, _ = compiled(table, tumbling("1m"), lateness=0, batch_size=1, emit="update",
                             total=("x", "sum"))
    rows = pa.Table.from_batches(outputs).to_pylist()
    first_window = [(r["total"], r["final"]) for r in rows
                    if epoch_ms(r["window_start"]) == base]
    assert first_window == [(1, False), (3, False), (6, False), (6, True)]
    second = [(r["total"], r["final"]) for r in rows
              if epoch_ms(r["window_start"]) == base + 60_000]
    assert second == [(4, False)]


def test_drop_late_counts_without_keeping_rows():
    table = random_events(disorder_ms=900_000)
    stream = (Stream.from_table(table).key_by("k")
              .window(tumbling("5m"), time="t", allowed_lateness="1m").drop_late()
              .agg(n=("*", "count")))
    pipeline = stream.compile()
    for batch in table.to_batches(max_chunksize=500):
        pipeline.process(batch)
    context = pipeline.operators[-1].context
    assert context.late_count == oracle_late_count(table, 300_000, 300_000, 60_000)
    assert context.dropped_late_count == context.late_count


# -- sessions -------------------------------------------------------------------------------


def oracle_sessions(table: pa.Table, gap: int, lateness: int) -> list[dict]:
    con = duckdb.connect()
    con.register("src", table)
    return con.sql(f"""
        WITH marked AS (
            SELECT *, max(t) OVER (ORDER BY seq ROWS BETWEEN UNBOUNDED PRECEDING
                                   AND CURRENT ROW) - {lateness} AS wm
            FROM src WHERE k IS NOT NULL),
        kept AS (SELECT * FROM marked WHERE t + {gap} > wm),
        flagged AS (SELECT *, CASE WHEN t - lag(t) OVER (PARTITION BY k ORDER BY t, seq)
                                        < {gap} THEN 0 ELSE 1 END AS new_session FROM kept),
        numbered AS (SELECT *, sum(new_session) OVER (PARTITION BY k ORDER BY t, seq)
                               AS session FROM flagged)
        SELECT k AS key, min(t) AS window_start, max(t) + {gap} AS window_end,
               count(*) AS n, sum(v) AS total, count(DISTINCT s) AS distinct_s
        FROM numbered GROUP BY k, session ORDER BY window_start, k""").to_arrow_table().to_pylist()


def session_events(n: int, seed: int, disorder_ms: int) -> pa.Table:
    rng = np.random.default_rng(seed)
    gaps = rng.exponential(20_000, n).astype(np.int64)
    times = np.cumsum(gaps) + 1_700_000_000_000
    if disorder_ms:
        times = times + rng.integers(-disorder_ms, 1, n)
    keys = rng.choice(["a", "b", "c"], n)
    values = rng.integers(0, 100, n)
    labels = [f"x{i % 4}" for i in range(n)]
    return pa.table({"seq": np.arange(n), "k": keys, "t": times, "v": values, "s": labels})


@pytest.mark.parametrize("batch_size", [1, 64, 2000])
def test_sessions_in_order_equal_duckdb(batch_size):
    table = session_events(2000, seed=5, disorder_ms=0)
    out = (Stream.from_table(table, batch_size=batch_size).key_by("k")
           .window(session("1m"), time="t")
           .agg(n=("*", "count"), total=("v", "sum"), distinct_s=("s", "count_distinct"))
           .collect().to_pylist())
    expected = oracle_sessions(table, 60_000, 0)
    assert len(expected) > 100
    assert_rows_equal(out, expected, ["n", "total", "distinct_s"])
    for row in out:
        match = next(e for e in expected if e["key"] == row["k"]
                     and e["window_start"] == epoch_ms(row["window_start"]))
        assert epoch_ms(row["window_end"]) == match["window_end"]


def test_sessions_out_of_order_equal_duckdb():
    table = session_events(2000, seed=9, disorder_ms=200_000)
    out = (Stream.from_table(table, batch_size=2000).key_by("k")
           .window(session("1m"), time="t", allowed_lateness="30s")
           .agg(n=("*", "count"), total=("v", "sum"), distinct_s=("s", "count_distinct"))
           .collect().to_pylist())
    expected = oracle_sessions(table, 60_000, 30_000)
    assert_rows_equal(out, expected, ["n", "total", "distinct_s"])


def test_session_merges_two_sessions_bridged_by_one_event():
    table = pa.table({"k": ["a", "a", "a"], "t": [0, 100, 50]})  # epoch seconds
    stream = (Stream.from_table(table, batch_size=1).key_by("k")
              .window(session(seconds=60), time="t", allowed_lateness="1h")
              .agg(n=("*", "count")))
    pipeline = stream.compile()
    for batch in table.to_batches(max_chunksize=1):
        assert pipeline.process(batch) == []
    assert pipeline.operators[-1].store.rows.num_rows == 1
    rows = pa.Table.from_batches(pipeline.flush()).to_pylist()
    assert [(epoch_ms(r["window_start"]), epoch_ms(r["window_end"]), r["n"])
            for r in rows] == [(0, 160_000, 3)]


# -- input handling -------------------------------------------------------------------------


def test_null_key_and_time_are_dead_letters():
    table = pa.table({"k": ["a", None, "a", "b"], "t": [10, 20, None, 30], "x": [1, 2, 3, 4]})
    stream = (Stream.from_table(table).key_by("k")
              .window(tumbling("1m"), time="t").agg(total=("x", "sum")))
    pipeline = stream.compile()
    pipeline.process(table.to_batches()[0])
    rows = pa.Table.from_batches(pipeline.flush()).select(["k", "total"]).to_pylist()
    assert rows == [{"k": "a", "total": 1}, {"k": "b", "total": 4}]
    context = pipeline.operators[-1].context
    assert context.dead_letter_count == 2


@pytest.mark.parametrize("times", [
    pa.array([1_700_000_000, 1_700_000_030, 1_700_000_090]),  # epoch seconds
    pa.array([1_700_000_000_000, 1_700_000_030_000, 1_700_000_090_000]),  # epoch ms
    pa.array([1_700_000_000.0, 1_700_000_030.5, 1_700_000_090.0]),  # float seconds
    pa.array(["2023-11-14T22:13:20Z", "2023-11-14T22:13:50Z", "2023-11-14T22:14:50Z"]),
    pa.array([1_700_000_000_000, 1_700_000_030_000, 1_700_000_090_000],
             pa.int64()).cast(pa.timestamp("ms", "UTC")).cast(pa.timestamp("ns", "UTC")),
])
def test_time_column_types(times):
    table = pa.table({"k": ["a", "a", "a"], "t": times})
    out = (Stream.from_table(table).key_by("k").window(tumbling("1m"), time="t")
           .agg(n=("*", "count")).collect())
    assert [(epoch_ms(r["window_start"]), r["n"]) for r in out.to_pylist()] == [
        (1_699_999_980_000, 2), (1_700_000_040_000, 1)]


def test_naive_timestamps_stay_naive():
    times = pa.array([0, 90_000], pa.int64()).cast(pa.timestamp("ms"))
    out = (Stream.from_table(pa.table({"k": ["a", "a"], "t": times})).key_by("k")
           .window(tumbling("1m"), time="t").agg(n=("*", "count")).collect())
    assert out.schema.field("window_start").type == pa.timestamp("ms")


def test_types_widen_across_batches():
    batches = [pa.record_batch({"k": ["a"], "t": [10], "x": pa.array([1], pa.int64())}),
               pa.record_batch({"k": ["a"], "t": [20], "x": pa.nulls(1)}),
               pa.record_batch({"k": ["a"], "t": [30], "x": pa.array([2.5])})]
    out = (Stream.from_batches(batches).key_by("k").window(tumbling("1m"), time="t")
           .agg(total=("x", "sum"), lo=("x", "min"), n=("x", "count"),
                d=("x", "count_distinct"), m=("x", "mean"))
           .collect().to_pylist())
    assert len(out) == 1
    assert (out[0]["total"], out[0]["lo"], out[0]["n"], out[0]["d"], out[0]["m"]) == \
        (3.5, 1.0, 2, 2, 1.75)


def test_missing_time_column_names_columns():
    table = pa.table({"k": ["a"], "x": [1]})
    stream = (Stream.from_table(table).key_by("k").window(tumbling("1m"), time="when")
              .agg(n=("*", "count")))
    with pytest.raises(SchemaError, match="'when' not found"):
        stream.collect()


def test_custom_aggregation_per_window():
    table = random_events(2000)
    squares = Aggregation(initial=0.0, update=_add_squares, type=pa.float64())
    got = run_window(table, tumbling("5m"), "1m", squares=("v", squares))
    expected = oracle_windows(table, 300_000, 300_000, 60_000,
                              aggs="coalesce(sum(v * v), 0.0) AS squares")
    assert_rows_equal(got, expected, ["squares"])


def _add_squares(acc: float, values: pa.Array) -> float:
    return acc + (pc.sum(pc.multiply(values, values)).as_py() or 0.0)


def test_custom_aggregation_merges_sessions():
    total = Aggregation(initial=0, update=lambda acc, v: acc + pc.sum(v).as_py(),
                        merge=lambda a, b: a + b)
    table = pa.table({"k": ["a", "a", "a"], "t": [0, 100, 50], "x": [1, 2, 4]})
    out = (Stream.from_table(table, batch_size=1).key_by("k")
           .window(session("1m"), time="t", allowed_lateness="1h")
           .agg(total=("x", total)).collect().to_pylist())
    assert [r["total"] for r in out] == [7]


# -- configuration --------------------------------------------------------------------------


def test_durations():
    assert parse_duration("10s") == 10_000
    assert parse_duration("1h30m") == 5_400_000
    assert parse_duration("250ms") == 250
    assert parse_duration(timedelta(days=1)) == 86_400_000
    assert parse_duration(3) == 3000
    assert tumbling(hours=1).size == 3_600_000
    assert hopping("1h", "15m").step == 900_000
    assert session(minutes=30).gap == 1_800_000


@pytest.mark.parametrize("call", [
    lambda: tumbling("ten seconds"),
    lambda: tumbling("0s"),
    lambda: tumbling(),
    lambda: tumbling("1h", hours=1),
    lambda: hopping("1m", "2m"),
    lambda: session(lightyears=1),
    lambda: parse_duration(-1),
])
def test_invalid_durations_raise(call):
    with pytest.raises(ConfigError):
        call()


def test_window_needs_keyed_stream():
    with pytest.raises(ConfigError, match="key_by"):
        Stream.from_table(pa.table({"t": [1]})).window(tumbling("1m"), time="t")


@pytest.mark.parametrize("aggs,match", [
    ({"n": ("x", "median")}, "unknown function"),
    ({"n": "x"}, "pair"),
    ({"window_start": ("x", "sum")}, "taken"),
    ({"k": ("x", "sum")}, "taken"),
    ({"n": ("*", "sum")}, "only with 'count'"),
])
def test_invalid_aggregations_raise(aggs, match):
    windowed = Stream.from_table(pa.table({"k": ["a"], "t": [1], "x": [1]})) \
        .key_by("k").window(tumbling("1m"), time="t")
    with pytest.raises(ConfigError, match=match):
        windowed.agg(**aggs)


def test_session_custom_aggregation_needs_merge():
    windowed = Stream.from_table(pa.table({"k": ["a"], "t": [1], "x": [1]})) \
        .key_by("k").window(session("1m"), time="t")
    with pytest.raises(ConfigError, match="merge"):
        windowed.agg(total=("x", Aggregation(initial=0, update=lambda a, v: a)))


@pytest.mark.parametrize("module", ["sabot.stream.windows", "sabot.stream.aggregates",
                                    "sabot.state.table"])
def test_docstring_examples_run(module):
    import importlib

    result = doctest.testmod(importlib.import_module(module),
                             optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0
    assert result.failed == 0


def test_unreadable_text_times_are_dead_letters():
    times = pa.array(["2023-11-14T22:13:20Z", "yesterday", "2023-11-14T22:13:50Z", None])
    table = pa.table({"k": ["a", "a", "a", "a"], "t": times})
    stream = (Stream.from_table(table).key_by("k").window(tumbling("1m"), time="t")
              .agg(n=("*", "count")))
    pipeline = stream.compile()
    pipeline.process(table.to_batches()[0])
    assert pa.Table.from_batches(pipeline.flush()).column("n").to_pylist() == [2]
    assert pipeline.operators[-1].context.dead_letter_count == 2
