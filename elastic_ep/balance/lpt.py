"""LPT packing: replica counts, every replica heaviest first, and the longest-processing-time loop onto ranks."""

from __future__ import annotations

from typing import Optional

import numpy as np

from ..errors import CapacityError
from .slots import EMPTY, argsort_desc, gather_rows, repair_rows


def replicate(weight: np.ndarray, num_slots: int, max_replicas: int) -> np.ndarray:
    """Replica count per expert, giving each spare slot to the expert with the largest per-replica load.

    weight: [B, n] load per expert. Returns cnt: [B, n] with ``cnt.sum(1) == num_slots``,
    ``1 <= cnt <= max_replicas``.
    """
    batch, n = weight.shape
    extra = num_slots - n
    if extra < 0 or n * max_replicas < num_slots:
        raise CapacityError(
            f"{num_slots} slots cannot hold {n} experts with 1 to {max_replicas} replicas each"
        )
    cnt = np.ones((batch, n), dtype=np.int64)
    if not extra:
        return cnt
    rows = np.arange(batch)
    # score: load per replica (-inf at max_replicas); a step changes one column per row.
    score = np.where(cnt < max_replicas, weight / cnt, -np.inf)
    for _ in range(extra):
        best = score.argmax(axis=1)  # slightly favours low expert ids on exact ties
        c = cnt[rows, best] + 1
        cnt[rows, best] = c
        score[rows, best] = np.where(c < max_replicas, weight[rows, best] / c, -np.inf)
    return cnt


def sorted_experts(cnt: np.ndarray, wrep: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every replica, heaviest first (ties: lowest expert id): experts, weights, replica index [B, k].

    cnt, wrep: [B, n] replicas per expert and load per replica; ``k = cnt.sum(1)``, equal
    for every row. Replicas of one expert are adjacent; the replica index counts them.
    """
    batch, n = cnt.shape
    width = int(cnt[0].sum())
    order, ordered = argsort_desc(wrep)  # [B, n]; ties by expert id
    reps = gather_rows(cnt, order).ravel()
    experts = np.repeat(order.ravel(), reps).reshape(batch, width)
    weights = np.repeat(ordered.ravel(), reps).reshape(batch, width)
    first = np.repeat(np.cumsum(reps) - reps, reps).reshape(batch, width)  # flat index of the run start
    replica = np.arange(batch * width).reshape(batch, width) - first
    return experts, weights, replica


def runs(experts: np.ndarray) -> np.ndarray:
    """Item-major run flags of items experts [B, k] (-1: padding): cont [k, B] bool.

    cont[j, b]: item j of row b continues item j-1's expert, so the ranks that item's
    run was given are ruled out for it.
    """
    batch, width = experts.shape
    cont = np.zeros((width, batch), dtype=bool)
    cont[1:] = ((experts[:, 1:] == experts[:, :-1]) & (experts[:, 1:] >= 0)).T
    return cont


def lpt(
    cont: np.ndarray,
    nvalid: np.ndarray,
    weights_t: np.ndarray,
    key: np.ndarray,
    count: np.ndarray,
    held: Optional[np.ndarray],
    spr: int,
    held_from: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Longest-processing-time packing onto partly filled ranks.

    Items come item-major: weights_t [k, B] (contiguous) heaviest first per row, replicas
    of one expert adjacent; cont [k, B] their run flags (``runs``); nvalid [B] items per
    row, the rest padding, non-increasing (rows longest first). key: [B, R] rank load where
    the rank has room, +inf where it is full. count: [B, R] filled slots. held: [k,
    B - held_from, R] whether a rank holds the item's expert before packing (kept
    replicas; False for padding), for rows ``held_from`` on (none before), or None for none.
    Inputs are not modified. Each item goes to the least loaded rank with room that lacks
    the expert; a rank that would hold it twice is taken only when nothing else has room
    (repaired later). Returns rank position [B, k] and slot index [B, k] (the rank's fill
    count on arrival; -1 for padding) as small ints, and which rows gave a rank an expert
    twice: [B] bool.

    Each step works on the prefix of rows that still have items; an item only needs
    masking when its rank choice is constrained. Arrays are item-major and outputs small
    ints so that a call allocates little: fresh pages cost more here than the arithmetic.
    """
    width, batch = weights_t.shape
    num_ranks = key.shape[1]
    small = np.int16 if max(num_ranks, spr) < np.iinfo(np.int16).max else np.int64
    out_rank = np.full((width, batch), EMPTY, dtype=small)  # item-major while packing
    out_pos = np.full((width, batch), EMPTY, dtype=small)
    stuck_rows = np.zeros(batch, dtype=bool)
    if not width or not batch:
        return out_rank.T, out_pos.T, stuck_rows
    if bool((nvalid[1:] > nvalid[:-1]).any()):
        raise AssertionError("LPT rows must come longest first")
    key, count = key.copy(), count.copy()
    constrained = cont.any(axis=1)
    if held is not None:  # (held is False for padding)
        constrained |= held.reshape(width, -1).any(axis=1)
    follow = np.zeros(width + 1, dtype=bool)
    follow[:width] = cont.any(axis=1)
    follow = follow[1:].tolist()  # whether some row continues a run at j + 1
    constrained = constrained.tolist()
    active = np.searchsorted(-nvalid, -np.arange(width), side="left").tolist()  # rows with > j items
    # No load can overflow to +inf: then a rank is ruled out exactly where its masked key is +inf.
    finite = bool(np.isfinite(np.where(np.isinf(key), 0.0, key).sum() + weights_t.sum()))
    kf, cf = key.ravel(), count.ravel()
    row_base = np.arange(batch) * num_ranks
    cur = np.zeros((batch, num_ranks), dtype=bool)  # ranks that hold the current item's expert
    inf = np.inf
    first_full = spr - 1 - int(count.max())  # no rank can fill up before this item
    fills = np.zeros(spr + 1)
    fills[spr - 1] = inf  # added to a rank's key when its last slot is taken
    rank_buf = np.empty(batch, dtype=np.intp)
    # A step picks ranks into one reused buffer and tests for trapped rows with one
    # reduction: a step is a handful of numpy calls over [rows, ranks].
    largest = np.maximum.reduce
    for j in range(width):
        a = active[j]
        if not a:
            break
        k = key[:a]
        rank = rank_buf[:a]
        block = None
        if constrained[j]:
            # Ranks holding the expert: kept replicas, and earlier replicas of its run
            # (which include the kept ones, as they share the expert).
            block = cur[:a] & cont[j, :a, None]
            if held is not None and a > held_from:
                block[held_from:] |= held[j, : a - held_from]
            masked = np.where(block, inf, k)
            masked.argmin(axis=1, out=rank)
            flat = row_base[:a] + rank
            if finite:
                chosen = masked.ravel()[flat]
                trapped = largest(chosen) == inf
            else:
                stuck = block.ravel()[flat] | (cf[flat] >= spr)
                trapped = stuck.any()
            if trapped:
                if finite:
                    stuck = chosen == inf
                stuck_rows[:a] |= stuck
                rank[...] = np.where(stuck, k.argmin(axis=1), rank)
                flat = row_base[:a] + rank
        else:
            k.argmin(axis=1, out=rank)
            flat = row_base[:a] + rank
        out_rank[j, :a] = rank
        c = cf[flat]
        out_pos[j, :a] = c
        cf[flat] = c + 1
        if j < first_full:
            kf[flat] += weights_t[j, :a]
        else:  # a rank that is now full takes no more
            kf[flat] = kf[flat] + weights_t[j, :a] + fills[c]
        if follow[j]:
            cur = np.zeros((a, num_ranks), dtype=bool) if block is None else block
            cur.ravel()[flat] = True
    return out_rank.T, out_pos.T, stuck_rows


def pack_fresh(experts: np.ndarray, weights: np.ndarray, wrep: np.ndarray, num_ranks: int, spr: int) -> np.ndarray:
    """LPT onto empty ranks: slots [B, R, S], each rank's slots filled in arrival order.

    experts, weights: [B, R * S] every replica, heaviest first; wrep: [B, n] per-replica load.
    """
    batch = experts.shape[0]
    key = np.zeros((batch, num_ranks))
    count = np.zeros((batch, num_ranks), dtype=np.int64)
    nvalid = np.full(batch, experts.shape[1])  # every row holds every slot's replica
    rank, pos, stuck = lpt(runs(experts), nvalid, np.ascontiguousarray(weights.T), key, count, None, spr)
    return fresh_slots(experts, rank, pos, stuck, wrep, num_ranks, spr)


def fresh_slots(
    experts: np.ndarray, rank: np.ndarray, pos: np.ndarray, stuck: np.ndarray, wrep: np.ndarray, num_ranks: int, spr: int
) -> np.ndarray:
    """Slots [B, R, S] of a packing onto empty ranks from its LPT result (rank, slot per item)."""
    batch, width = experts.shape
    if width and int(pos.max()) >= spr:
        raise AssertionError("packing left a rank with too many or too few experts")
    slots = np.empty(batch * width, dtype=np.int64)
    slots[(np.arange(batch) * width)[:, None] + rank.astype(np.int64) * spr + pos] = experts
    slots = slots.reshape(batch, num_ranks, spr)
    repair_rows(slots, wrep, stuck)
    return slots
