"""What a worker answers the controller: one small frozen dataclass per worker call (no Ray, no torch).

Arrays are CPU numpy arrays, never tensors, so a reply pickles alike on CPU and GPU
hosts. ``L`` is the number of MoE layers, ``S`` the slots per rank, ``E`` the logical
experts per layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np


@dataclass(frozen=True)
class WorkerPing:
    """``ExpertWorker.ping``: who and where the worker is, and what it is doing.

    rank: the rank it serves (None: a spare); epoch: its committed layout version (-1: empty,
    e.g. just restarted by Ray). node_id: Ray node id; gpus: the GPU ids Ray gave it.
    busy: what its data path runs now (None: idle); groups: communicator groups it is in.
    prepared_backups: host backups it has mapped ahead of a takeover.
    """

    worker_id: str
    rank: Optional[int]
    epoch: int
    pid: int = 0
    node_id: str = ""
    gpus: tuple[str, ...] = ()
    busy: Optional[str] = None
    groups: tuple[str, ...] = ()
    prepared_backups: int = 0


@dataclass(frozen=True)
class Loaded:
    """``ExpertWorker.load``: fingerprints [L, S] int64 of the slots read from the checkpoint."""

    fingerprints: np.ndarray
    bytes_read: int
    load_s: float = 0.0


@dataclass(frozen=True)
class Staged:
    """``ExpertWorker.execute``: one rank's part of a plan staged (live weights untouched until commit).

    staged: (layer, slot, expert, fingerprint) of every staged slot, sorted.
    timings_s: seconds per executor phase (setup, exchange, transfer, execute, fingerprint, ...).
    bytes_received counts relayed storage reads too; bytes_from_* are what this rank read itself.
    """

    worker_id: str
    epoch: int
    staged: tuple[tuple[int, int, int, int], ...]
    timings_s: dict[str, float] = field(default_factory=dict)
    bytes_sent: int = 0
    bytes_received: int = 0
    bytes_from_backup: int = 0
    bytes_from_checkpoint: int = 0


@dataclass(frozen=True)
class Committed:
    """``ExpertWorker.commit``: seconds the swap took and how many slots changed."""

    commit_s: float
    slots: int


@dataclass(frozen=True)
class SlotFingerprints:
    """``ExpertWorker.fingerprints``: experts [L, S] (-1: empty slot) and their fingerprints [L, S] int64."""

    rank: Optional[int]
    epoch: int
    experts: np.ndarray
    fingerprints: np.ndarray


@dataclass(frozen=True)
class ServedLoad:
    """``ExpertWorker.take_load``: tokens served since the last call.

    experts: [L, S] the expert each slot holds now; tokens: [L, S] tokens each slot served;
    expert_tokens: [L, E] tokens counted before a commit changed the slots, folded per expert.
    """

    rank: Optional[int]
    experts: np.ndarray
    tokens: np.ndarray
    expert_tokens: Optional[np.ndarray] = None


@dataclass(frozen=True)
class PreparedBackups:
    """``ExpertWorker.prepare_backups``: host backups mapped (and page-locked on a GPU) ahead of need.

    pin_error: why page-locking failed (they are still mapped, copied at pageable speed), else None.
    """

    experts: int
    pinned_bytes: int
    pin_error: Optional[str]
    seconds: float
