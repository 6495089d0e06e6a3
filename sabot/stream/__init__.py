"""Streams of Arrow record batches and the operators that transform them."""

from sabot.stream.core import Pipeline, Stream
from sabot.stream.operators import Operator

__all__ = ["Operator", "Pipeline", "Stream"]
