"""Persistence: the controller's state file (atomic JSON) and the checkpoint check made before any worker starts."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

from elastic_ep.config import ClusterConfig
from elastic_ep.errors import CheckpointError

STATE_VERSION = 3  # controller_state.json: 3 keeps one record per worker instead of membership collections


def save_state(path: Path, state: dict) -> None:
    """Write ``state`` as JSON to ``path`` atomically (write a temp file, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({**state, "version": STATE_VERSION}))
    os.replace(tmp, path)


def load_state(path: Path) -> Optional[dict]:
    """The saved state, or None when there is none (or it is of an older version: start afresh)."""
    if not path.exists():
        return None
    state = json.loads(path.read_text())
    return state if state.get("version") == STATE_VERSION else None


def check_checkpoint(cfg: ClusterConfig) -> None:
    """Fail before starting any worker if the checkpoint cannot give every expert.

    Reads only headers: the index and every shard it names (missing, truncated or
    corrupted files, names escaping the folder), and each expert tensor's presence,
    shape and dtype against the model spec. Raises CheckpointError naming the value.
    """
    from elastic_ep.checkpoint import CheckpointReader

    if cfg.checkpoint is None:
        raise CheckpointError("ClusterConfig.checkpoint is None: the first weights are loaded from a checkpoint")
    # every tensor of every expert's bundle (scales and biases included): named, present, shape, dtype
    CheckpointReader(cfg.checkpoint, cfg.model, cfg.preset).validate()
