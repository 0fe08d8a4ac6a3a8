"""Slot arrays [B, R, S]: placing assignments into slots, repairing duplicates, relabelling ranks."""

from __future__ import annotations

from typing import Optional

import numpy as np

from ..errors import CapacityError

EMPTY = -1  # an empty slot


def gather_rows(values: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """``np.take_along_axis(values, idx, axis=1)`` for 2-d values [B, m] and idx [B, k]."""
    rows, width = values.shape
    return np.ascontiguousarray(values).ravel()[(np.arange(rows) * width)[:, None] + idx]


def argsort_desc(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Stable descending argsort of each row of values [B, n] (ties: lowest index first),
    and the values in that order: ([B, n], [B, n]).

    The order equals ``np.argsort(-values, axis=1, kind="stable")``, found faster:
    non-negative floats sort like their bit patterns, so an integer sort is used and only
    rows with ties take the (slow) stable sort.
    """
    values = np.asarray(values)
    if values.dtype != np.float64 or not values.size or values.min() < 0:
        order = np.argsort(-values, axis=1, kind="stable")
        return order, gather_rows(values, order)
    key = -(values + 0.0).view(np.int64)  # + 0.0 turns -0.0 into 0.0
    order = np.argsort(key, axis=1)
    srt = gather_rows(key, order)
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


def arrange(experts: np.ndarray, ranks: np.ndarray, old: Optional[np.ndarray], spr: int) -> np.ndarray:
    """Turn (expert, rank) assignments into slots [B, R, S], keeping old slots where possible.

    experts, ranks: [B, k] with ``k = R * S``. An expert assigned to a rank that held it
    before goes back to its old slot; the others fill the remaining slots of their rank,
    lowest slot first, in item order.
    """
    batch, width = experts.shape
    num_ranks = width // spr
    if old is None:
        slots = np.full(batch * width, EMPTY, dtype=np.int64)
        stay = np.zeros((batch, width), dtype=bool)
    else:
        n = max(int(experts.max()) + 1 if experts.size else 0, int(old.max()) + 1)
        flat_old = old.reshape(batch, -1)
        valid = flat_old >= 0
        base = (np.arange(batch) * (n + 1))[:, None]
        # Flat keys of (problem, expert, rank); expert n stands for an empty old slot.
        new_key = ((base + experts) * num_ranks + ranks).ravel()
        old_key = (base + np.where(valid, flat_old, n)) * num_ranks + slot_ranks(num_ranks, spr)
        new_has = np.zeros(batch * (n + 1) * num_ranks, dtype=bool)
        new_has[new_key] = True
        keep = valid & new_has[old_key]
        slots = np.where(keep, flat_old, EMPTY).ravel()
        old_has = np.zeros_like(new_has)
        old_has[old_key[valid]] = True
        stay = old_has[new_key].reshape(batch, width)
        if int(stay.sum()) != int(keep.sum()):
            # A rank given one expert twice (repaired later) keeps it in its old slot once:
            # the first such item in item order stays, the others move.
            at = np.flatnonzero(stay)
            stay.ravel()[at[~_first_occurrence(new_key[at])]] = False
    return fill_free(slots, experts, ranks, ~stay, num_ranks, spr)


def fill_free(
    slots: np.ndarray, experts: np.ndarray, ranks: np.ndarray, move: np.ndarray, num_ranks: int, spr: int
) -> np.ndarray:
    """Put the moving items into the free (-1) slots: returns slots [B, R, S].

    slots: [B * R * S] flat, kept replicas placed. experts, ranks, move: [B, k]. Items go
    by (problem, rank) and then item order into their rank's free slots in slot order.
    """
    batch = experts.shape[0]
    move_rank = ((np.arange(batch) * num_ranks)[:, None] + ranks)[move]
    order = _stable_argsort(move_rank)
    free = np.flatnonzero(slots == EMPTY)  # sorted by (problem, rank, slot)
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


def slot_ranks(num_ranks: int, spr: int) -> np.ndarray:
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


def slot_loads(slots: np.ndarray, wrep: np.ndarray) -> np.ndarray:
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


def repair_rows(slots: np.ndarray, wrep: np.ndarray, rows: np.ndarray, strict: bool = True) -> np.ndarray:
    """``_repair_duplicates`` on the rows (bool [B]) where LPT gave a rank an expert twice.

    Returns the rows it could not repair (only with ``strict=False``): bool [B].
    """
    failed = np.zeros(len(slots), dtype=bool)
    if rows.any():
        sub = slots[rows]
        failed[rows] = _repair_duplicates(sub, wrep[rows], strict)
        slots[rows] = sub
    return failed


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
    ranks = np.broadcast_to(slot_ranks(num_ranks, spr), experts.shape)
    return arrange(experts, ranks, old, spr)
