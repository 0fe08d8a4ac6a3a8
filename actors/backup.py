"""BackupStore actor: host-memory copies of experts in the Ray object store, owned away from the workers."""

from __future__ import annotations

from typing import Optional

import numpy as np
import ray
import torch

_BITS = {2: torch.int16, 4: torch.int32}
_FLOAT = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def to_host_array(t: torch.Tensor) -> np.ndarray:
    """A CPU tensor's raw bits as a numpy array (bf16 has no numpy dtype)."""
    return t.contiguous().view(_BITS[t.element_size()]).numpy()


def from_host_array(a: np.ndarray, dtype: str) -> torch.Tensor:
    """Inverse of ``to_host_array``, zero-copy (read-only memory stays read-only: copy before writing)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # non-writable buffers from the object store are fine to read
        return torch.from_numpy(a).view(_FLOAT[dtype])


class BackupStore:
    """Holds one host copy of each (layer, expert) it was given, as objects it owns.

    The objects are put by this actor, so their owner is this actor (not the worker
    they came from): a worker's death loses no backup. On a multi-node cluster the
    controller places the backup of an expert on a node other than its holders'.
    """

    def __init__(self, node_index: int = 0):
        self.node_index = node_index
        self._refs: dict[tuple[int, int], ray.ObjectRef] = {}
        self._sizes: dict[tuple[int, int], int] = {}

    def ping(self) -> dict:
        return {"node_index": self.node_index, "num_experts": len(self._refs), "bytes": sum(self._sizes.values())}

    def ingest(self, worker, keys: list[tuple[int, int]], timeout_s: float) -> int:
        """Copy experts from a live worker into this store; returns bytes stored."""
        keys = [(int(l), int(e)) for l, e in keys if (int(l), int(e)) not in self._refs]
        if not keys:
            return 0
        exported = ray.get(worker.export_experts.remote(keys), timeout=timeout_s)
        added = 0
        for key, (w13, w2) in exported.items():
            key = (int(key[0]), int(key[1]))
            # Stored as raw-bit numpy arrays: readers map them zero-copy from shared memory.
            self._refs[key] = ray.put((to_host_array(w13), to_host_array(w2)))
            self._sizes[key] = w13.numel() * w13.element_size() + w2.numel() * w2.element_size()
            added += self._sizes[key]
        return added

    def keys(self) -> list[tuple[int, int]]:
        return sorted(self._refs)

    def refs(self, keys: list[tuple[int, int]]) -> dict:
        """ObjectRefs of the requested backups that this store has (missing keys are left out)."""
        wanted = [(int(l), int(e)) for l, e in keys]
        return {k: self._refs[k] for k in wanted if k in self._refs}

    def drop(self, keys: Optional[list[tuple[int, int]]] = None) -> None:
        for k in list(self._refs) if keys is None else [(int(l), int(e)) for l, e in keys]:
            self._refs.pop(k, None)
            self._sizes.pop(k, None)
