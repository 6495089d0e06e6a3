"""Time each compiled kernel against its pure-Python twin and print the ratios.

    .venv/bin/python benchmarks/ext_kernels.py [--rows 100000] [--repeat 5]

The inputs are shaped like the stateless path's: orders with an int64 id,
a float64 amount, a string customer and a timestamp; ConsumerRecords with
JSON values and string keys; the orders' JSON rows joined with newlines.
Each figure is the best of ``--repeat`` runs.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import orjson
import pyarrow as pa
from aiokafka.structs import ConsumerRecord

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sabot.ext import _compiled, _twins  # noqa: E402


def orders(rows: int) -> pa.RecordBatch:
    rng = np.random.default_rng(7)
    return pa.record_batch({
        "id": np.arange(rows, dtype=np.int64),
        "amount": np.round(rng.gamma(2.0, 30.0, rows), 2),
        "customer": pa.array([f"customer-{i}" for i in rng.integers(0, 5000, rows)]),
        "created": pa.array(rng.integers(1_700_000_000, 1_710_000_000, rows),
                            pa.timestamp("s")),
    })


def consumer_records(rows: int) -> list:
    return [ConsumerRecord(topic="orders", partition=0, offset=i, timestamp=1_700_000_000_000 + i,
                           timestamp_type=0, key=b"customer-%d" % (i % 5000),
                           value=orjson.dumps({"id": i, "amount": i * 0.5}), checksum=None,
                           serialized_key_size=13, serialized_value_size=30, headers=[])
            for i in range(rows)]


def best_of(repeat: int, function, *args) -> float:
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        function(*args)
        best = min(best, time.perf_counter() - started)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()

    batch = orders(args.rows)
    selected = batch.select(["id", "amount"])
    records = consumer_records(args.rows)
    keys = batch.column("customer").cast(pa.binary())
    key_list = keys.to_pylist()
    values = _compiled.encode_json_rows(selected)
    rows = np.arange(args.rows, dtype=np.int64)
    # One batch for all rows: the limit is far above their size.
    batch_args = (values, rows, 1_700_000_000_000, 1 << 30)
    # A fetch's values as the JSON codec receives them: joined with newlines.
    joined = b"\n".join(_compiled.encode_json_rows(batch))
    cases = [
        ("encode_json_rows (id, amount)", "encode_json_rows", (selected,)),
        ("encode_json_rows (4 columns)", "encode_json_rows", (batch,)),
        ("encode_msgpack_rows (4 columns)", "encode_msgpack_rows", (batch,)),
        ("record_columns (join values)", "record_columns", (records, True)),
        ("partitions_for_keys (list)", "partitions_for_keys", (key_list, 8)),
        ("partitions_for_keys (Arrow array)", "partitions_for_keys", (keys, 8)),
        ("decode_json_objects (4 columns)", "decode_json_objects", (joined, args.rows)),
        ("encode_record_batch (keys)", "encode_record_batch", (key_list, *batch_args)),
        ("encode_record_batch (no keys)", "encode_record_batch", (None, *batch_args)),
    ]
    print(f"{args.rows:,} rows, best of {args.repeat}")
    print(f"{'kernel':<36} {'twin ms':>9} {'compiled ms':>12} {'speed-up':>9}")
    for label, name, call_args in cases:
        twin = best_of(args.repeat, getattr(_twins, name), *call_args)
        compiled = best_of(args.repeat, getattr(_compiled, name), *call_args)
        print(f"{label:<36} {twin * 1e3:9.1f} {compiled * 1e3:12.1f} {twin / compiled:8.1f}x")


if __name__ == "__main__":
    main()
