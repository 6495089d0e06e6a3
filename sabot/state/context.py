"""The context of a stateful operator: its stores and its side outputs.

The Kafka runtime compiles one pipeline per dataflow and source partition
and binds one :class:`StateContext` to its stateful operators (those with
``stateful = True``) by calling ``operator.bind(context)``. Through it an
operator registers its stores, sends late records and dead letters, and
learns which partition it runs on. In local mode (``Stream.collect()``) an
operator makes its own context, which keeps no side outputs and only counts
them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from sabot import ext
from sabot.state.base import Store
from sabot.stream.operators import key_to_binary

logger = logging.getLogger(__name__)


@dataclass
class SideOutput:
    """Rows an operator set aside: late records or dead letters.

    ``reasons`` has one text per row; ``watermarks`` (late records only)
    the watermark each row was compared with, in epoch milliseconds.
    """

    rows: pa.Table
    reasons: list[str]
    watermarks: np.ndarray | None = None


class StateContext:
    """The app as one pipeline's stateful operators see it.

    ``tp`` is the source TopicPartition and ``num_partitions`` its topic's
    partition count; both are None in local mode. ``applied_offset`` is the
    last source offset whose effects the stores hold (-1 for none).
    """

    def __init__(self, dataflow: str = "local", tp=None, num_partitions: int | None = None,
                 keep_side_outputs: bool = False):
        self.dataflow = dataflow
        self.tp = tp
        self.num_partitions = num_partitions
        self.keep_side_outputs = keep_side_outputs
        self.stores: list[Store] = []
        self.applied_offset = -1
        #: Whether the first batch after the restore was checked against it.
        self.resumed = False
        self.late_count = 0
        self.dropped_late_count = 0
        self.dead_letter_count = 0
        self.misrouted_count = 0
        self.late: list[SideOutput] = []
        self.dead_letters: list[SideOutput] = []
        self._reported = (0, 0, 0)
        self._kinds: dict[str, int] = {}
        self._verified_keys: pa.Array | None = None
        self._warned: set[str] = set()

    @property
    def where(self) -> str:
        """Name the pipeline for log lines and errors: dataflow and partition."""
        if self.tp is None:
            return "local mode" if self.dataflow == "local" else f"{self.dataflow!r} (local)"
        return f"{self.dataflow!r} on {self.tp.topic}[{self.tp.partition}]"

    # -- stores --------------------------------------------------------------------------

    def store_name(self, kind: str) -> str:
        """Return a store name for an operator of ``kind``: ``{dataflow}-{kind}``, numbered
        from the second store of the same kind in the pipeline."""
        count = self._kinds.get(kind, 0) + 1
        self._kinds[kind] = count
        base = f"{self.dataflow}-{kind}"
        return base if count == 1 else f"{base}-{count}"

    def add_store(self, store: Store) -> None:
        if any(existing.name == store.name for existing in self.stores):
            raise ValueError(f"two stores named {store.name!r} in dataflow {self.dataflow!r}")
        self.stores.append(store)

    # -- side outputs --------------------------------------------------------------------

    def send_late(self, rows: pa.Table, watermarks: np.ndarray, drop: bool) -> None:
        """Count records that arrived after their windows closed; keep them unless ``drop``."""
        count = rows.num_rows
        self.late_count += count
        if drop:
            self.dropped_late_count += count
        elif self.keep_side_outputs:
            reasons = ["late"] * count
            self.late.append(SideOutput(rows, reasons, watermarks))
        self._warn_once("late", "%s: %d late records (%s); counting further ones quietly",
                        self.where, count, "dropped" if drop or not self.keep_side_outputs
                        else "sent to the late topic")

    def send_dead_letters(self, rows: pa.Table, reason: str) -> None:
        """Count rows an operator cannot process; keep them for the dead-letter topic."""
        self.dead_letter_count += rows.num_rows
        if self.keep_side_outputs:
            self.dead_letters.append(SideOutput(rows, [reason] * rows.num_rows))
        self._warn_once(reason, "%s: %d rows set aside: %s", self.where, rows.num_rows, reason)

    def take_side_outputs(self) -> tuple[list[SideOutput], list[SideOutput]]:
        late, dead = self.late, self.dead_letters
        self.late, self.dead_letters = [], []
        return late, dead

    def take_counts(self) -> tuple[int, int, int]:
        """Return late, dropped late and dead-letter rows counted since the last call."""
        now = (self.late_count, self.dropped_late_count, self.dead_letter_count)
        before, self._reported = self._reported, now
        return now[0] - before[0], now[1] - before[1], now[2] - before[2]

    # -- partitioning --------------------------------------------------------------------

    def check_partitioning(self, keys: pa.Array) -> None:
        """Warn once if keys arrive on a partition other than the one their hash gives.

        State is kept per source partition, so a grouping key must always
        arrive on the same partition: the source topic must be keyed by it.
        Each distinct key is checked once, with Kafka's default partitioner
        (murmur2 of the key's bytes as the sink writes them).
        """
        if self.tp is None or not self.num_partitions or "partitioning" in self._warned:
            return
        unique = pc.unique(keys)
        if self._verified_keys is not None:
            unique = unique.filter(pc.invert(pc.is_in(unique, value_set=self._verified_keys)))
        if not len(unique):
            return
        partitions = np.asarray(ext.partitions_for_keys(key_to_binary(unique),
                                                        self.num_partitions))
        wrong = np.flatnonzero(partitions != self.tp.partition)
        if len(wrong):
            self.misrouted_count += len(wrong)
            examples = unique.take(pa.array(wrong[:3])).to_pylist()
            self._warned.add("partitioning")
            logger.warning(
                "%s: keys such as %s hash to other partitions of %s, so their windows and "
                "tables are split across partitions and each part is emitted on its own. "
                "Produce the source topic keyed by the grouping column (for example with a "
                "dataflow that ends in key_by() and writes to a new topic).",
                self.where, examples, self.tp.topic)
            return
        self._verified_keys = unique if self._verified_keys is None else \
            pa.concat_arrays([self._verified_keys, unique.cast(self._verified_keys.type)])

    def log_totals(self) -> None:
        """Log how many records were late or dead letters in all; called at end of input."""
        if self.late_count or self.dead_letter_count:
            logger.warning("%s: %d late records in all (%d dropped), %d dead letters",
                           self.where, self.late_count,
                           self.late_count if not self.keep_side_outputs
                           else self.dropped_late_count,
                           self.dead_letter_count)

    def _warn_once(self, topic: str, message: str, *args) -> None:
        if topic in self._warned:
            return
        self._warned.add(topic)
        logger.warning(message, *args)
