"""The solver both policies run: sticky packing (keep what can stay, pack the rest) checked against eplb's."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Optional

import numpy as np

from .lpt import fresh_slots, lpt, pack_fresh, runs, sorted_experts, replicate
from .slots import EMPTY, arrange, fill_free, gather_rows, repair_rows, slot_loads, slot_ranks, relabel_to_old
from .swaps import improve_by_swaps


def _items(
    cnt: np.ndarray, wrep: np.ndarray, old: Optional[np.ndarray], items: Optional[tuple] = None
) -> tuple[np.ndarray, ...]:
    """All replicas to pack, heaviest first, and the old slot each would like to stay in.

    cnt, wrep: [B, n] replicas per expert and load per replica. old: [B, R, S] or None.
    items: ``sorted_experts(cnt, wrep)`` if already computed.
    Returns experts [B, k], weights [B, k], pref [B, k] (old global slot or -1), with
    ``k = cnt.sum(1)`` equal for every row. Replica i of expert e prefers e's i-th
    old holder in slot order.
    """
    batch, n = cnt.shape
    experts, weights, replica = sorted_experts(cnt, wrep) if items is None else items
    if old is None:
        return experts, weights, np.full(experts.shape, EMPTY, dtype=np.int64)
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
    pref = np.where(has_pref, gather_rows(holders, idx), EMPTY)
    return experts, weights, pref


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
    items: ``sorted_experts(cnt, weight / cnt)`` if already computed.
    """
    wrep = weight / cnt
    if items is None:
        items = sorted_experts(cnt, wrep)
    if old is None:
        return pack_fresh(items[0], items[1], wrep, num_ranks, spr)
    kept = _Kept.prepare(cnt, wrep, items, old, num_ranks, spr)
    none = np.zeros((0, kept.moving.shape[1]))
    placed, stuck, _, _, _ = _lpt_joint(kept, none.astype(np.int64), none, spr)
    return kept.finish(
        placed, stuck, wrep, old, lambda idx: pack_fresh(items[0][idx], items[1][idx], wrep[idx], num_ranks, spr)
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
        ranks = np.where(stay, pref // spr, EMPTY)
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
        moving = np.full((batch, width), EMPTY, dtype=np.int64)
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
            slots[stuck] = arrange(self.experts[stuck], ranks[stuck], old[stuck], self.spr)
            failed = repair_rows(slots, wrep, stuck, strict=False)
            if failed.any():
                slots[failed] = relabel_to_old(fresh(np.nonzero(failed)[0]), old[failed])
        return slots


def _lpt_joint(kept: _Kept, experts: np.ndarray, weights: np.ndarray, spr: int):
    """One LPT loop for a sticky packing's moving replicas and for fresh problems.

    kept: the sticky problems [B1]; experts, weights: [B2, R * S] fresh problems (every
    replica, heaviest first). Rows are lined up longest first (fresh ones, then sticky
    ones by how many replicas move), so ``lpt`` needs no reordering. Returns placed [B1, m]
    and stuck [B1] for kept, then rank, pos [B2, R * S] and stuck [B2] for the fresh ones.
    """
    fresh, fresh_width = experts.shape
    batch, m = kept.moving.shape
    width = max(fresh_width, m)
    num_ranks = kept.key.shape[1]
    moving_count = (kept.moving >= 0).sum(axis=1)
    order = np.argsort(-moving_count, kind="stable")
    total = fresh + batch
    # Item-major from the start (fresh rows, then sticky ones), as lpt takes them.
    weights_t = np.zeros((width, total))
    weights_t[:fresh_width, :fresh] = weights.T
    weights_t[:m, fresh:] = kept.moving_w[order].T
    cont = np.zeros((width, total), dtype=bool)
    cont[:fresh_width, :fresh] = runs(experts)
    cont[:m, fresh:] = runs(kept.moving[order])
    nvalid = np.concatenate([(experts >= 0).sum(axis=1), moving_count[order]])
    key = np.zeros((total, num_ranks))
    key[fresh:] = kept.key[order]
    count = np.zeros((total, num_ranks), dtype=np.int64)
    count[fresh:] = kept.count[order]
    where = np.empty(batch, dtype=np.int64)
    where[order] = np.arange(batch)  # sticky row -> its row among the sticky ones
    held = np.zeros((width, batch, num_ranks), dtype=bool)  # item-major, as lpt takes it
    held[kept.slot_of, where[kept.rows]] = kept.held
    rank, pos, stuck = lpt(cont, nvalid, weights_t, key, count, held, spr, held_from=fresh)
    placed = rank[fresh:, :m][where]
    return placed, stuck[fresh:][where], rank[:fresh], pos[:fresh], stuck[:fresh]


def _arrange_kept(experts: np.ndarray, ranks: np.ndarray, pref: np.ndarray, spr: int) -> np.ndarray:
    """``arrange`` when the kept replicas are known: slots [B, R, S].

    experts, ranks, pref: [B, k]; items with ``pref >= 0`` stay in that old global slot,
    the others fill the free slots of their rank, lowest first, in item order. Same
    result as ``arrange`` when no other item lands on a rank that held its expert.
    """
    batch, width = experts.shape
    num_ranks = width // spr
    slots = np.full(batch * width, EMPTY, dtype=np.int64)
    stay = pref >= 0
    slots[((np.arange(batch) * width)[:, None] + pref)[stay]] = experts[stay]
    return fill_free(slots, experts, ranks, ~stay, num_ranks, spr)


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
        fresh_max = slot_loads(fresh, both / cnt_all).max(axis=1)
        x_rows = np.where(twin >= 0, twin, rows + np.cumsum(twin < 0) - 1)  # extra row -> fresh row
        return fresh[:rows], fresh[x_rows], fresh_max[:rows], fresh_max[x_rows]
    cnt = cnt_all[:rows]
    if own is not None and len(own):
        # Sort the sticky rows and eplb's own rows in one call; split the result after.
        wrep_all = both / cnt_all
        items_all = sorted_experts(cnt_all, wrep_all)
        wrep = wrep_all[:rows]
        items = tuple(x[:rows] for x in items_all)
    else:
        wrep = weight / cnt
        items = sorted_experts(cnt, wrep)
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
        fresh = fresh_slots(f_exp, rank, pos, f_stuck, f_wrep, num_ranks, spr)
        slots = kept.finish(placed, stuck, wrep, old, lambda idx: fresh[idx])
        fresh_max = slot_loads(fresh, f_wrep).max(axis=1)
        x_rows = np.where(twin >= 0, twin, rows + np.cumsum(twin < 0) - 1)  # extra row -> fresh row
        extra_slots = fresh[x_rows]
    got = slot_loads(slots, wrep).max(axis=1)
    need = np.nonzero(got > lower * (1 + tolerance))[0]
    if fresh is not None:
        ref_slots = fresh[need]
        ref = fresh_max[need]
    elif len(need):
        ref_slots = pack_fresh(items[0][need], items[1][need], wrep[need], num_ranks, spr)
        ref = slot_loads(ref_slots, wrep[need]).max(axis=1)

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
    ranks_of = np.broadcast_to(slot_ranks(num_ranks, spr), (len(idx), num_ranks * spr))
    sub = arrange(sub.reshape(len(idx), -1), ranks_of, old[idx], spr)
    # Step 4: what swaps could not fix takes eplb's packing, ranks relabelled to the old ones.
    sub_max = slot_loads(sub, wrep[idx]).max(axis=1)
    worse = sub_max > target
    if worse.any():
        sub[worse] = relabel_to_old(ref_slots[worse], old[idx][worse])
        sub_max[worse] = slot_loads(sub[worse], wrep[idx[worse]]).max(axis=1)
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
