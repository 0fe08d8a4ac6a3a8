"""Dispatch planning: (token, expert) pairs of one layer call -> live replicas, ranks and local slots. Pure numpy.

Glossary (as in ``elastic_ep.layout``): a *pair* is one (token, k) entry of the router's
decisions ``topk_ids: [num_tokens, top_k]``; its flat index is ``token * top_k + k``.
A *replica* of a logical expert is a physical slot that holds it; slot ``p`` lives on
the rank at position ``p // slots_per_rank`` as local slot ``p % slots_per_rank``.

The spreading rule (``plan_dispatch``): the pairs of one expert, in flat order, go to
its live replicas in turn, starting at replica ``rotation % count`` — so within a call
an expert's replicas get pair counts that differ by at most one, and a client that
advances ``rotation`` every call spreads even one-token decode calls over replicas.
Replicas on dead ranks are skipped (masked), so the plan never names a dead rank; an
expert with no live replica at all raises ``ExpertsUnavailableError`` naming it.

Re-sending (``pending``): a call whose rank died mid-call keeps the partial sums of the
ranks that answered and plans again only the pairs still pending (the dead rank's), on
the same committed epoch; ``pairs_to_send`` says which pairs those are, given what was
already computed and the routing now in force. Partial sums are kept within one epoch
only: once the committed epoch changes the whole call is planned again.

Compared with SGLang: its *static* dispatch maps each logical expert to one fixed
physical replica per source rank (cheap, no per-call work, but a hot expert's tokens
from one source always hit one replica), and its *dynamic* dispatch picks a replica
per token at random (balanced in expectation). Round-robin here is balanced exactly
and deterministic (the same call and rotation always give the same plan), at the cost
of one argsort of the call's pairs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import numpy as np

from ..errors import ExpertsUnavailableError, NotAnMoELayerError, ServingInputError


@dataclass(frozen=True)
class RankDispatch:
    """What one rank computes in one layer call.

    tokens: [n] int64 token indices of the batch this rank receives, ascending, each once.
    rows: [m] int64 index into ``tokens`` of each pair it computes.
    slots: [m] int64 local slot (0 <= slot < slots_per_rank) of each pair.
    pairs: [m] int64 flat pair index (``token * top_k + k``) of each pair, for the router weight.
    """

    rank: int
    tokens: np.ndarray
    rows: np.ndarray
    slots: np.ndarray
    pairs: np.ndarray


@dataclass(frozen=True)
class DispatchPlan:
    """One layer call's dispatch: every pending pair (all by default) goes to exactly one live rank's slot.

    parts: one RankDispatch per rank that gets at least one pair, by ascending rank position.
    """

    layer: int
    num_tokens: int
    top_k: int
    parts: tuple[RankDispatch, ...]


def check_call(layer, hidden_shape: Sequence[int], hidden_dtype: str, topk_ids: np.ndarray,
               topk_weights: np.ndarray, num_layers: int, num_experts: int, hidden: int, dtype: str,
               checkpoint_layers: Sequence[int] = ()) -> None:
    """Raise a ServingInputError naming the bad value unless a layer call's inputs are well-formed.

    hidden_shape: shape of ``hidden_states``, must be [num_tokens, hidden] of ``dtype``.
    topk_ids: [num_tokens, top_k] integer logical expert ids in [0, num_experts).
    topk_weights: [num_tokens, top_k] finite, non-negative router weights.
    layer: an MoE layer index in [0, num_layers) (checkpoint layer ``checkpoint_layers[layer]``).
    """
    if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)) or not 0 <= int(layer) < num_layers:
        raise NotAnMoELayerError(
            f"layer {layer!r} is not an MoE layer: MoE layers are 0..{num_layers - 1} "
            f"(checkpoint layers {list(checkpoint_layers) or 'unknown'})")
    if len(hidden_shape) != 2 or hidden_shape[1] != hidden:
        raise ServingInputError(f"hidden_states must be [num_tokens, {hidden}], got {list(hidden_shape)}")
    if hidden_dtype != dtype:
        raise ServingInputError(f"hidden_states must be {dtype} (the model dtype), got {hidden_dtype}")
    num_tokens = hidden_shape[0]
    ids, weights = np.asarray(topk_ids), np.asarray(topk_weights)
    if ids.ndim != 2 or ids.shape[0] != num_tokens or ids.shape[1] < 1:
        raise ServingInputError(f"topk_ids must be [num_tokens={num_tokens}, top_k], got {list(ids.shape)}")
    if not np.issubdtype(ids.dtype, np.integer):
        raise ServingInputError(f"topk_ids must be integers, got dtype {ids.dtype}")
    bad = np.argwhere((ids < 0) | (ids >= num_experts))
    if len(bad):
        t, k = (int(x) for x in bad[0])
        raise ServingInputError(f"topk_ids[{t}, {k}] = {int(ids[t, k])} is not an expert id in [0, {num_experts})")
    if weights.shape != ids.shape:
        raise ServingInputError(f"topk_weights must have topk_ids' shape {list(ids.shape)}, got {list(weights.shape)}")
    if not np.issubdtype(weights.dtype, np.floating):
        raise ServingInputError(f"topk_weights must be floating point, got dtype {weights.dtype}")
    bad = np.argwhere(~np.isfinite(weights) | (weights < 0))
    if len(bad):
        t, k = (int(x) for x in bad[0])
        raise ServingInputError(f"topk_weights[{t}, {k}] = {float(weights[t, k])} is not a finite, non-negative weight")


def live_replicas(phy2log_row: np.ndarray, slots_per_rank: int, live_positions: Iterable[int],
                  num_experts: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Live replicas of each expert in one layer.

    phy2log_row: [num_slots] expert of each physical slot.
    Returns (slots [n_live] physical slots on live ranks grouped by expert, ascending within one;
    start [num_experts] offset of each expert's group; count [num_experts] its live replicas).
    """
    live = np.zeros(len(phy2log_row) // slots_per_rank, dtype=bool)
    live[list(live_positions)] = True
    candidates = np.nonzero(np.repeat(live, slots_per_rank))[0]
    slots = candidates[np.argsort(phy2log_row[candidates], kind="stable")]
    count = np.bincount(phy2log_row[candidates], minlength=num_experts)
    start = np.concatenate([[0], np.cumsum(count)[:-1]])
    return slots, start, count


def pairs_to_send(done: np.ndarray, sent_ids: np.ndarray, sent_weights: np.ndarray, topk_ids: np.ndarray,
                  topk_weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Which pairs of a call to send now, given the pairs whose weighted outputs are already summed.

    done: [num_tokens, top_k] bool, pairs already computed (on the call's epoch) and summed per token;
    sent_ids / sent_weights: [num_tokens, top_k] the routing those pairs were computed with;
    topk_ids / topk_weights: [num_tokens, top_k] the routing in force now (degraded mode may change it).
    Returns (reset [num_tokens] bool: tokens whose summed partial no longer matches the routing, to
    be zeroed; pending [num_tokens, top_k] bool: pairs to send, every pair of a reset token included).
    """
    done = np.asarray(done, dtype=bool)
    if not (done.shape == np.shape(sent_ids) == np.shape(sent_weights) == np.shape(topk_ids)
            == np.shape(topk_weights)):
        raise ServingInputError(f"pairs_to_send needs equal shapes, got done {list(done.shape)}, sent "
                                f"{list(np.shape(sent_ids))}/{list(np.shape(sent_weights))}, routing "
                                f"{list(np.shape(topk_ids))}/{list(np.shape(topk_weights))}")
    changed = done & ((np.asarray(sent_ids) != np.asarray(topk_ids))
                      | (np.asarray(sent_weights) != np.asarray(topk_weights)))
    reset = changed.any(axis=1)
    return reset, ~(done & ~reset[:, None])


def plan_dispatch(layer: int, phy2log_row: np.ndarray, slots_per_rank: int, ranks: Sequence[int],
                  dead_ranks: Iterable[int], topk_ids: np.ndarray, rotation: int = 0,
                  pending: Optional[np.ndarray] = None) -> DispatchPlan:
    """Assign every pending (token, expert) pair of one layer call to a live replica (see the module docstring).

    phy2log_row: [num_slots] the committed layout's row for ``layer``.
    ranks: rank id at each rank position; dead_ranks: ranks whose slots must not be used.
    topk_ids: [num_tokens, top_k] logical experts (already checked by ``check_call``).
    pending: [num_tokens, top_k] bool, the pairs to plan (None: all); the others are left out of
    the plan, and only pending pairs' experts need a live replica.
    """
    ids = np.asarray(topk_ids, dtype=np.int64)
    num_tokens, top_k = ids.shape
    row = np.asarray(phy2log_row, dtype=np.int64)
    num_experts = int(max(row.max(initial=0), ids.max(initial=0))) + 1
    dead = {int(r) for r in dead_ranks}
    positions = [i for i, r in enumerate(ranks) if int(r) not in dead]
    slots, start, count = live_replicas(row, slots_per_rank, positions, num_experts)
    if pending is None:
        index = np.arange(ids.size, dtype=np.int64)
    else:
        if np.shape(pending) != ids.shape:
            raise ServingInputError(f"pending must be [num_tokens, top_k] = {list(ids.shape)}, "
                                    f"got {list(np.shape(pending))}")
        index = np.flatnonzero(np.asarray(pending, dtype=bool))
    flat = ids.ravel()[index]  # the planned pairs' experts; ``index`` maps them back to flat pair indices
    missing = np.unique(flat[count[flat] == 0])
    if len(missing):
        raise ExpertsUnavailableError(
            f"experts {missing.tolist()[:20]} of layer {layer} have no replica on a live rank "
            f"(dead ranks {sorted(dead)})", [(int(layer), int(e)) for e in missing])
    # Step 1: each pair's occurrence number among the pairs of its expert (flat order).
    order = np.argsort(flat, kind="stable")
    first = np.searchsorted(flat[order], flat[order], side="left")
    occurrence = np.empty_like(flat)
    occurrence[order] = np.arange(len(flat)) - first
    # Step 2: round-robin over the expert's live replicas, rotated per call.
    replica = (occurrence + int(rotation)) % count[flat]
    phys = slots[start[flat] + replica]
    # Step 3: group pairs by rank position; each rank gets each of its tokens once.
    position = phys // slots_per_rank
    by_rank = np.argsort(position, kind="stable")
    bounds = np.searchsorted(position[by_rank], np.arange(len(ranks) + 1))
    parts = []
    for pos in range(len(ranks)):
        chosen = by_rank[bounds[pos]:bounds[pos + 1]]
        if not len(chosen):
            continue
        pairs = index[chosen]
        tokens, rows = np.unique(pairs // top_k, return_inverse=True)
        parts.append(RankDispatch(int(ranks[pos]), tokens, rows.astype(np.int64), phys[chosen] % slots_per_rank,
                                  pairs.astype(np.int64)))
    return DispatchPlan(int(layer), int(num_tokens), int(top_k), tuple(parts))
