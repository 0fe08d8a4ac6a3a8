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
    from safetensors import safe_open

    from elastic_ep.storage import CheckpointReader

    if cfg.checkpoint is None:
        raise CheckpointError("ClusterConfig.checkpoint is None: the first weights are loaded from a checkpoint")
    spec = cfg.model
    reader = CheckpointReader(cfg.checkpoint, spec, cfg.preset)
    reader.validate()  # every expert tensor is named by the index
    want_dtype = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}[spec.dtype]
    shapes = ((spec.intermediate, spec.hidden), (spec.intermediate, spec.hidden), (spec.hidden, spec.intermediate))
    by_file: dict[str, list] = {}
    for layer in range(spec.num_layers):
        for expert in range(spec.num_experts):
            for name, shape in zip(reader.preset.tensor_names(spec.first_layer + layer, expert), shapes):
                by_file.setdefault(reader.weight_map[name], []).append((name, shape))
    for file, tensors in sorted(by_file.items()):
        try:
            with safe_open(str(reader.paths[file]), framework="pt", device="cpu") as f:
                present = set(f.keys())
                for name, shape in tensors:
                    if name not in present:
                        raise CheckpointError(f"tensor {name!r} is listed in the index but missing from {file!r}")
                    sl = f.get_slice(name)
                    got_shape, got_dtype = tuple(sl.get_shape()), sl.get_dtype()
                    if got_shape != shape:
                        raise CheckpointError(f"tensor {name!r} in {file!r} has shape {got_shape}, the model "
                                              f"spec needs {shape}")
                    if got_dtype != want_dtype:
                        raise CheckpointError(f"tensor {name!r} in {file!r} has dtype {got_dtype}, the model "
                                              f"spec needs {want_dtype} ({spec.dtype})")
        except CheckpointError:
            raise
        except Exception as exc:  # safetensors' own errors: truncated, corrupted header, unreadable
            raise CheckpointError(f"cannot read shard {file!r} in {str(reader.root)!r} (truncated or "
                                  f"corrupted?): {type(exc).__name__}: {exc}") from exc
