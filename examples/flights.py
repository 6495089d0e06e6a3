"""Flights that left New York in 2013, processed as a stream.

Run it against a broker that has the flights as JSON in a ``flights`` topic
keyed by carrier and in a ``flights-by-origin`` topic keyed by origin
airport; ``make demo`` sets all of that up:

    sabot worker -A examples.flights --broker kafka://127.0.0.1:9092
"""

import pyarrow.compute as pc

from sabot import Sabot, Stream, tumbling

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


@app.dataflow("flights-by-origin", sink="delay-stats")
def hourly_delay(stream: Stream) -> Stream:
    """Flights and mean departure delay per origin airport and scheduled hour.

    Window state is kept per partition, so this dataflow reads the topic
    keyed by origin: all of an airport's flights are on one partition. The
    demo sends each day's flights in order of actual departure, so a flight
    delayed past midnight arrives after flights scheduled up to a day later.
    One day of allowed lateness keeps every such flight in its window.
    """
    return (stream
            .key_by("origin")
            .window(tumbling(hours=1), time="sched_dep", allowed_lateness="1d")
            .agg(flights=("flight", "count"),
                 mean_delay=("dep_delay", "mean"),
                 worst=("dep_delay", "max")))
