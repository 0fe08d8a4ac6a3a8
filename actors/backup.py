"""BackupStore actor: host-memory copies of experts in the Ray object store, owned away from the workers."""

from __future__ import annotations

from typing import Optional

import numpy as np
import ray
import torch

INGEST_CHUNK_BYTES = 1 << 30  # bytes of experts a worker exports per call while backups are made


def from_host_array(a: np.ndarray) -> torch.Tensor:
    """An expert's byte row from the object store as a CPU tensor, zero-copy (read-only: copy before writing)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # non-writable buffers from the object store are fine to read
        return torch.from_numpy(a)


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

    def ingest(self, worker, keys: list[tuple[int, int]], timeout_s: float, chunk_bytes: int = INGEST_CHUNK_BYTES,
               expert_bytes: int = 1) -> int:
        """Copy experts from a live worker into this store; returns bytes stored.

        Exports run in chunks of about ``chunk_bytes``, the next one exported while
        this store copies the last, so host memory in flight stays bounded.
        """
        keys = [(int(l), int(e)) for l, e in keys if (int(l), int(e)) not in self._refs]
        if not keys:
            return 0
        per_chunk = max(1, chunk_bytes // max(1, expert_bytes))
        chunks = [keys[i: i + per_chunk] for i in range(0, len(keys), per_chunk)]
        added = 0
        pending = worker.export_experts.remote(chunks[0])
        for i in range(len(chunks)):
            exported = ray.get(pending, timeout=timeout_s)
            pending = worker.export_experts.remote(chunks[i + 1]) if i + 1 < len(chunks) else None
            for layer, expert, row in exported:  # row: the expert's whole bundle, uint8 bytes
                key = (int(layer), int(expert))
                # Put by this actor, so owned by it: readers map them zero-copy from shared memory.
                self._refs[key] = ray.put(row)
                self._sizes[key] = row.nbytes
                added += self._sizes[key]
            del exported
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
