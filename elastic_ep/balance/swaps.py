"""Lowering a packing's max rank load by swapping replicas between hot and cold ranks."""

from __future__ import annotations

import numpy as np


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
