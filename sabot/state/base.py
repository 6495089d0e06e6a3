"""The interface of a state store: keyed rows whose changes go to a changelog.

A store contains the state of one operator for one source partition. The
operator changes it while it processes a batch. After the batch, the runtime
takes the changes with :meth:`Store.drain` and writes them to the store's
changelog topic. When a partition is assigned, the runtime reads the
changelog back and hands the surviving rows to :meth:`Store.restore`.

Rows are identified by the store's key columns. Every row of a store has
the same columns: the key columns first, then the value columns.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import pyarrow as pa


@dataclass
class Changes:
    """What one batch changed in a store.

    ``upserts`` contains the new rows (key and value columns, one row per key),
    ``deletes`` the key columns of the rows removed. A key is in at most one
    of them.
    """

    upserts: pa.Table | None = None
    deletes: pa.Table | None = None

    def __bool__(self) -> bool:
        return bool((self.upserts is not None and self.upserts.num_rows)
                    or (self.deletes is not None and self.deletes.num_rows))


class Store(ABC):
    """Keyed state of one operator for one source partition.

    ``name`` names the changelog topic, ``{app_id}-{name}-changelog``.
    ``key_columns`` identify a row; they are also the changelog record key.
    """

    def __init__(self, name: str, key_columns: tuple[str, ...]):
        self.name = name
        self.key_columns = key_columns

    @abstractmethod
    def drain(self) -> Changes:
        """Return the changes made since the last call and forget them.

        Called by the runtime once after each batch, never while the
        operator is processing one.
        """

    @abstractmethod
    def restore(self, rows: pa.Table, meta: dict[str, Any]) -> None:
        """Replace the content with ``rows`` and ``meta`` read from the changelog.

        The runtime calls it once per partition assignment, before the
        partition's first batch. ``rows``
        has one row per key; ``meta`` is what :meth:`meta` returned when
        those rows were written (empty for a new store).
        """

    @abstractmethod
    def meta(self) -> dict[str, Any]:
        """Return the store's small per-partition values, such as the max event time.

        Written to the changelog with every batch's changes; the values must
        be msgpack-serialisable.
        """

    @abstractmethod
    def schema(self) -> pa.Schema | None:
        """Return the schema of the rows, or None while the store has never held one."""

    def __len__(self) -> int:
        return 0
