"""What the controller answers its callers about the cluster: status, committed view, start and verify results."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import numpy as np


class ReadAsDict:
    """``result["key"]`` reads ``result.to_dict()["key"]``: results that were dicts once stay readable as dicts
    (backward compatibility; new code reads attributes)."""

    def __getitem__(self, key: str):
        return self.to_dict()[key]

    def to_dict(self) -> dict:
        """The JSON-friendly form (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


@dataclass(frozen=True)
class StartReport(ReadAsDict):
    """What ``ElasticEPCluster.start()`` did: seconds per part, bytes read and backed up.

    resumed: the controller was already started (e.g. it restarted and resumed): nothing was started.
    """

    start_s: float = 0.0
    load_s: float = 0.0  # every rank reading its slots from the checkpoint
    backup_s: float = 0.0  # host backups made
    backup_bytes: int = 0
    group_s: float = 0.0  # the first communicator generation formed
    checkpoint_bytes: int = 0
    resumed: bool = False


@dataclass(frozen=True)
class BadSlot:
    """One slot that failed ``verify``: why is "wrong expert" or "fingerprint mismatch"."""

    rank: int
    layer: int
    slot: int
    why: str
    expert: Optional[int] = None  # the logical expert the layout puts there (fingerprint mismatches)


@dataclass(frozen=True)
class VerifyResult(ReadAsDict):
    """``ElasticEPCluster.verify()``: every live slot's fingerprint against its logical expert's reference.

    bad: the first 20 bad slots (num_bad counts all); ranks_unreachable: members that did not answer.
    """

    ok: bool
    slots_checked: int
    bad: tuple[BadSlot, ...]
    num_bad: int
    ranks_unreachable: tuple[int, ...]
    epoch: int


@dataclass(frozen=True)
class ClusterStatus:
    """A snapshot of one cluster. ``ElasticEPCluster.status()`` returns ``to_dict()`` of it:

    epoch: version of the committed layout; generation: communicator generation.
    ranks: {rank: worker id} (dead members stay until replaced); spares: [worker id].
    dead: [worker id] every worker seen dead; death_times: {worker id: wall clock noticed}.
    lost: [(layer, expert)] with no copy anywhere; unserved: [(layer, expert)] no live rank holds now.
    backed_up: experts with a host backup; spares_prepared / members_prepared: {worker id: the fields of
    its elastic_ep.replies.PreparedBackups as a dict, "preparing", or the error}. node_ids: {logical node: Ray node id};
    rank_nodes: {rank: logical node}; layout: ExpertLayout.to_dict() of the committed layout.
    last_error: why the last reconfiguration could not be done (None once one succeeds).
    restarts: controller restarts; busy: a reconfiguration runs; load_reports: reports in the window.
    history: the last reconfiguration reports (dicts); workers: one record per worker (WorkerRecord dicts).
    expert_format: {bundle tensor name: [dtype, shape]} of one expert (scales and biases included).
    shared_experts: {"per_layer": n, "managed": False}: shared experts stay with the serving engine.
    """

    epoch: int
    generation: int
    ranks: dict[int, str]
    spares: list[str]
    dead: list[str]
    lost: list[tuple[int, int]]
    unserved: list[tuple[int, int]]
    death_times: dict[str, float]
    backed_up: int
    spares_prepared: dict[str, Any]
    members_prepared: dict[str, Any]
    node_ids: dict[int, str]
    last_error: Optional[str]
    rank_nodes: dict[int, int]
    layout: Optional[dict]
    restarts: int
    busy: bool
    load_reports: int
    history: list[dict] = field(default_factory=list)
    workers: list[dict] = field(default_factory=list)
    expert_format: dict[str, list] = field(default_factory=dict)
    shared_experts: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict:
        """The documented dict shape (the class docstring), as status() callers read it."""
        return asdict(self)


@dataclass(frozen=True)
class CommittedView:
    """The layout in force and who serves it, for a serving engine (read-only).

    phy2log: [num_layers, num_physical_slots], the logical expert of each slot; slot p
    belongs to the (p // slots_per_rank)-th rank in ascending rank order (ranks are the
    keys of ``workers`` plus ``dead_ranks``). workers: rank -> live worker ActorHandle.
    dead_ranks: ranks whose worker is dead (their slots are unserved until recovery commits).
    """

    epoch: int
    phy2log: np.ndarray
    slots_per_rank: int
    workers: dict[int, Any]
    dead_ranks: tuple[int, ...]

    @property
    def ranks(self) -> tuple[int, ...]:
        """Rank id at each rank position of ``phy2log``: [num_physical_slots // slots_per_rank]."""
        return tuple(sorted(set(self.workers) | set(self.dead_ranks)))

    @property
    def num_layers(self) -> int:
        return int(self.phy2log.shape[0])
