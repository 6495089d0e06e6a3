"""The Sabot app: configuration, dataflow registry and lifecycle."""

from sabot.app.base import Sabot
from sabot.app.dataflow import Dataflow
from sabot.app.settings import Settings

__all__ = ["Dataflow", "Sabot", "Settings"]
