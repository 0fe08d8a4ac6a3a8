"""Checkpoint and backup sources of expert tensors: kept as the import path earlier releases used (see elastic_ep.checkpoint)."""

from .checkpoint import *  # noqa: F401,F403
from .checkpoint import __all__  # noqa: F401
