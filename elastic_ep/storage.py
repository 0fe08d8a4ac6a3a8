"""Checkpoint and backup sources of expert tensors: kept as the import path earlier releases used (see elastic_ep.checkpoint)."""

from .checkpoint import __all__, __getattr__  # noqa: F401 - every name resolves lazily from elastic_ep.checkpoint
