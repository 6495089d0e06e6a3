"""Keyed state stores and their changelog topics.

``base`` defines the store interface, ``memory`` the in-memory keyed table,
``windowed`` the stores of window operators, ``changelog`` the record
format, ``context`` what an operator sees of its pipeline, ``manager`` the
runtime side (restore, logging, markers), and ``table`` the ``app.table()``
API.
"""

from sabot.state.base import Changes, Store
from sabot.state.memory import MemoryStore
from sabot.state.table import Table, TablePartition

__all__ = ["Changes", "MemoryStore", "Store", "Table", "TablePartition"]
