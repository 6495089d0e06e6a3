"""Flights that left New York in 2013, processed as a stream.

Run it against a broker that has the flights in a ``flights`` topic (JSON,
keyed by carrier); ``make demo`` sets all of that up:

    sabot worker -A examples.flights --broker kafka://127.0.0.1:9092
"""

import pyarrow.compute as pc

from sabot import Sabot, Stream

# A 6 s session timeout is Kafka's minimum, and shortens group joins on the
# embedded broker, which delays a join by half the session timeout.
app = Sabot("flights", session_timeout_ms=6000, progress_interval=2)


@app.dataflow("flights", sink="delayed-flights")
def delayed(stream: Stream) -> Stream:
    """Flights that departed more than an hour late, keyed by carrier."""
    return (stream
            .filter(lambda batch: pc.greater(batch["dep_delay"], 60))
            .select("carrier", "flight", "origin", "dest", "sched_dep", "dep_delay")
            .key_by("carrier"))
