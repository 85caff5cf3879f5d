"""GLUE for the examples and benchmarks: the data from local files or the Hub (``data``) and the metrics
computed offline (``metrics``). The trainers never import it."""

from . import data, metrics
from .data import *  # noqa: F403
from .metrics import *  # noqa: F403

__all__ = [*data.__all__, *metrics.__all__]
