"""Turn one partition's fetched records into an Arrow record batch."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa

from sabot import ext
from sabot.codecs import Codec, Decoded, JsonCodec
from sabot.kafka.fetch import PartitionBatch


def build_batch(records: Sequence | PartitionBatch, partition: int,
                codec: Codec) -> tuple[pa.RecordBatch, Decoded, np.ndarray]:
    """Decode ``records`` and add the ``_key``, ``_partition``, ``_offset``, ``_timestamp``
    columns; return the batch, the codec's result and the records' offsets.

    ``records`` is the list of ConsumerRecords of one partition from
    ``getmany``, or the :class:`PartitionBatch` of the Arrow fetcher.
    """
    # The JSON codec reads all values as one newline-separated buffer; the
    # kernel joins them in the same pass that collects the other columns.
    join_values = isinstance(codec, JsonCodec)
    if isinstance(records, PartitionBatch):
        columns = records.columns
        keys, offsets, timestamps = columns.keys, columns.offsets, columns.timestamps
        joined = columns.joined if join_values else None
        # The JSON codec takes the binary array as it is; the others read
        # the values one by one anyway.
        values = columns.values if joined is not None else columns.values.to_pylist()
    else:
        values, keys, offsets, timestamps, joined = ext.record_columns(records, join_values)
    decoded = codec.decode(values, joined=joined) if join_values else codec.decode(values)
    batch = decoded.batch
    rows = decoded.rows_from
    whole = len(rows) == len(records) and not decoded.errors and \
        (len(rows) == 0 or rows[-1] == len(rows) - 1)
    if whole:
        meta_keys, meta_offsets, meta_times = keys, offsets, timestamps
    else:
        take = pa.array(rows, type=pa.int64())
        meta_keys = keys.take(take)
        meta_offsets = offsets[rows]
        meta_times = timestamps.take(take)
    columns = list(batch.columns)
    names = list(batch.schema.names)
    # Metadata columns replace value fields of the same name.
    for name, column in (("_key", meta_keys),
                         ("_partition", pa.array(np.full(len(rows), partition, np.int32))),
                         ("_offset", pa.array(meta_offsets)),
                         ("_timestamp", meta_times)):
        if name in names:
            index = names.index(name)
            del names[index]
            del columns[index]
        names.append(name)
        columns.append(column)
    return pa.RecordBatch.from_arrays(columns, names), decoded, offsets
