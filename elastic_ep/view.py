"""CommittedView: the committed layout and live worker handles a serving call is pinned to."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class CommittedView:
    """One committed epoch as serving sees it (read once per call; never mixed within a call).

    epoch: the committed layout's epoch; every worker of it reports the same epoch.
    phy2log: [num_layers, num_physical_slots] logical expert in each physical slot.
    slots_per_rank: physical slot p belongs to the rank at position ``p // slots_per_rank``.
    workers: rank id -> live worker actor handle.
    dead_ranks: ranks of the layout whose worker is dead (their slots serve nothing).

    Rank positions follow ascending rank id over ``workers`` and ``dead_ranks`` together
    (the controller builds every layout over ``sorted(members)``): see ``ranks``.
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
