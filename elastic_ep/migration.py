"""Layer-by-layer migration: a one-shot target layout cut into steps of a few MoE layers (pure numpy).

A rebalance that moves every layer at once stages every changed slot of the model on
the workers before one commit; a layerwise one commits after each step instead. Step
``k`` moves the layers ``steps[k]``; the layout committed after it, ``layouts[k]``, has
the target's rows for the layers of steps ``0..k`` and the old rows for the rest. Each
row of a valid layout is a valid placement of its layer (every expert held, no rank with
two replicas of one expert), so every intermediate layout is a complete valid layout
with the same ranks, and each serving call (one layer, one epoch) sees one of them.

Only layers whose placement changes get a step; layers are taken in ascending order,
``layers_per_step`` at a time. Example: 26 layers of which 0, 3, 4, 9 and 20 change,
``layers_per_step=2``: steps ``((0, 3), (4, 9), (20,))``, three commits.

Staging memory (``staged_bytes``) is what a rank holds from its transfer until the
commit: the experts it receives (directly or relayed), reads from storage, and copies
within itself; a layerwise migration bounds it by one step's slots. Send messages are
packed per round and relay reads are freed after the transfer, so neither is counted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional

import numpy as np

from .errors import LayoutError
from .layout import ExpertLayout
from .plan import DST, TransferPlan, plan_transfers


@dataclass(frozen=True, eq=False)
class MigrationSchedule:
    """old -> target in ``len(steps)`` commits.

    steps: per step, the MoE layers it moves (ascending; every changed layer in exactly one step).
    layouts: per step, the layout committed after it; ``layouts[-1] == target``.
    """

    old: ExpertLayout
    target: ExpertLayout
    steps: tuple[tuple[int, ...], ...]
    layouts: tuple[ExpertLayout, ...]

    @property
    def num_steps(self) -> int:
        return len(self.steps)

    def before(self, step: int) -> ExpertLayout:
        """The layout committed when ``step`` starts: old for the first, else the previous step's."""
        return self.old if step == 0 else self.layouts[step - 1]


def check_compatible(old: ExpertLayout, target: ExpertLayout) -> None:
    """Raise LayoutError unless ``target`` re-places experts over exactly ``old``'s ranks, slots and layers."""
    same = (old.ranks == target.ranks and old.rank_nodes == target.rank_nodes
            and old.slots_per_rank == target.slots_per_rank and old.num_experts == target.num_experts
            and old.num_layers == target.num_layers)
    if not same:
        raise LayoutError(
            "a layerwise migration needs the same ranks, nodes and geometry before and after: old has ranks "
            f"{list(old.ranks)} on nodes {list(old.rank_nodes)}, {old.num_layers} layers x {old.slots_per_rank} "
            f"slots per rank x {old.num_experts} experts; target has ranks {list(target.ranks)} on nodes "
            f"{list(target.rank_nodes)}, {target.num_layers} x {target.slots_per_rank} x {target.num_experts}")


def changed_layers(old: ExpertLayout, target: ExpertLayout) -> np.ndarray:
    """MoE layers whose placement differs between two compatible layouts: [n] ascending int64."""
    check_compatible(old, target)
    return np.flatnonzero((old.phy2log != target.phy2log).any(axis=1)).astype(np.int64)


def split_layers(layers: Iterable[int], layers_per_step: int) -> tuple[tuple[int, ...], ...]:
    """Consecutive groups of ``layers_per_step`` of ``layers`` (in the order given); the last may be shorter."""
    if isinstance(layers_per_step, bool) or not isinstance(layers_per_step, (int, np.integer)) or layers_per_step < 1:
        raise ValueError(f"layers_per_step must be an int >= 1, got {layers_per_step!r}")
    layers = [int(x) for x in layers]
    return tuple(tuple(layers[i:i + int(layers_per_step)]) for i in range(0, len(layers), int(layers_per_step)))


def blend(old: ExpertLayout, target: ExpertLayout, layers: Iterable[int]) -> ExpertLayout:
    """``old`` with the target's placement for ``layers``: a complete layout (rows are placed per layer)."""
    check_compatible(old, target)
    layers = np.asarray(sorted({int(x) for x in layers}), dtype=np.int64)
    if len(layers) and (layers[0] < 0 or layers[-1] >= old.num_layers):
        raise ValueError(f"layers {layers.tolist()} are not all in [0, {old.num_layers})")
    phy2log = old.phy2log.copy()
    phy2log[layers] = target.phy2log[layers]
    return ExpertLayout(phy2log, old.slots_per_rank, old.num_experts, old.ranks, old.rank_nodes)


def plan_migration(old: ExpertLayout, target: ExpertLayout, layers_per_step: int) -> MigrationSchedule:
    """Cut old -> target into steps of ``layers_per_step`` changed layers (no step when nothing changes)."""
    steps = split_layers(changed_layers(old, target), layers_per_step)
    layouts, done = [], []
    for layers in steps:
        done += layers
        layouts.append(target if len(layouts) == len(steps) - 1 else blend(old, target, done))
    return MigrationSchedule(old, target, steps, tuple(layouts))


def plan_steps(schedule: MigrationSchedule, live_ranks: Iterable[int], expert_bytes: int = 1) -> list[TransferPlan]:
    """The TransferPlan of each step, from the layout committed before it to the one after."""
    live = sorted(int(r) for r in live_ranks)
    return [plan_transfers(schedule.before(k), schedule.layouts[k], live, expert_bytes=expert_bytes)
            for k in range(schedule.num_steps)]


def staged_bytes(plan: TransferPlan) -> dict[int, int]:
    """Bytes each rank of ``plan.new`` stages until the commit: received, relayed to it, read, copied."""
    rows = [plan.transfers[:, DST], plan.relays[:, DST], plan.fetches[:, 2], plan.copies[:, 1]]
    column = np.concatenate(rows).astype(np.int64)
    ranks, counts = np.unique(column, return_counts=True)
    by_rank = dict(zip(ranks.tolist(), counts.tolist()))
    return {int(r): int(by_rank.get(r, 0)) * int(plan.expert_bytes) for r in plan.new.ranks}


def peak_staged_bytes(plans: Iterable[TransferPlan], ranks: Optional[Iterable[int]] = None) -> dict[int, int]:
    """Per rank, the most bytes staged at once over plans committed one after the other."""
    peak: dict[int, int] = {int(r): 0 for r in ranks or ()}
    for plan in plans:
        for rank, nbytes in staged_bytes(plan).items():
            peak[rank] = max(peak.get(rank, 0), nbytes)
    return peak
