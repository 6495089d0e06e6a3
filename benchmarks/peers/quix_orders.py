"""The benchmark's stateless pipeline written idiomatically in Quix Streams.

Reads JSON orders, keeps those with an amount above 50, adds
total = amount * quantity and sends them on as JSON. After COUNT messages
it prints one line, ``rate <msgs/s>``, measured from the first message, and
exits. Settings come from the environment: BOOTSTRAP, TOPIC, OUT, GROUP, COUNT.
"""

import os
import sys
import time

from quixstreams import Application

COUNT = int(os.environ["COUNT"])
state = {"seen": 0, "first": None}


def count(order):
    if state["first"] is None:
        state["first"] = time.monotonic()
    state["seen"] += 1
    if state["seen"] >= COUNT:
        elapsed = time.monotonic() - state["first"]
        print(f"rate {state['seen'] / elapsed:.1f}", flush=True)
        sys.stdout.flush()
        os._exit(0)


def main():
    app = Application(
        broker_address=os.environ["BOOTSTRAP"],
        consumer_group=os.environ["GROUP"],
        auto_offset_reset="earliest",
        consumer_extra_config={"session.timeout.ms": 6000},
        state_dir=os.environ.get("STATE_DIR", "state"),
    )
    orders = app.topic(os.environ["TOPIC"], value_deserializer="json")
    big_orders = app.topic(os.environ["OUT"], value_serializer="json")
    sdf = app.dataframe(orders)
    sdf = sdf.update(count)
    sdf = sdf.filter(lambda order: order["amount"] > 50)
    sdf["total"] = sdf["amount"] * sdf["quantity"]
    sdf.to_topic(big_orders)
    app.run()


if __name__ == "__main__":
    main()
