"""Placement policies: per-layer expert load in, a balanced ExpertLayout out (pure numpy).

Two policies share one engine, vectorised over layers (and nodes):

* ``eplb``: DeepSeek-EPLB style from scratch. Step 1 (hierarchical only): pack
  expert groups onto nodes. Step 2: replicate the hottest experts into the
  spare slots. Step 3: pack the replicas onto ranks, heaviest first, each to the
  least loaded rank that has a free slot and does not hold that expert yet.
* ``sticky``: the same replica counts, but every replica a live rank already
  holds stays in its slot unless keeping it would push that rank above a load
  cap; only the rest is packed. If that misses the balance target, it falls
  back to the ``eplb`` packing with ranks relabelled to match the old layout,
  which has exactly ``eplb``'s balance. Balance (max rank load) is guaranteed
  within ``tolerance`` of ``eplb`` on the same input, and far fewer slots move.
  In a hierarchical placement only a layer's hottest node counts, so a node is
  left alone while it is within tolerance of eplb's max rank load for the layer.

Ties are broken by expert id and rank position, so results are deterministic.

Speed: every step is vectorised over the batch of problems (layers, or layers x
nodes); the only Python loops run over the items of one problem (LPT), swap
rounds and duplicate repairs. Sticky's packing, eplb's packing of the same
problems (its reference) and, for hierarchical placement, eplb's own node
problems all share one LPT loop.

Modules: ``policy`` (the request, the policy API and the one table of policies), ``lpt``
(replica counts and the LPT loop), ``slots`` (slot arrays: arranging, repairing duplicates,
relabelling ranks), ``sticky`` (the solver both policies run: keep what can stay, pack the
rest, compare with eplb), ``swaps`` (lowering the max rank load by swaps), ``hierarchical``
(groups to nodes, then experts within each node).
"""

from .lpt import replicate
from .policy import (
    POLICIES,
    BalancePolicy,
    EplbPolicy,
    PlacementRequest,
    StickyPolicy,
    get_policy,
    rebalance_experts,
    validate_load,
)

__all__ = [
    "POLICIES",
    "BalancePolicy",
    "EplbPolicy",
    "PlacementRequest",
    "StickyPolicy",
    "get_policy",
    "rebalance_experts",
    "replicate",
    "validate_load",
]
