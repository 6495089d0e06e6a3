"""Run a coroutine on uvloop until SIGINT or SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable

logger = logging.getLogger(__name__)


def new_event_loop() -> asyncio.AbstractEventLoop:
    """Return a uvloop event loop where uvloop is installed, else asyncio's."""
    try:
        import uvloop
    except ImportError:
        logger.debug("uvloop is not installed; using the asyncio event loop")
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def run_until_signal(main: Callable[[asyncio.Event], Awaitable[None]]) -> None:
    """Run ``main(stop)`` to completion; SIGINT and SIGTERM set ``stop``.

    A second signal while stopping is logged and otherwise ignored, so
    in-flight batches can still be committed.
    """
    loop = new_event_loop()
    asyncio.set_event_loop(loop)
    stop = asyncio.Event()
    received: list[int] = []

    def on_signal(signum: int) -> None:
        name = signal.Signals(signum).name
        if received:
            logger.warning("received %s again; already stopping", name)
        else:
            logger.info("received %s; stopping", name)
        received.append(signum)
        stop.set()

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, on_signal, signum)
    try:
        loop.run_until_complete(main(stop))
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()
        asyncio.set_event_loop(None)
