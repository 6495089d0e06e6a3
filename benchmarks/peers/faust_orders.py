"""The benchmark's stateless pipeline written idiomatically in Faust.

Reads JSON orders, keeps those with an amount above 50, adds
total = amount * quantity and sends them on as JSON. After COUNT messages
it prints one line, ``rate <msgs/s>``, measured from the first message, and
exits. Settings come from the environment: BOOTSTRAP, TOPIC, OUT, GROUP, COUNT.
"""

import os
import sys
import time

import faust

BOOTSTRAP = os.environ["BOOTSTRAP"]
COUNT = int(os.environ["COUNT"])

app = faust.App(
    os.environ["GROUP"],
    broker=f"kafka://{BOOTSTRAP}",
    value_serializer="json",
    topic_partitions=8,
    consumer_auto_offset_reset="earliest",
    # Tansu delays a group join by half the session timeout; Faust's
    # default of 60 s would spend 30 s joining.
    broker_session_timeout=6.0,
    broker_heartbeat_interval=2.0,
    web_enabled=False,
)
orders = app.topic(os.environ["TOPIC"], value_serializer="json")
big_orders = app.topic(os.environ["OUT"], value_serializer="json")
state = {"seen": 0, "first": None}


@app.agent(orders)
async def process(stream):
    async for order in stream:
        if state["first"] is None:
            state["first"] = time.monotonic()
        state["seen"] += 1
        if order["amount"] > 50:
            order["total"] = order["amount"] * order["quantity"]
            await big_orders.send(key=order["user"], value=order)
        if state["seen"] >= COUNT:
            elapsed = time.monotonic() - state["first"]
            print(f"rate {state['seen'] / elapsed:.1f}", flush=True)
            sys.stdout.flush()
            os._exit(0)


if __name__ == "__main__":
    sys.argv = [sys.argv[0], "worker", "--loglevel", "warn"]
    app.main()
