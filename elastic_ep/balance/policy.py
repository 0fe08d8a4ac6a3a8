"""The placement policy API: the request, the policy base class, and the one table of policies."""

from __future__ import annotations

from abc import ABC
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from ..errors import CapacityError, LayoutError, LoadStatsError
from ..layout import ExpertLayout
from .hierarchical import hierarchy, place_hierarchical, within_tolerance
from .slots import EMPTY
from .sticky import solve


def validate_load(load: np.ndarray, num_layers: int, num_experts: int) -> np.ndarray:
    """Check load statistics and return them as float64: [num_layers, num_experts]."""
    arr = np.asarray(load)
    if arr.shape != (num_layers, num_experts):
        raise LoadStatsError(
            f"load must have shape [num_layers={num_layers}, num_experts={num_experts}], got {arr.shape}"
        )
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise LoadStatsError(f"load must be numeric, got dtype {arr.dtype}")
    arr = arr.astype(np.float64)
    if not np.isfinite(arr).all():
        layer, expert = (int(x) for x in np.argwhere(~np.isfinite(arr))[0])
        raise LoadStatsError(f"load[{layer}, {expert}] = {arr[layer, expert]} is not finite")
    if (arr < 0).any():
        layer, expert = (int(x) for x in np.argwhere(arr < 0)[0])
        raise LoadStatsError(f"load[{layer}, {expert}] = {arr[layer, expert]} is negative")
    return arr


def _power_of_two_scaled(load: np.ndarray) -> np.ndarray:
    """Each layer's load times a power of two that brings its largest value into [0.5, 1).

    Placement depends only on ratios within a layer, and scaling by a power of two is exact,
    so every decision is the same as on the raw load; but sums of loads near the float
    maximum can no longer overflow, nor tiny ones underflow. load: [L, E], non-negative.
    """
    _, exponent = np.frexp(load.max(axis=1, initial=0.0))
    return np.ldexp(load, -exponent[:, None])


@dataclass(frozen=True)
class PlacementRequest:
    """Everything a policy needs to place experts.

    load: [num_layers, num_experts] tokens per logical expert (recent window).
    ranks: ids of the live ranks to place onto, in position order.
    rank_nodes: node of each of those ranks.
    old: the layout in force, or None at start-up.
    live_ranks: ranks whose old slots still hold their weights (survivors); ranks in
        ``ranks`` but not here start empty (replacements, grown ranks).
    """

    load: np.ndarray
    ranks: tuple[int, ...]
    slots_per_rank: int
    rank_nodes: tuple[int, ...]
    num_groups: int = 1
    old: Optional[ExpertLayout] = None
    live_ranks: Optional[frozenset[int]] = None
    tolerance: float = 0.01


class BalancePolicy(ABC):
    """A placement policy: a pure function from a PlacementRequest to an ExpertLayout."""

    name: str = ""
    sticky: bool = False

    def place(self, req: PlacementRequest) -> ExpertLayout:
        num_layers, num_experts = np.asarray(req.load).shape if np.ndim(req.load) == 2 else (None, None)
        if num_layers is None:
            raise LoadStatsError(f"load must be [num_layers, num_experts], got shape {np.shape(req.load)}")
        load = _power_of_two_scaled(validate_load(req.load, num_layers, num_experts))
        ranks = tuple(int(r) for r in req.ranks)
        spr = int(req.slots_per_rank)
        if not ranks:
            raise CapacityError("no live ranks to place experts on")
        if len(set(ranks)) != len(ranks):
            raise LayoutError(f"rank ids must be unique, got {list(ranks)}")
        if len(req.rank_nodes) != len(ranks):
            raise LayoutError(f"{len(req.rank_nodes)} node ids for {len(ranks)} ranks")
        if spr <= 0:
            raise LayoutError(f"slots_per_rank must be >= 1, got {spr}")
        num_slots = len(ranks) * spr
        if num_slots < num_experts:
            raise CapacityError(
                f"{len(ranks)} live ranks x {spr} slots = {num_slots} slots cannot hold "
                f"{num_experts} logical experts (need at least {-(-num_experts // spr)} ranks)"
            )
        if spr > num_experts:
            raise CapacityError(
                f"slots_per_rank={spr} exceeds num_experts={num_experts}: a rank would hold an expert twice"
            )
        old_slots = self._old_slots(req, ranks, num_layers, spr, num_experts)
        nodes = tuple(int(n) for n in req.rank_nodes)
        plan = hierarchy(nodes, req.num_groups, num_experts, spr)
        if plan is None:
            slots = solve(load, old_slots, len(ranks), spr, self.sticky, req.tolerance)
            phy2log = slots.reshape(num_layers, -1)
        else:
            if self.sticky and old_slots is not None:
                phy2log, ref, got, ref_max = place_hierarchical(
                    load, old_slots, nodes, req.num_groups, spr, req.tolerance, self.sticky, with_ref=True
                )
                phy2log = within_tolerance(load, phy2log, old_slots, nodes, req, spr, ref, got, ref_max)
            else:
                phy2log = place_hierarchical(load, old_slots, nodes, req.num_groups, spr, req.tolerance, self.sticky)
        return ExpertLayout(phy2log, spr, num_experts, ranks, nodes)

    @staticmethod
    def _old_slots(req, ranks, num_layers, spr, num_experts) -> Optional[np.ndarray]:
        """What each target rank holds now: [L, R, S] (-1 for empty/new ranks)."""
        if req.old is None:
            return None
        old = req.old
        if old.num_layers != num_layers or old.num_experts != num_experts:
            raise LayoutError(
                f"old layout is {old.num_layers} layers x {old.num_experts} experts, "
                f"load is {num_layers} x {num_experts}"
            )
        live = set(old.ranks) if req.live_ranks is None else set(req.live_ranks)
        if old.slots_per_rank != spr:  # the slots are reshaped: nothing stays where it is
            return np.full((num_layers, len(ranks), spr), EMPTY, dtype=np.int64)
        at = {r: i for i, r in enumerate(old.ranks)}
        src = np.array([at[r] if r in live and r in at else -1 for r in ranks], dtype=np.int64)
        view = old.rank_view()
        if (src == np.arange(len(ranks))).all() and len(ranks) == old.num_ranks:
            return view.copy()  # the same ranks, all live: the common rebalance
        out = view[:, np.maximum(src, 0), :]
        out[:, src < 0, :] = EMPTY
        return out


class EplbPolicy(BalancePolicy):
    """DeepSeek-EPLB style placement from scratch (hierarchical when groups divide over nodes)."""

    name = "eplb"
    sticky = False


class StickyPolicy(BalancePolicy):
    """EPLB balance, but replicas stay where they are whenever that costs no balance."""

    name = "sticky"
    sticky = True


POLICIES: dict[str, type[BalancePolicy]] = {"eplb": EplbPolicy, "sticky": StickyPolicy}


def get_policy(name: str) -> BalancePolicy:
    """Instantiate a registered policy by name."""
    try:
        return POLICIES[name]()
    except KeyError:
        raise ValueError(f"unknown balancing policy {name!r}; known: {sorted(POLICIES)}") from None


def rebalance_experts(
    load: np.ndarray,
    ranks: Sequence[int],
    slots_per_rank: int,
    *,
    rank_nodes: Optional[Sequence[int]] = None,
    num_groups: int = 1,
    old: Optional[ExpertLayout] = None,
    live_ranks: Optional[Sequence[int]] = None,
    policy: str = "sticky",
    tolerance: float = 0.01,
) -> ExpertLayout:
    """Place experts by ``policy`` onto ``ranks``; the one-call public entry point."""
    nodes = tuple(rank_nodes) if rank_nodes is not None else (0,) * len(ranks)
    req = PlacementRequest(
        load=np.asarray(load),
        ranks=tuple(ranks),
        slots_per_rank=slots_per_rank,
        rank_nodes=nodes,
        num_groups=num_groups,
        old=old,
        live_ranks=frozenset(live_ranks) if live_ranks is not None else None,
        tolerance=tolerance,
    )
    return get_policy(policy).place(req)
