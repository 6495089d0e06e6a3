from collections.abc import Sequence
from typing import Any

from sabot.ext._protocols import RecordColumns

def record_columns(records: Sequence[Any], join_values: bool = ...) -> RecordColumns: ...
