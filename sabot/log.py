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
    _format_to_stderr(root)
    # aiokafka logs each rebalance step at INFO; keep its warnings and errors,
    # in the same format as Sabot's own lines.
    client = logging.getLogger("aiokafka")
    client.setLevel(max(level, logging.WARNING))
    _format_to_stderr(client)


def _format_to_stderr(logger: logging.Logger) -> None:
    """Give ``logger`` a formatted stderr handler unless it has handlers already."""
    if logger.handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT, datefmt="%H:%M:%S"))
    logger.addHandler(handler)
    logger.propagate = False
