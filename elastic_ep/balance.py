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
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from functools import lru_cache
from typing import Optional, Sequence

import numpy as np

from .errors import CapacityError, LayoutError, LoadStatsError
from .layout import ExpertLayout

_EMPTY = -1


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


# ---------------------------------------------------------------------------------------
# The engine: batched problems of "n experts onto R ranks of S slots".
# ---------------------------------------------------------------------------------------


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


def _sorted_experts(cnt: np.ndarray, wrep: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every replica, heaviest first (ties: lowest expert id): experts, weights, replica index [B, k].

    cnt, wrep: [B, n] replicas per expert and load per replica; ``k = cnt.sum(1)``, equal
    for every row. Replicas of one expert are adjacent; the replica index counts them.
    """
    batch, n = cnt.shape
    width = int(cnt[0].sum())
    order, ordered = _argsort_desc(wrep)  # [B, n]; ties by expert id
    reps = _gather_rows(cnt, order).ravel()
    experts = np.repeat(order.ravel(), reps).reshape(batch, width)
    weights = np.repeat(ordered.ravel(), reps).reshape(batch, width)
    first = np.repeat(np.cumsum(reps) - reps, reps).reshape(batch, width)  # flat index of the run start
    replica = np.arange(batch * width).reshape(batch, width) - first
    return experts, weights, replica


def _items(
    cnt: np.ndarray, wrep: np.ndarray, old: Optional[np.ndarray], items: Optional[tuple] = None
) -> tuple[np.ndarray, ...]:
    """All replicas to pack, heaviest first, and the old slot each would like to stay in.

    cnt, wrep: [B, n] replicas per expert and load per replica. old: [B, R, S] or None.
    items: ``_sorted_experts(cnt, wrep)`` if already computed.
    Returns experts [B, k], weights [B, k], pref [B, k] (old global slot or -1), with
    ``k = cnt.sum(1)`` equal for every row. Replica i of expert e prefers e's i-th
    old holder in slot order.
    """
    batch, n = cnt.shape
    experts, weights, replica = _sorted_experts(cnt, wrep) if items is None else items
    if old is None:
        return experts, weights, np.full(experts.shape, _EMPTY, dtype=np.int64)
    flat = old.reshape(batch, -1)
    num_slots = flat.shape[1]
    held = np.where(flat >= 0, flat, n)  # empty slots count as expert n
    offset = (np.arange(batch) * (n + 1))[:, None]
    # Slots grouped by expert, in slot order: sort unique keys (expert, slot) row by row
    # (one flat sort of every row's keys is several times slower).
    shift = num_slots.bit_length()
    holders = np.sort((held << shift) | np.arange(num_slots), axis=1) & ((1 << shift) - 1)
    oldcnt = np.bincount((held + offset).ravel(), minlength=batch * (n + 1)).reshape(batch, n + 1)
    start = np.cumsum(oldcnt, axis=1) - oldcnt  # [B, n + 1]
    at = experts + offset
    has_pref = replica < oldcnt.ravel()[at]
    idx = np.minimum(start.ravel()[at] + replica, num_slots - 1)
    pref = np.where(has_pref, _gather_rows(holders, idx), _EMPTY)
    return experts, weights, pref


def _argsort_desc(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Stable descending argsort of each row of values [B, n] (ties: lowest index first),
    and the values in that order: ([B, n], [B, n]).

    The order equals ``np.argsort(-values, axis=1, kind="stable")``, found faster:
    non-negative floats sort like their bit patterns, so an integer sort is used and only
    rows with ties take the (slow) stable sort.
    """
    values = np.asarray(values)
    if values.dtype != np.float64 or not values.size or values.min() < 0:
        order = np.argsort(-values, axis=1, kind="stable")
        return order, _gather_rows(values, order)
    key = -(values + 0.0).view(np.int64)  # + 0.0 turns -0.0 into 0.0
    order = np.argsort(key, axis=1)
    srt = _gather_rows(key, order)
    same = srt[:, 1:] == srt[:, :-1]
    if same.any():  # rarely: find the rows with ties only then (equal keys: same values)
        tied = same.any(axis=1)
        order[tied] = np.argsort(key[tied], axis=1, kind="stable")
    return order, (-srt).view(np.float64)


def _stable_argsort(keys: np.ndarray) -> np.ndarray:
    """``np.argsort(keys, kind="stable")`` for 1-d non-negative int keys, fast when keys are
    already sorted or fit in 16 bits (radix sort)."""
    if len(keys) < 2 or bool((keys[1:] >= keys[:-1]).all()):
        return np.arange(len(keys))
    if int(keys.min()) >= 0 and int(keys.max()) < 2**16:
        return np.argsort(keys.astype(np.uint16), kind="stable")
    return np.argsort(keys, kind="stable")


def _runs(experts: np.ndarray) -> np.ndarray:
    """Item-major run flags of items experts [B, k] (-1: padding): cont [k, B] bool.

    cont[j, b]: item j of row b continues item j-1's expert, so the ranks that item's
    run was given are ruled out for it.
    """
    batch, width = experts.shape
    cont = np.zeros((width, batch), dtype=bool)
    cont[1:] = ((experts[:, 1:] == experts[:, :-1]) & (experts[:, 1:] >= 0)).T
    return cont


def _lpt(
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
    of one expert adjacent; cont [k, B] their run flags (``_runs``); nvalid [B] items per
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
    out_rank = np.full((width, batch), _EMPTY, dtype=small)  # item-major while packing
    out_pos = np.full((width, batch), _EMPTY, dtype=small)
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


def _arrange(experts: np.ndarray, ranks: np.ndarray, old: Optional[np.ndarray], spr: int) -> np.ndarray:
    """Turn (expert, rank) assignments into slots [B, R, S], keeping old slots where possible.

    experts, ranks: [B, k] with ``k = R * S``. An expert assigned to a rank that held it
    before goes back to its old slot; the others fill the remaining slots of their rank,
    lowest slot first, in item order.
    """
    batch, width = experts.shape
    num_ranks = width // spr
    if old is None:
        slots = np.full(batch * width, _EMPTY, dtype=np.int64)
        stay = np.zeros((batch, width), dtype=bool)
    else:
        n = max(int(experts.max()) + 1 if experts.size else 0, int(old.max()) + 1)
        flat_old = old.reshape(batch, -1)
        valid = flat_old >= 0
        base = (np.arange(batch) * (n + 1))[:, None]
        # Flat keys of (problem, expert, rank); expert n stands for an empty old slot.
        new_key = ((base + experts) * num_ranks + ranks).ravel()
        old_key = (base + np.where(valid, flat_old, n)) * num_ranks + _slot_ranks(num_ranks, spr)
        new_has = np.zeros(batch * (n + 1) * num_ranks, dtype=bool)
        new_has[new_key] = True
        keep = valid & new_has[old_key]
        slots = np.where(keep, flat_old, _EMPTY).ravel()
        old_has = np.zeros_like(new_has)
        old_has[old_key[valid]] = True
        stay = old_has[new_key].reshape(batch, width)
        if int(stay.sum()) != int(keep.sum()):
            # A rank given one expert twice (repaired later) keeps it in its old slot once:
            # the first such item in item order stays, the others move.
            at = np.flatnonzero(stay)
            stay.ravel()[at[~_first_occurrence(new_key[at])]] = False
    return _fill_free(slots, experts, ranks, ~stay, num_ranks, spr)


def _fill_free(
    slots: np.ndarray, experts: np.ndarray, ranks: np.ndarray, move: np.ndarray, num_ranks: int, spr: int
) -> np.ndarray:
    """Put the moving items into the free (-1) slots: returns slots [B, R, S].

    slots: [B * R * S] flat, kept replicas placed. experts, ranks, move: [B, k]. Items go
    by (problem, rank) and then item order into their rank's free slots in slot order.
    """
    batch = experts.shape[0]
    move_rank = ((np.arange(batch) * num_ranks)[:, None] + ranks)[move]
    order = _stable_argsort(move_rank)
    free = np.flatnonzero(slots == _EMPTY)  # sorted by (problem, rank, slot)
    if len(free) != len(order) or not np.array_equal(free // spr, move_rank[order]):
        raise AssertionError("packing left a rank with too many or too few experts")
    slots[free] = experts[move][order]
    return slots.reshape(batch, num_ranks, spr)


def _first_occurrence(keys: np.ndarray) -> np.ndarray:
    """Whether each entry of keys (1-d, non-negative ints) is the first with its value."""
    first = np.ones(len(keys), dtype=bool)
    if not len(keys):
        return first
    repeated = np.flatnonzero(np.bincount(keys)[keys] > 1)  # few: sort only those
    sub = keys[repeated]
    order = np.argsort(sub, kind="stable")
    first[repeated[order[1:]]] = sub[order[1:]] != sub[order[:-1]]
    return first


def _slot_ranks(num_ranks: int, spr: int) -> np.ndarray:
    """Rank position of every global slot: [R * S]."""
    return np.repeat(np.arange(num_ranks), spr)


def _repair_duplicates(slots: np.ndarray, wrep: np.ndarray, strict: bool = True) -> np.ndarray:
    """Swap replicas so that no rank holds one expert twice (rare after LPT). In place.

    slots: [B, R, S]; wrep: [B, n] per-replica load, used to pick the swap that moves least load.
    Each duplicate, in (problem, rank, slot) order, swaps its last copy on the rank with a
    replica f on a rank without the expert, such that the rank lacks f, whose load is
    closest. Problems are independent, so the k-th duplicate of every problem is
    repaired in one vectorised step. A duplicate with no such swap raises CapacityError,
    or with ``strict=False`` marks its problem as failed. Returns the failed problems: [B].
    """
    srt = np.sort(slots, axis=2)
    hits = np.argwhere(srt[:, :, 1:] == srt[:, :, :-1])  # [H, 3]: problem, rank, index
    failed_rows = np.zeros(len(slots), dtype=bool)
    if not len(hits):
        return failed_rows
    _, num_ranks, spr = slots.shape
    b_all = hits[:, 0]
    first = np.ones(len(hits), dtype=bool)
    first[1:] = b_all[1:] != b_all[:-1]
    wave = np.arange(len(hits)) - np.maximum.accumulate(np.where(first, np.arange(len(hits)), 0))
    failed = {}  # problem -> the expert it could not repair (the first such, as done in order)
    for k in range(int(wave.max()) + 1):
        b, r, i = hits[wave == k].T
        view = slots[b]  # [H, R, S]
        e = srt[b, r, i]
        mine = view[np.arange(len(b)), r]  # [H, S]
        # Still twice (not repaired by an earlier swap), in a problem that has not failed.
        todo = ((mine == e[:, None]).sum(axis=1) >= 2) & ~np.isin(b, list(failed))
        if not todo.any():
            continue
        b, r, e, view, mine = b[todo], r[todo], e[todo], view[todo], mine[todo]
        s = spr - 1 - (mine == e[:, None])[:, ::-1].argmax(axis=1)  # last copy on the rank
        # Candidates: a replica f on a rank without e, such that rank r lacks f.
        ok = ~(view == e[:, None, None]).any(axis=2)[:, :, None] & ~(
            view[:, :, :, None] == mine[:, None, None, :]
        ).any(axis=3)
        ok = ok.reshape(len(b), -1)
        stuck = ~ok.any(axis=1)
        for bb, ee in zip(b[stuck].tolist(), e[stuck].tolist()):
            failed[bb] = ee
        b, r, s, e, view, ok = b[~stuck], r[~stuck], s[~stuck], e[~stuck], view[~stuck], ok[~stuck]
        if not len(b):
            continue
        wv = np.take_along_axis(wrep[b], view.reshape(len(b), -1), axis=1)
        cost = np.where(ok, np.abs(wv - wrep[b, e][:, None]), np.inf)
        r2, s2 = np.divmod(cost.argmin(axis=1), spr)
        slots[b, r, s] = view[np.arange(len(b)), r2, s2]
        slots[b, r2, s2] = e
    if failed and strict:
        bad = failed[min(failed)]
        raise CapacityError(f"cannot place replicas without duplicating expert {bad} on a rank")
    failed_rows[list(failed)] = True
    return failed_rows


def _slot_loads(slots: np.ndarray, wrep: np.ndarray) -> np.ndarray:
    """Rank loads [B, R] of slots [B, R, S] (-1: empty) given per-replica loads [B, n]."""
    batch, n = wrep.shape
    flat = slots.reshape(batch, -1)
    empty = flat < 0
    idx = (np.arange(batch) * n)[:, None] + flat
    values = np.ascontiguousarray(wrep).ravel()
    if empty.any():
        per_slot = np.where(empty, 0.0, values[np.where(empty, 0, idx)])
    else:
        per_slot = values[idx]
    return per_slot.reshape(slots.shape).sum(axis=2)


def _pack_fresh(experts: np.ndarray, weights: np.ndarray, wrep: np.ndarray, num_ranks: int, spr: int) -> np.ndarray:
    """LPT onto empty ranks: slots [B, R, S], each rank's slots filled in arrival order.

    experts, weights: [B, R * S] every replica, heaviest first; wrep: [B, n] per-replica load.
    """
    batch = experts.shape[0]
    key = np.zeros((batch, num_ranks))
    count = np.zeros((batch, num_ranks), dtype=np.int64)
    nvalid = np.full(batch, experts.shape[1])  # every row holds every slot's replica
    rank, pos, stuck = _lpt(_runs(experts), nvalid, np.ascontiguousarray(weights.T), key, count, None, spr)
    return _fresh_slots(experts, rank, pos, stuck, wrep, num_ranks, spr)


def _fresh_slots(
    experts: np.ndarray, rank: np.ndarray, pos: np.ndarray, stuck: np.ndarray, wrep: np.ndarray, num_ranks: int, spr: int
) -> np.ndarray:
    """Slots [B, R, S] of a packing onto empty ranks from its LPT result (rank, slot per item)."""
    batch, width = experts.shape
    if width and int(pos.max()) >= spr:
        raise AssertionError("packing left a rank with too many or too few experts")
    slots = np.empty(batch * width, dtype=np.int64)
    slots[(np.arange(batch) * width)[:, None] + rank.astype(np.int64) * spr + pos] = experts
    slots = slots.reshape(batch, num_ranks, spr)
    _repair_rows(slots, wrep, stuck)
    return slots


def _repair_rows(slots: np.ndarray, wrep: np.ndarray, rows: np.ndarray, strict: bool = True) -> np.ndarray:
    """``_repair_duplicates`` on the rows (bool [B]) where LPT gave a rank an expert twice.

    Returns the rows it could not repair (only with ``strict=False``): bool [B].
    """
    failed = np.zeros(len(slots), dtype=bool)
    if rows.any():
        sub = slots[rows]
        failed[rows] = _repair_duplicates(sub, wrep[rows], strict)
        slots[rows] = sub
    return failed


def pack(
    weight: np.ndarray,
    cnt: np.ndarray,
    num_ranks: int,
    spr: int,
    old: Optional[np.ndarray] = None,
    items: Optional[tuple] = None,
) -> np.ndarray:
    """Pack ``cnt`` replicas per expert onto ranks: slots [B, R, S].

    weight, cnt: [B, n]. With ``old`` ([B, R, S]), every replica that an old slot can
    keep stays there; only the others are packed (heaviest first, least loaded rank).
    items: ``_sorted_experts(cnt, weight / cnt)`` if already computed.
    """
    wrep = weight / cnt
    if items is None:
        items = _sorted_experts(cnt, wrep)
    if old is None:
        return _pack_fresh(items[0], items[1], wrep, num_ranks, spr)
    kept = _Kept.prepare(cnt, wrep, items, old, num_ranks, spr)
    none = np.zeros((0, kept.moving.shape[1]))
    placed, stuck, _, _, _ = _lpt_joint(kept, none.astype(np.int64), none, spr)
    return kept.finish(
        placed, stuck, wrep, old, lambda idx: _pack_fresh(items[0][idx], items[1][idx], wrep[idx], num_ranks, spr)
    )


@dataclass
class _Kept:
    """A sticky packing between its steps: kept replicas placed, the rest still to pack.

    experts, pref, ranks: [B, k] every replica (heaviest first), its old global slot (-1:
    none) and its rank (-1: not placed yet). moving, moving_w: [B, m] the replicas to pack,
    left-aligned (-1 padding), at item positions ``cols`` of rows ``rows`` (flat lists
    over the moving replicas, ``slot_of`` their column in moving). key, count: [B, R] rank
    loads (+inf once full) and fill counts of the kept replicas. held: [M, R] whether a rank
    keeps a replica of each moving replica's expert (same order as rows, cols).
    """

    experts: np.ndarray
    pref: np.ndarray
    ranks: np.ndarray
    moving: np.ndarray
    moving_w: np.ndarray
    rows: np.ndarray
    cols: np.ndarray
    slot_of: np.ndarray
    key: np.ndarray
    count: np.ndarray
    held: np.ndarray
    spr: int

    @classmethod
    def prepare(cls, cnt, wrep, items, old, num_ranks, spr) -> "_Kept":
        """Keep every replica that has an old slot; line up the others for LPT."""
        batch, n = cnt.shape
        experts, weights, pref = _items(cnt, wrep, old, items)
        stay = pref >= 0
        ranks = np.where(stay, pref // spr, _EMPTY)
        # Kept replicas: rank loads (summed in item order), fill counts, and who holds what.
        at = ((np.arange(batch) * num_ranks)[:, None] + ranks)[stay]
        load = np.bincount(at, weights=weights[stay], minlength=batch * num_ranks).reshape(batch, num_ranks)
        count = np.bincount(at, minlength=batch * num_ranks).reshape(batch, num_ranks)
        base = (np.arange(batch) * (n + 1))[:, None]
        has = np.zeros((batch * (n + 1), num_ranks), dtype=bool)
        has.ravel()[((base + experts) * num_ranks + ranks)[stay]] = True
        # The rest, heaviest first, left-aligned per problem (padding -1 at the end).
        move = ~stay
        width = int(move.sum(axis=1).max()) if move.size else 0
        rows, cols = np.nonzero(move)
        slot_of = np.cumsum(move, axis=1)[rows, cols] - 1
        moving = np.full((batch, width), _EMPTY, dtype=np.int64)
        moving[rows, slot_of] = experts[rows, cols]
        moving_w = np.zeros((batch, width))
        moving_w[rows, slot_of] = weights[rows, cols]
        held = has[base[rows, 0] + experts[rows, cols]]
        key = np.where(count < spr, load, np.inf)
        return cls(experts, pref, ranks, moving, moving_w, rows, cols, slot_of, key, count, held, spr)

    def finish(self, placed: np.ndarray, stuck: np.ndarray, wrep: np.ndarray, old: np.ndarray, fresh) -> np.ndarray:
        """Slots [B, R, S] once LPT placed the moving replicas (placed: [B, m] ranks).

        A problem whose duplicates cannot be repaired by swaps takes eplb's packing
        instead (``fresh(rows)``: slots [len(rows), R, S]), ranks relabelled to the old ones.
        """
        ranks = self.ranks.copy()
        ranks[self.rows, self.cols] = placed[self.rows, self.slot_of]
        # Kept replicas go back to their old slot, the others fill their rank's free slots.
        slots = _arrange_kept(self.experts, ranks, self.pref, self.spr)
        if stuck.any():  # a rank given an expert twice: the general rule, then repair
            slots[stuck] = _arrange(self.experts[stuck], ranks[stuck], old[stuck], self.spr)
            failed = _repair_rows(slots, wrep, stuck, strict=False)
            if failed.any():
                slots[failed] = relabel_to_old(fresh(np.nonzero(failed)[0]), old[failed])
        return slots


def _lpt_joint(kept: _Kept, experts: np.ndarray, weights: np.ndarray, spr: int):
    """One LPT loop for a sticky packing's moving replicas and for fresh problems.

    kept: the sticky problems [B1]; experts, weights: [B2, R * S] fresh problems (every
    replica, heaviest first). Rows are lined up longest first (fresh ones, then sticky
    ones by how many replicas move), so ``_lpt`` needs no reordering. Returns placed [B1, m]
    and stuck [B1] for kept, then rank, pos [B2, R * S] and stuck [B2] for the fresh ones.
    """
    fresh, fresh_width = experts.shape
    batch, m = kept.moving.shape
    width = max(fresh_width, m)
    num_ranks = kept.key.shape[1]
    moving_count = (kept.moving >= 0).sum(axis=1)
    order = np.argsort(-moving_count, kind="stable")
    total = fresh + batch
    # Item-major from the start (fresh rows, then sticky ones), as _lpt takes them.
    weights_t = np.zeros((width, total))
    weights_t[:fresh_width, :fresh] = weights.T
    weights_t[:m, fresh:] = kept.moving_w[order].T
    cont = np.zeros((width, total), dtype=bool)
    cont[:fresh_width, :fresh] = _runs(experts)
    cont[:m, fresh:] = _runs(kept.moving[order])
    nvalid = np.concatenate([(experts >= 0).sum(axis=1), moving_count[order]])
    key = np.zeros((total, num_ranks))
    key[fresh:] = kept.key[order]
    count = np.zeros((total, num_ranks), dtype=np.int64)
    count[fresh:] = kept.count[order]
    where = np.empty(batch, dtype=np.int64)
    where[order] = np.arange(batch)  # sticky row -> its row among the sticky ones
    held = np.zeros((width, batch, num_ranks), dtype=bool)  # item-major, as _lpt takes it
    held[kept.slot_of, where[kept.rows]] = kept.held
    rank, pos, stuck = _lpt(cont, nvalid, weights_t, key, count, held, spr, held_from=fresh)
    placed = rank[fresh:, :m][where]
    return placed, stuck[fresh:][where], rank[:fresh], pos[:fresh], stuck[:fresh]


def _arrange_kept(experts: np.ndarray, ranks: np.ndarray, pref: np.ndarray, spr: int) -> np.ndarray:
    """``_arrange`` when the kept replicas are known: slots [B, R, S].

    experts, ranks, pref: [B, k]; items with ``pref >= 0`` stay in that old global slot,
    the others fill the free slots of their rank, lowest first, in item order. Same
    result as ``_arrange`` when no other item lands on a rank that held its expert.
    """
    batch, width = experts.shape
    num_ranks = width // spr
    slots = np.full(batch * width, _EMPTY, dtype=np.int64)
    stay = pref >= 0
    slots[((np.arange(batch) * width)[:, None] + pref)[stay]] = experts[stay]
    return _fill_free(slots, experts, ranks, ~stay, num_ranks, spr)


def _match_positions(overlap: np.ndarray) -> np.ndarray:
    """Greedy maximum-overlap matching: perm[i] = old position given to new rank i. overlap: [R, R]."""
    size = overlap.shape[0]
    perm = [-1] * size
    used = [False] * size
    left = size
    for flat in np.argsort(-overlap, axis=None, kind="stable").tolist():
        i, j = divmod(flat, size)
        if perm[i] < 0 and not used[j]:
            perm[i] = j
            used[j] = True
            left -= 1
            if not left:
                break
    return np.array(perm, dtype=np.int64)


def _match_positions_batch(overlap: np.ndarray) -> np.ndarray:
    """``_match_positions`` for a batch [B, R, R] -> perm [B, R], vectorised over the batch.

    The scan over entries in decreasing overlap (ties: lowest flat index) takes an entry
    when its row and column are free; equivalently, R times, take the first largest entry
    among free rows and columns.
    """
    batch, size, _ = overlap.shape
    work = overlap.astype(np.float64)
    perm = np.empty((batch, size), dtype=np.int64)
    rows = np.arange(batch)
    for _ in range(size):
        i, j = np.divmod(work.reshape(batch, -1).argmax(axis=1), size)
        perm[rows, i] = j
        work[rows, i, :] = -np.inf
        work[rows, :, j] = -np.inf
    return perm


def _match_groups(overlap: np.ndarray, groups: Optional[np.ndarray]) -> np.ndarray:
    """Greedy maximum-overlap matching of ranks, only within groups: perm [B, R].

    overlap: [B, R, R]; groups: [R] or None (one group). Groups are independent, so with
    groups of equal size each group's block is matched on its own (positions in order).
    """
    batch, size, _ = overlap.shape
    if groups is not None:
        ids, inv = np.unique(groups, return_inverse=True)
        sizes = np.bincount(inv.ravel())
        if len(ids) > 1 and (sizes == sizes[0]).all():
            pos = np.argsort(inv.ravel(), kind="stable").reshape(len(ids), -1)  # [G, g] increasing
            g = pos.shape[1]
            blocks = overlap[:, pos[:, :, None], pos[:, None, :]].reshape(-1, g, g)  # [B * G, g, g]
            local = _match_positions_batch(blocks).reshape(batch, len(ids), g)
            perm = np.empty((batch, size), dtype=np.int64)
            perm[:, pos] = pos[np.arange(len(ids))[:, None], local]
            return perm
        same = groups[:, None] == groups[None, :]
        overlap = np.where(same[None], overlap + 1, -1)  # never match across groups
    if batch >= 4:
        return _match_positions_batch(overlap)
    return np.stack([_match_positions(o) for o in overlap]) if batch else np.empty((0, size), dtype=np.int64)


def _replica_counts(phy2log: np.ndarray, num_experts: int) -> np.ndarray:
    """Replicas per expert of placements phy2log [B, P]: [B, num_experts] float."""
    batch = phy2log.shape[0]
    at = (np.arange(batch) * num_experts)[:, None] + phy2log
    return np.bincount(at.ravel(), minlength=batch * num_experts).reshape(batch, num_experts).astype(np.float64)


def max_rank_load_of(phy2log: np.ndarray, load: np.ndarray, num_ranks: int, spr: int) -> np.ndarray:
    """Max rank load per layer of a placement phy2log [L, P] under load [L, E]: [L]."""
    num_layers, num_experts = load.shape
    wrep = load / np.maximum(_replica_counts(phy2log, num_experts), 1)
    return _slot_loads(phy2log.reshape(num_layers, num_ranks, spr), wrep).max(axis=1)


def relabel_to_old(slots: np.ndarray, old: np.ndarray, groups: Optional[np.ndarray] = None) -> np.ndarray:
    """Permute the ranks of a packing to overlap the old one most, then keep old slots.

    slots, old: [B, R, S]. groups: [R] optional; ranks are only permuted within a group
    (a node), so a hierarchical placement stays hierarchical. Balance is unchanged.
    """
    batch, num_ranks, spr = slots.shape
    n = int(max(slots.max(), old.max())) + 2
    # 0/1 indicators as floats: the product (BLAS) counts exactly.
    base = (np.arange(batch * num_ranks) * n)[:, None]  # one row of n per (problem, rank)
    new_has = np.zeros((batch, num_ranks, n))
    old_has = np.zeros((batch, num_ranks, n))
    new_has.ravel()[base + slots.reshape(-1, spr)] = 1.0
    old_has.ravel()[base + np.where(old >= 0, old, n - 1).reshape(-1, spr)] = 1.0
    old_has[:, :, n - 1] = 0.0
    overlap = (new_has @ old_has.transpose(0, 2, 1)).astype(np.int64)  # [B, new R, old R]
    perm = _match_groups(overlap, groups)
    moved = np.empty_like(slots)
    moved[np.arange(batch)[:, None], perm] = slots
    experts = moved.reshape(batch, -1)
    ranks = np.broadcast_to(_slot_ranks(num_ranks, spr), experts.shape)
    return _arrange(experts, ranks, old, spr)


def improve_by_swaps(
    slots: np.ndarray, wrep: np.ndarray, target: np.ndarray, max_rounds: int, pairs: int = 4
) -> np.ndarray:
    """Lower the max rank load by swapping replicas between hot and cold ranks, in place.

    slots: [B, R, S]; wrep: [B, n] per-replica load; target: [B] stop once the max rank
    load is at or under it. Each round pairs the i-th most loaded rank with the i-th least
    loaded one (``pairs`` pairs) and, where the hot one is over target, makes the single swap
    that lowers the larger of the pair's two loads most, never putting two replicas of one
    expert on one rank. Returns the number of swaps made per problem: [B].
    """
    batch, num_ranks, spr = slots.shape
    swaps = np.zeros(batch, dtype=np.int64)
    m = min(pairs, num_ranks // 2)
    if m <= 0:
        return swaps
    work = np.ascontiguousarray(slots)
    w = np.take_along_axis(wrep, work.reshape(batch, -1), axis=1).reshape(slots.shape)  # slot loads
    load = w.sum(axis=2)
    # Flat views: one row per (problem, rank) for slots and loads.
    s2, w2, l1 = work.reshape(-1, spr), w.reshape(-1, spr), load.ravel()
    # Which experts each rank holds, as a 64-bit mask when expert ids allow it.
    bits = _expert_bits(s2) if wrep.shape[1] <= 64 and work.min() >= 0 else None
    act = np.nonzero(load.max(axis=1) > target)[0]
    for _ in range(max_rounds):
        if not len(act):
            break
        rank_order = np.argsort(load[act], axis=1, kind="stable")
        base = (act * num_ranks)[:, None]
        hot = base + rank_order[:, : -m - 1 : -1]  # [A, m] flat (problem, rank) of the i-th hottest
        cold = base + rank_order[:, :m]  # ... and of the i-th coldest
        la = l1[hot]
        over = la > target[act][:, None]  # only pairs whose hot rank is over target can swap
        hot, cold, la = hot[over], cold[over], la[over]  # [Q]
        ea, wa, eb, wb = s2[hot], w2[hot], s2[cold], w2[cold]
        # A swap may not put an expert on a rank that has it: rule those slots out.
        if bits is None:
            same = ea[:, :, None] == eb[:, None, :]
            a_on_cold, b_on_hot = same.any(axis=2), same.any(axis=1)
        else:
            a_on_cold = (bits[cold][:, None] >> ea.astype(np.uint64)) & np.uint64(1) != 0
            b_on_hot = (bits[hot][:, None] >> eb.astype(np.uint64)) & np.uint64(1) != 0
        best, best_val = _best_swaps(
            np.where(a_on_cold, -np.inf, wa), np.where(b_on_hot, np.inf, wb), la, l1[cold]
        )
        do = best_val < la - 1e-12 * np.maximum(la, 1.0)
        if not do.any():
            break
        ra, rb, best = hot[do], cold[do], best[do]
        ia, jb = np.divmod(best, spr)
        ea_v, wa_v = s2[ra, ia], w2[ra, ia]
        eb_v = s2[rb, jb]
        s2[ra, ia], w2[ra, ia] = eb_v, w2[rb, jb]
        s2[rb, jb], w2[rb, jb] = ea_v, wa_v
        if bits is not None:
            flip = (np.uint64(1) << ea_v.astype(np.uint64)) ^ (np.uint64(1) << eb_v.astype(np.uint64))
            bits[ra] ^= flip
            bits[rb] ^= flip
        delta = wa_v - w2[ra, ia]
        l1[ra] -= delta
        l1[rb] += delta
        b = ra // num_ranks  # sorted: act is
        swaps += np.bincount(b, minlength=batch)
        moved = b[np.concatenate(([True], b[1:] != b[:-1]))]
        act = moved[load[moved].max(axis=1) > target[moved]]
    if work is not slots:
        slots[...] = work
    return swaps


def _expert_bits(slots: np.ndarray) -> np.ndarray:
    """Experts held per rank as a bit mask: slots [M, S] of ids in [0, 64) -> [M] uint64."""
    return np.bitwise_or.reduce(np.uint64(1) << slots.astype(np.uint64), axis=1)


def _best_swaps(wa: np.ndarray, wb: np.ndarray, la: np.ndarray, lb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Best single swap between a hot rank a and a cold rank b, per pair.

    wa, wb: [Q, S] slot loads of the hot / cold rank, -inf / +inf for slots that may not
    move (their expert is on the other rank already); la, lb: [Q] the two rank loads.
    Swapping slot i of a with slot j of b (flat index i * S + j) gives new loads
    ``la - d`` and ``lb + d`` with ``d = wa[i] - wb[j]``; its value is the larger one.
    Returns the best flat index [Q] and its value [Q]. A swap must move load from a to b
    (d > 0): the others are not masked, as their value is at least ``la`` (so they never
    beat a swap that lowers the pair's max, and callers only make such swaps).
    """
    q, spr = wa.shape
    d = (wa[:, :, None] - wb[:, None, :]).reshape(q, spr * spr)  # [Q, S(a) * S(b)]
    new_max = np.subtract(la[:, None], d)
    np.maximum(new_max, np.add(lb[:, None], d), out=new_max)
    best = new_max.argmin(axis=1)
    return best, new_max[np.arange(q), best]


def solve(
    weight: np.ndarray,
    old: Optional[np.ndarray],
    num_ranks: int,
    spr: int,
    sticky: bool,
    tolerance: float,
    extra: Optional[np.ndarray] = None,
    group: int = 0,
):
    """Place n experts (loads weight: [B, n]) on R ranks of S slots: returns slots [B, R, S].

    extra: optional [B2, n] further problems to place by eplb (from scratch). They are
    packed in the same batch as sticky's eplb reference (one LPT loop for both; a row
    equal to one of ``weight`` is packed once), and ``(slots, extra_slots, slots_max,
    extra_max)`` is returned, with the max rank load of every row: [B], [B2].
    group: with ``extra``, the rows of weight and of extra come in aligned groups of this
    many (the nodes of one layer), and only a group's largest max rank load matters: a
    sticky row then only has to be within tolerance of the larger of its own eplb
    packing and the group's largest extra (eplb) packing. 0: every row on its own.
    """
    rows = len(weight)
    twin = own = None
    if extra is not None:
        twin = _same_rows(extra, weight)  # [B2]: an identical row of weight, or -1
        own = extra[twin < 0]
    both = weight if own is None else np.concatenate([weight, own])
    cnt_all = replicate(both, num_ranks * spr, num_ranks)
    if not sticky or old is None:
        fresh = pack(both, cnt_all, num_ranks, spr)
        if extra is None:
            return fresh
        fresh_max = _slot_loads(fresh, both / cnt_all).max(axis=1)
        x_rows = np.where(twin >= 0, twin, rows + np.cumsum(twin < 0) - 1)  # extra row -> fresh row
        return fresh[:rows], fresh[x_rows], fresh_max[:rows], fresh_max[x_rows]
    cnt = cnt_all[:rows]
    if own is not None and len(own):
        # Sort the sticky rows and eplb's own rows in one call; split the result after.
        wrep_all = both / cnt_all
        items_all = _sorted_experts(cnt_all, wrep_all)
        wrep = wrep_all[:rows]
        items = tuple(x[:rows] for x in items_all)
    else:
        wrep = weight / cnt
        items = _sorted_experts(cnt, wrep)
        wrep_all, items_all = wrep, items
    # A lower bound on any packing's max rank load: within tolerance of it is within
    # tolerance of eplb too, so eplb itself is only computed where the bound is missed.
    lower = np.maximum(weight.sum(axis=1) / num_ranks, wrep.max(axis=1))
    # Step 1: keep every replica that can stay; pack only the rest (new replicas, lost ones).
    extra_slots = fresh = None
    if extra is None:
        slots = pack(weight, cnt, num_ranks, spr, old, items)
    else:
        # The extra problems need an LPT loop over every slot anyway: run the sticky
        # packing and eplb's packing of every row (the references) in that same loop.
        f_exp, f_w, f_wrep = items_all[0], items_all[1], wrep_all
        kept = _Kept.prepare(cnt, wrep, items, old, num_ranks, spr)
        placed, stuck, rank, pos, f_stuck = _lpt_joint(kept, f_exp, f_w, spr)
        fresh = _fresh_slots(f_exp, rank, pos, f_stuck, f_wrep, num_ranks, spr)
        slots = kept.finish(placed, stuck, wrep, old, lambda idx: fresh[idx])
        fresh_max = _slot_loads(fresh, f_wrep).max(axis=1)
        x_rows = np.where(twin >= 0, twin, rows + np.cumsum(twin < 0) - 1)  # extra row -> fresh row
        extra_slots = fresh[x_rows]
    got = _slot_loads(slots, wrep).max(axis=1)
    need = np.nonzero(got > lower * (1 + tolerance))[0]
    if fresh is not None:
        ref_slots = fresh[need]
        ref = fresh_max[need]
    elif len(need):
        ref_slots = _pack_fresh(items[0][need], items[1][need], wrep[need], num_ranks, spr)
        ref = _slot_loads(ref_slots, wrep[need]).max(axis=1)

    def result():
        return slots if extra is None else (slots, extra_slots, got, fresh_max[x_rows])

    if not len(need):
        return result()
    # Step 2: where the bound is missed, compare with eplb itself; a placement already
    # within tolerance of eplb stays as it is (so the same load twice moves nothing).
    if group and extra is not None:
        # Only the group's largest max rank load counts: any row under eplb's is fine.
        ref = np.maximum(ref, np.repeat(fresh_max[x_rows].reshape(-1, group).max(axis=1), group)[need])
    accept = ref * (1 + tolerance)
    todo = got[need] > accept
    if not todo.any():
        return result()
    idx, ref_slots, target = need[todo], ref_slots[todo], accept[todo]
    # Step 3: swap replicas off the hottest ranks until comfortably within tolerance of eplb.
    sub = slots[idx]
    improve_by_swaps(sub, wrep[idx], ref[todo] * (1 + tolerance / 2), max_rounds=4 * num_ranks)
    ranks_of = np.broadcast_to(_slot_ranks(num_ranks, spr), (len(idx), num_ranks * spr))
    sub = _arrange(sub.reshape(len(idx), -1), ranks_of, old[idx], spr)
    # Step 4: what swaps could not fix takes eplb's packing, ranks relabelled to the old ones.
    sub_max = _slot_loads(sub, wrep[idx]).max(axis=1)
    worse = sub_max > target
    if worse.any():
        sub[worse] = relabel_to_old(ref_slots[worse], old[idx][worse])
        sub_max[worse] = _slot_loads(sub[worse], wrep[idx[worse]]).max(axis=1)
    slots[idx] = sub
    got = got.copy()
    got[idx] = sub_max
    return result()


@lru_cache(maxsize=16)
def _hash_weights(width: int) -> np.ndarray:
    """A fixed random projection of rows of ``width`` values: a hash, not randomness.

    Cached: creating a generator costs more than the projection it is used for.
    """
    mix = np.random.default_rng(0).random(width)
    mix.setflags(write=False)
    return mix


def _same_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """For each row of a [A, n], the index of a row of b [B, n] with the same values, or -1.

    Rows are matched by a hash (a fixed random projection) and then compared exactly; a
    row whose twin is missed is only packed twice, with the same result.
    """
    if a is b:
        return np.arange(len(a))
    out = np.full(len(a), -1, dtype=np.int64)
    if not len(a) or not len(b):
        return out
    mix = _hash_weights(a.shape[1])
    ha, hb = a @ mix, b @ mix
    order = np.argsort(hb, kind="stable")
    at = np.minimum(np.searchsorted(hb[order], ha), len(b) - 1)
    cand = order[at]
    hit = (hb[cand] == ha) & (a == b[cand]).all(axis=1)
    out[hit] = cand[hit]
    return out


# ---------------------------------------------------------------------------------------
# Policies
# ---------------------------------------------------------------------------------------


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
        plan = _hierarchy(nodes, req.num_groups, num_experts, spr)
        if plan is None:
            slots = solve(load, old_slots, len(ranks), spr, self.sticky, req.tolerance)
            phy2log = slots.reshape(num_layers, -1)
        else:
            if self.sticky and old_slots is not None:
                phy2log, ref, got, ref_max = self._place_hierarchical(
                    load, old_slots, nodes, req.num_groups, spr, req.tolerance, with_ref=True
                )
                phy2log = self._within_tolerance(load, phy2log, old_slots, nodes, req, spr, ref, got, ref_max)
            else:
                phy2log = self._place_hierarchical(load, old_slots, nodes, req.num_groups, spr, req.tolerance)
        return ExpertLayout(phy2log, spr, num_experts, ranks, nodes)

    def _within_tolerance(self, load, phy2log, old_slots, nodes, req, spr, ref, got, ref_max) -> np.ndarray:
        """Per layer, keep the sticky hierarchical placement only if its max rank load is within
        tolerance of eplb's; otherwise take eplb's, ranks relabelled to the old layout (within
        nodes). ref: eplb's phy2log of the layers asked for (bool [L] -> [W, P]); got, ref_max:
        max rank load per layer [L] of the sticky placement and of eplb's."""
        num_ranks = len(nodes)
        lower = load.sum(axis=1) / num_ranks
        worse = (got > lower * (1 + req.tolerance)) & (got > ref_max * (1 + req.tolerance))
        if not worse.any():
            return phy2log
        fixed = relabel_to_old(
            ref(worse).reshape(-1, num_ranks, spr), old_slots[worse], groups=np.asarray(nodes)
        )
        phy2log = phy2log.copy()
        phy2log[worse] = fixed.reshape(int(worse.sum()), -1)
        return phy2log

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
            return np.full((num_layers, len(ranks), spr), _EMPTY, dtype=np.int64)
        at = {r: i for i, r in enumerate(old.ranks)}
        src = np.array([at[r] if r in live and r in at else -1 for r in ranks], dtype=np.int64)
        view = old.rank_view()
        if (src == np.arange(len(ranks))).all() and len(ranks) == old.num_ranks:
            return view.copy()  # the same ranks, all live: the common rebalance
        out = view[:, np.maximum(src, 0), :]
        out[:, src < 0, :] = _EMPTY
        return out

    def _place_hierarchical(self, load, old_slots, nodes, num_groups, spr, tolerance, with_ref=False):
        """Step 1: groups to nodes. Steps 2-3: replicate and pack within each node.

        Returns phy2log [L, R * S]. With ``with_ref``, returns (phy2log, a function giving
        eplb's hierarchical phy2log of the same load for some layers, and the max rank load
        per layer of both: [L], [L]); eplb's problems are packed in the same batches as the
        references sticky needs anyway.
        """
        num_layers, num_experts = load.shape
        node_ids = sorted(set(nodes))
        num_nodes = len(node_ids)
        per_node = len(nodes) // num_nodes
        group_size = num_experts // num_groups
        groups_per_node = num_groups // num_nodes
        group_load = load.reshape(num_layers, num_groups, group_size).sum(axis=2)
        # Step 1: pack groups onto nodes (each node gets groups_per_node groups).
        node_of = np.asarray(nodes)
        positions = np.concatenate([np.nonzero(node_of == n)[0] for n in node_ids])  # rank positions, node by node
        old_groups = None
        if self.sticky and old_slots is not None:
            old_groups = _old_group_nodes(old_slots, positions, num_nodes, num_groups, group_size, groups_per_node)
        # Groups are packed like experts with one replica each: sticky keeps a group on its node.
        placed = solve(group_load, old_groups, num_nodes, groups_per_node, self.sticky, tolerance,
                       extra=group_load if with_ref else None)
        if with_ref:
            placed, ref_placed = placed[:2]
        node_experts = _node_experts(placed, num_groups, group_size)  # [L, N, n_local]
        n_local = node_experts.shape[2]
        weight = _gather_rows(load, node_experts.reshape(num_layers, -1)).reshape(num_layers * num_nodes, n_local)
        old_local = None
        if old_slots is not None:
            # Map each node's old slots to local ids; experts not owned by the node cannot stay.
            to_local = np.full((num_layers * num_nodes, num_experts + 1), _EMPTY, dtype=np.int64)
            to_local[np.arange(num_layers * num_nodes)[:, None], node_experts.reshape(-1, n_local)] = np.arange(n_local)
            held = old_slots[:, positions, :].reshape(num_layers * num_nodes, per_node * spr)
            old_local = _gather_rows(to_local, np.where(held >= 0, held, num_experts))
            old_local = old_local.reshape(num_layers * num_nodes, per_node, spr)
        ref_experts = ref_weight = None
        if with_ref:
            ref_experts = _node_experts(ref_placed, num_groups, group_size)
            ref_weight = _gather_rows(load, ref_experts.reshape(num_layers, -1)).reshape(weight.shape)
        slots = solve(weight, old_local, per_node, spr, self.sticky, tolerance, extra=ref_weight, group=num_nodes)
        if not with_ref:
            return _node_slots_to_global(slots, node_experts, positions)
        slots, ref_slots, slots_max, ref_max = slots

        def ref_of(layers: np.ndarray) -> np.ndarray:
            """eplb's phy2log of some layers (bool [L]): [W, R * S]; most rounds need none."""
            per_layer = ref_slots.reshape(num_layers, num_nodes, per_node, spr)[layers]
            return _node_slots_to_global(per_layer.reshape(-1, per_node, spr), ref_experts[layers], positions)

        # Layer max rank loads: the largest over the layer's nodes.
        return (
            _node_slots_to_global(slots, node_experts, positions),
            ref_of,
            slots_max.reshape(num_layers, num_nodes).max(axis=1),
            ref_max.reshape(num_layers, num_nodes).max(axis=1),
        )


def _gather_rows(values: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """``np.take_along_axis(values, idx, axis=1)`` for 2-d values [B, m] and idx [B, k]."""
    rows, width = values.shape
    return np.ascontiguousarray(values).ravel()[(np.arange(rows) * width)[:, None] + idx]


def _node_experts(placed: np.ndarray, num_groups: int, group_size: int) -> np.ndarray:
    """Experts of each node, in group order: [L, N, groups_per_node * group_size].

    placed: [L, N, groups_per_node] the groups packed onto each node.
    """
    num_layers, num_nodes, groups_per_node = placed.shape
    gnode = np.empty((num_layers, num_groups), dtype=np.int64)
    gnode[np.arange(num_layers)[:, None], placed.reshape(num_layers, -1)] = np.repeat(
        np.arange(num_nodes), groups_per_node
    )
    order = np.argsort(gnode, axis=1, kind="stable")  # [L, G]: groups node by node, ascending
    node_groups = order.reshape(num_layers, num_nodes, groups_per_node)
    return (node_groups[..., None] * group_size + np.arange(group_size)).reshape(num_layers, num_nodes, -1)


def _node_slots_to_global(slots: np.ndarray, node_experts: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """Per-node packings of local expert ids to phy2log [L, R * S] of global ids.

    slots: [L * N, per_node, S]; node_experts: [L, N, n_local]; positions: [R] rank
    positions of the nodes' ranks, node by node.
    """
    num_layers, num_nodes, n_local = node_experts.shape
    _, per_node, spr = slots.shape
    glob = _gather_rows(node_experts.reshape(-1, n_local), slots.reshape(num_layers * num_nodes, -1))
    out = np.empty((num_layers, len(positions), spr), dtype=np.int64)
    out[:, positions, :] = glob.reshape(num_layers, num_nodes * per_node, spr)
    return out.reshape(num_layers, -1)


def _old_group_nodes(old_slots, positions, num_nodes, num_groups, group_size, groups_per_node) -> np.ndarray:
    """Which groups each node held before: [L, N, groups_per_node] (-1 where none).

    positions: [R] rank positions node by node. A group belongs to the node holding most
    of its replicas; a node claiming more than ``groups_per_node`` groups keeps those it
    holds most replicas of.
    """
    num_layers = old_slots.shape[0]
    held = old_slots[:, positions, :].reshape(num_layers, num_nodes, -1)
    grp = np.where(held >= 0, held // group_size, num_groups)
    at = (np.arange(num_layers)[:, None, None] * (num_groups + 1) + grp) * num_nodes + np.arange(num_nodes)[:, None]
    count = np.bincount(at.ravel(), minlength=num_layers * (num_groups + 1) * num_nodes)
    count = count.reshape(num_layers, num_groups + 1, num_nodes)[:, :num_groups]  # [L, G, N]
    owner = count.argmax(axis=2)  # [L, G]
    strength = np.take_along_axis(count, owner[:, :, None], axis=2)[:, :, 0]
    out = np.full((num_layers, num_nodes, groups_per_node), _EMPTY, dtype=np.int64)
    # Per (layer, node): its claimed groups, strongest first, at most groups_per_node.
    order = np.lexsort((np.arange(num_groups)[None, :].repeat(num_layers, 0), -strength, owner), axis=1)
    sorted_owner = np.take_along_axis(owner, order, axis=1)
    sorted_strength = np.take_along_axis(strength, order, axis=1)
    first = np.ones_like(sorted_owner, dtype=bool)
    first[:, 1:] = sorted_owner[:, 1:] != sorted_owner[:, :-1]
    idx = np.arange(num_groups)[None, :]
    rank_in_node = idx - np.maximum.accumulate(np.where(first, idx, 0), axis=1)
    keep = (rank_in_node < groups_per_node) & (sorted_strength > 0)
    ll, gg = np.nonzero(keep)
    out[ll, sorted_owner[ll, gg], rank_in_node[ll, gg]] = order[ll, gg]
    return out


def _hierarchy(nodes: Sequence[int], num_groups: int, num_experts: int, spr: int):
    """Whether hierarchical placement applies: equal ranks per node and groups dividing over nodes."""
    node_ids = sorted(set(nodes))
    num_nodes = len(node_ids)
    if num_nodes <= 1 or num_groups <= 1 or num_groups % num_nodes or num_experts % num_groups:
        return None
    sizes = {sum(1 for n in nodes if n == k) for k in node_ids}
    if len(sizes) != 1:
        return None
    per_node = sizes.pop()
    experts_per_node = num_experts // num_nodes
    if per_node * spr < experts_per_node or spr > experts_per_node:
        return None
    return True


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
