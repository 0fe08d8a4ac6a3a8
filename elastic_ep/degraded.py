"""Degraded routing (opt-in): drop a token's unavailable experts and rescale the rest of its top-k to the original weight sum.

When an expert has no live replica, issue 17's default is to hold the tokens
routed to it until the recovery commits. In degraded mode (off by default) such
a token is served at once over the experts of its top-k that are still
available, as ReviveMoE does. The rule, per token t with top-k entries k:

1. An entry is *dropped* when its expert is unavailable; dropped entries get
   weight 0.
2. A token with no dropped entry is *untouched*: its weights are returned
   bit-exact.
3. A token is *unservable* when every entry is dropped, or when its kept
   entries carry zero weight in total while its dropped ones carried some (no
   rescaling can restore the sum). Its kept weights are returned unscaled; the
   caller must hold or fail it.
4. Every other token with a dropped entry is *degraded*: its kept weights are
   multiplied by ``sum(original) / sum(kept)`` (computed in float64, cast back),
   so the weights still sum to what the router gave.

The router's logits are not available here, so a dropped expert is not replaced
by the next-best one; the output is the MoE output restricted to the kept experts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from .errors import ElasticEPError


class RoutingError(ElasticEPError, ValueError):
    """Router decisions are malformed: wrong shapes, ids out of range, negative or non-finite weights."""


@dataclass(frozen=True)
class DegradedRouting:
    """The outcome of ``degrade_routing`` (arrays are read-only).

    topk_weights: [T, K] same dtype as given; dropped entries are 0.
    kept: [T, K] bool, True where the entry's expert is available.
    degraded_tokens: [num_degraded] int64 token indices, ascending.
    unservable_tokens: [num_unservable] int64 token indices, ascending.
    """

    topk_weights: np.ndarray
    kept: np.ndarray
    degraded_tokens: np.ndarray
    unservable_tokens: np.ndarray

    @property
    def num_degraded(self) -> int:
        return len(self.degraded_tokens)

    @property
    def num_unservable(self) -> int:
        return len(self.unservable_tokens)


def _check(topk_ids: np.ndarray, topk_weights: np.ndarray) -> None:
    if topk_ids.ndim != 2 or topk_weights.shape != topk_ids.shape:
        raise RoutingError(f"topk_ids and topk_weights must both be [tokens, k], got {list(topk_ids.shape)} and {list(topk_weights.shape)}")
    if not np.issubdtype(topk_ids.dtype, np.integer):
        raise RoutingError(f"topk_ids must be integers, got dtype {topk_ids.dtype}")
    if not np.issubdtype(topk_weights.dtype, np.floating):
        raise RoutingError(f"topk_weights must be floating point, got dtype {topk_weights.dtype}")
    bad = ~np.isfinite(topk_weights) | (topk_weights < 0)
    if bad.any():
        t, k = (int(x) for x in np.argwhere(bad)[0])
        raise RoutingError(f"topk_weights[{t}, {k}] = {topk_weights[t, k]} is negative or not finite")


def degrade_routing(topk_ids, topk_weights, *, unavailable: Optional[np.ndarray] = None,
                    available: Optional[np.ndarray] = None) -> DegradedRouting:
    """Renormalise each token's weights over its available top-k experts (rule in the module docstring).

    topk_ids: [T, K] logical expert ids; topk_weights: [T, K] router weights (>= 0).
    Give exactly one of ``unavailable``: [num_experts] bool, True for an expert with no
    live replica; or ``available``: [T, K] bool, per (token, k) entry.
    """
    ids, w = np.asarray(topk_ids), np.asarray(topk_weights)
    _check(ids, w)
    if (unavailable is None) == (available is None):
        raise RoutingError("give exactly one of unavailable=[num_experts] or available=[tokens, k]")
    if unavailable is not None:
        lost = np.asarray(unavailable)
        if lost.ndim != 1 or lost.dtype != np.bool_:
            raise RoutingError(f"unavailable must be a [num_experts] bool mask, got shape {list(lost.shape)} dtype {lost.dtype}")
        out_of_range = (ids < 0) | (ids >= len(lost))
        if out_of_range.any():
            t, k = (int(x) for x in np.argwhere(out_of_range)[0])
            raise RoutingError(f"topk_ids[{t}, {k}] = {ids[t, k]} is not an expert id in 0..{len(lost) - 1}")
        kept = ~lost[ids]
    else:
        kept = np.array(available)  # a copy: the result is made read-only below
        if kept.shape != ids.shape or kept.dtype != np.bool_:
            raise RoutingError(f"available must be a [tokens, k] = {list(ids.shape)} bool mask, got shape {list(kept.shape)} dtype {kept.dtype}")
    # Step 1: sums of kept and dropped weight per token, in float64
    w64 = w.astype(np.float64)
    kept_sum = np.where(kept, w64, 0.0).sum(axis=1)
    dropped_sum = np.where(kept, 0.0, w64).sum(axis=1)
    touched = ~kept.all(axis=1)
    # Step 2: classify tokens
    unservable = ~kept.any(axis=1) | ((kept_sum == 0) & (dropped_sum > 0))
    degraded = touched & ~unservable
    # Step 3: rescale degraded rows to their original sum; leave every other row's kept weights as given
    out = w.copy()
    out[~kept] = 0
    rows = np.flatnonzero(degraded & (kept_sum > 0))
    scale = (kept_sum[rows] + dropped_sum[rows]) / kept_sum[rows]
    out[rows] = (w64[rows] * kept[rows] * scale[:, None]).astype(w.dtype)
    for arr in (out, kept):
        arr.flags.writeable = False
    return DegradedRouting(out, kept, np.flatnonzero(degraded), np.flatnonzero(unservable))
