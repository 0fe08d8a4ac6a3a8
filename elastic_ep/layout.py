"""ExpertLayout: which logical expert every physical slot of every MoE layer holds.

Glossary
--------
logical expert
    One of the model's routed experts, ``0 <= e < num_experts``, per MoE layer.
physical slot
    A place for one expert's weights on one rank. Slots are numbered globally,
    ``0 <= p < num_slots``; slot ``p`` lives on rank position ``p // slots_per_rank``
    at local index ``p % slots_per_rank``.
replica
    A physical slot holding a logical expert. Hot experts get several replicas
    (redundant experts); every logical expert has at least one.
rank
    One expert-parallel worker (one GPU). Ranks carry stable integer ids; the
    layout lists them in position order (``ranks[i]`` owns slots
    ``i*S .. i*S+S-1``). A replacement worker takes over the id of the rank it
    replaces and starts empty.
node
    The machine a rank runs on; transfers prefer sources on the destination's node.
layer
    One MoE layer; every layer has its own placement (hot experts differ by layer).
epoch
    The version of the committed layout and membership; it only moves forward.

Worked example
--------------
DeepSeek-V2-Lite: 26 MoE layers, 64 logical experts, 16 redundant slots over
4 ranks: ``num_slots = 80``, ``slots_per_rank = 20``. ``phy2log[3, 45] = 7``
means that in layer 3, local slot 5 of rank position 2 holds expert 7. If
expert 7 is hot it may also sit at ``phy2log[3, 61]``; then ``logcnt[3, 7] = 2``
and ``log2phy[3, 7, :2] = [45, 61]``. No rank holds two replicas of one expert
in one layer: a second copy on the same GPU adds memory, not throughput.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import numpy as np

from .errors import LayoutError


@dataclass(frozen=True, eq=False)
class ExpertLayout:
    """An immutable placement of logical experts onto physical slots.

    phy2log: [num_layers, num_slots] int64, the logical expert of each slot.
    ranks: rank id of each rank position (``len(ranks) == num_slots // slots_per_rank``).
    rank_nodes: node id of each rank position.
    """

    phy2log: np.ndarray
    slots_per_rank: int
    num_experts: int
    ranks: tuple[int, ...]
    rank_nodes: tuple[int, ...]

    def __post_init__(self) -> None:
        arr = np.asarray(self.phy2log)
        if arr.ndim != 2:
            raise LayoutError(f"phy2log must be [num_layers, num_slots], got shape {arr.shape}")
        if arr.size and not np.issubdtype(arr.dtype, np.integer):
            raise LayoutError(f"phy2log must hold integers, got dtype {arr.dtype}")
        arr = arr.astype(np.int64, copy=True)
        arr.setflags(write=False)
        object.__setattr__(self, "phy2log", arr)
        object.__setattr__(self, "ranks", tuple(int(r) for r in self.ranks))
        object.__setattr__(self, "rank_nodes", tuple(int(n) for n in self.rank_nodes))
        if self.slots_per_rank <= 0:
            raise LayoutError(f"slots_per_rank must be >= 1, got {self.slots_per_rank}")
        if self.num_experts <= 0:
            raise LayoutError(f"num_experts must be >= 1, got {self.num_experts}")
        if arr.shape[0] == 0:
            raise LayoutError("a layout needs at least one layer")
        if arr.shape[1] % self.slots_per_rank:
            raise LayoutError(
                f"num_slots={arr.shape[1]} is not a multiple of slots_per_rank={self.slots_per_rank}"
            )
        if len(self.ranks) != arr.shape[1] // self.slots_per_rank:
            raise LayoutError(
                f"{len(self.ranks)} rank ids given for {arr.shape[1] // self.slots_per_rank} rank positions"
            )
        if len(set(self.ranks)) != len(self.ranks):
            raise LayoutError(f"rank ids must be unique, got {list(self.ranks)}")
        if len(self.rank_nodes) != len(self.ranks):
            raise LayoutError(f"{len(self.rank_nodes)} node ids given for {len(self.ranks)} ranks")
        bad = np.argwhere((arr < 0) | (arr >= self.num_experts))
        if len(bad):
            layer, slot = (int(x) for x in bad[0])
            raise LayoutError(
                f"phy2log[{layer}, {slot}] = {int(arr[layer, slot])} is not a logical expert id "
                f"in [0, {self.num_experts})"
            )
        self._check_no_duplicates()

    # -- construction ------------------------------------------------------------------

    @classmethod
    def round_robin(
        cls,
        num_layers: int,
        num_experts: int,
        ranks: Sequence[int],
        slots_per_rank: int,
        rank_nodes: Optional[Sequence[int]] = None,
    ) -> "ExpertLayout":
        """The start-up layout: slot p holds expert ``p % num_experts`` in every layer."""
        num_slots = len(ranks) * slots_per_rank
        if num_slots < num_experts:
            from .errors import CapacityError

            raise CapacityError(
                f"{len(ranks)} ranks x {slots_per_rank} slots = {num_slots} slots cannot hold "
                f"{num_experts} logical experts"
            )
        row = np.arange(num_slots, dtype=np.int64) % num_experts
        phy2log = np.tile(row, (num_layers, 1))
        nodes = tuple(rank_nodes) if rank_nodes is not None else (0,) * len(ranks)
        return cls(phy2log, slots_per_rank, num_experts, tuple(ranks), nodes)

    # -- shape -------------------------------------------------------------------------

    @property
    def num_layers(self) -> int:
        return int(self.phy2log.shape[0])

    @property
    def num_slots(self) -> int:
        return int(self.phy2log.shape[1])

    @property
    def num_ranks(self) -> int:
        return len(self.ranks)

    def position(self, rank: int) -> int:
        """Rank position of a rank id."""
        try:
            return self.ranks.index(int(rank))
        except ValueError:
            raise LayoutError(f"rank {rank} is not in this layout (ranks {list(self.ranks)})") from None

    def node_of(self, rank: int) -> int:
        return self.rank_nodes[self.position(rank)]

    def rank_view(self) -> np.ndarray:
        """phy2log reshaped per rank: [num_layers, num_ranks, slots_per_rank]."""
        return self.phy2log.reshape(self.num_layers, self.num_ranks, self.slots_per_rank)

    def experts_of(self, rank: int) -> np.ndarray:
        """The experts a rank holds: [num_layers, slots_per_rank]."""
        return self.rank_view()[:, self.position(rank), :]

    # -- derived maps ------------------------------------------------------------------

    @property
    def logcnt(self) -> np.ndarray:
        """Replicas of each logical expert: [num_layers, num_experts]."""
        cnt = np.zeros((self.num_layers, self.num_experts), dtype=np.int64)
        rows = np.repeat(np.arange(self.num_layers), self.num_slots)
        np.add.at(cnt, (rows, self.phy2log.ravel()), 1)
        return cnt

    @property
    def log2phy(self) -> np.ndarray:
        """Slots of each logical expert, padded with -1: [num_layers, num_experts, max_replicas]."""
        cnt = self.logcnt
        width = max(1, int(cnt.max()))
        out = np.full((self.num_layers, self.num_experts, width), -1, dtype=np.int64)
        order = np.argsort(self.phy2log, axis=1, kind="stable")
        for layer in range(self.num_layers):
            experts = self.phy2log[layer, order[layer]]
            starts = np.searchsorted(experts, np.arange(self.num_experts))
            index = np.arange(self.num_slots) - starts[experts]
            out[layer, experts, index] = order[layer]
        return out

    # -- checks ------------------------------------------------------------------------

    def _check_no_duplicates(self) -> None:
        view = np.sort(self.rank_view(), axis=2)
        dup = np.argwhere(view[:, :, 1:] == view[:, :, :-1])
        if len(dup):
            layer, pos, _ = (int(x) for x in dup[0])
            expert = int(view[layer, pos, dup[0][2]])
            raise LayoutError(
                f"rank {self.ranks[pos]} holds two replicas of expert {expert} in layer {layer}"
            )

    def validate(self, live_ranks: Optional[Iterable[int]] = None) -> None:
        """Raise LayoutError unless every expert has a replica on a live rank in every layer."""
        live = set(self.ranks) if live_ranks is None else {int(r) for r in live_ranks}
        mask = np.array([r in live for r in self.ranks], dtype=bool)
        if not mask.any():
            raise LayoutError(f"no live rank among {list(self.ranks)}")
        held = self.rank_view()[:, mask, :].reshape(self.num_layers, -1)
        covered = np.zeros((self.num_layers, self.num_experts), dtype=bool)
        rows = np.repeat(np.arange(self.num_layers), held.shape[1])
        covered[rows, held.ravel()] = True
        missing = np.argwhere(~covered)
        if len(missing):
            pairs = [(int(l), int(e)) for l, e in missing[:10]]
            raise LayoutError(
                f"{len(missing)} (layer, expert) pairs have no replica on a live rank, "
                f"e.g. {pairs}"
            )

    # -- persistence -------------------------------------------------------------------

    def to_dict(self) -> dict:
        return {
            "phy2log": self.phy2log.tolist(),
            "slots_per_rank": self.slots_per_rank,
            "num_experts": self.num_experts,
            "ranks": list(self.ranks),
            "rank_nodes": list(self.rank_nodes),
        }

    @classmethod
    def from_dict(cls, data: dict) -> "ExpertLayout":
        return cls(
            np.asarray(data["phy2log"], dtype=np.int64),
            int(data["slots_per_rank"]),
            int(data["num_experts"]),
            tuple(data["ranks"]),
            tuple(data["rank_nodes"]),
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ExpertLayout):
            return NotImplemented
        return (
            self.slots_per_rank == other.slots_per_rank
            and self.num_experts == other.num_experts
            and self.ranks == other.ranks
            and self.rank_nodes == other.rank_nodes
            and np.array_equal(self.phy2log, other.phy2log)
        )

    def __hash__(self) -> int:
        return hash((self.ranks, self.slots_per_rank, self.phy2log.tobytes()))

    def rank_loads(self, load: np.ndarray) -> np.ndarray:
        """Load each rank serves if tokens split evenly over replicas: [num_layers, num_ranks].

        load: [num_layers, num_experts] tokens routed to each logical expert.
        """
        per_replica = load / np.maximum(self.logcnt, 1)
        slot_load = np.take_along_axis(per_replica, self.phy2log, axis=1)
        return slot_load.reshape(self.num_layers, self.num_ranks, self.slots_per_rank).sum(axis=2)
