"""Logging set-up for the command line; the library itself only creates loggers."""

from __future__ import annotations

import logging
import sys

FORMAT = "%(asctime)s %(levelname)-7s [%(process)d] %(name)s: %(message)s"


def configure_logging(level: str | int = "INFO") -> None:
    """Send the ``sabot`` loggers to stderr at ``level``.

    A ``sabot`` logger that already has handlers (set up by the user) is
    left alone apart from its level.
    """
    if isinstance(level, str):
        name = level.upper()
        if name not in logging.getLevelNamesMapping():
            raise ValueError(f"unknown log level {level!r}; use debug, info, warning or error")
        level = logging.getLevelNamesMapping()[name]
    root = logging.getLogger("sabot")
    root.setLevel(level)
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(FORMAT, datefmt="%H:%M:%S"))
        root.addHandler(handler)
        root.propagate = False
    # aiokafka logs each rebalance step at INFO; keep its warnings and errors.
    logging.getLogger("aiokafka").setLevel(max(level, logging.WARNING))
