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

Ties are broken by expert id and rank position, so results are deterministic.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
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
    rows = np.arange(batch)
    # Slightly favour low expert ids on exact ties (argmax takes the first).
    for _ in range(extra):
        score = np.where(cnt < max_replicas, weight / cnt, -np.inf)
        cnt[rows, score.argmax(axis=1)] += 1
    return cnt


def _items(cnt: np.ndarray, wrep: np.ndarray, old: Optional[np.ndarray]) -> tuple[np.ndarray, ...]:
    """All replicas to pack, heaviest first, and the old slot each would like to stay in.

    cnt, wrep: [B, n] replicas per expert and load per replica. old: [B, R, S] or None.
    Returns experts [B, k], weights [B, k], pref [B, k] (old global slot or -1), with
    ``k = cnt.sum(1)`` equal for every row. Replica i of expert e prefers e's i-th
    old holder in slot order.
    """
    batch, n = cnt.shape
    width = int(cnt[0].sum())
    order = np.lexsort((np.broadcast_to(np.arange(n), (batch, n)), -wrep), axis=1)  # [B, n]
    reps = np.take_along_axis(cnt, order, axis=1)
    experts = np.repeat(order.ravel(), reps.ravel()).reshape(batch, width)
    weights = np.take_along_axis(wrep, experts, axis=1)
    ends = np.cumsum(reps, axis=1)
    first = np.repeat((ends - reps).ravel(), reps.ravel()).reshape(batch, width)
    replica = np.arange(width)[None, :] - first  # replica index of each item within its expert
    if old is None:
        return experts, weights, np.full((batch, width), _EMPTY, dtype=np.int64)
    flat = old.reshape(batch, -1)
    num_slots = flat.shape[1]
    key = np.where(flat >= 0, flat * num_slots + np.arange(num_slots), n * num_slots)
    holders = np.argsort(key, axis=1, kind="stable")  # slots grouped by expert, in slot order
    oldcnt = np.zeros((batch, n + 1), dtype=np.int64)
    np.add.at(oldcnt, (np.repeat(np.arange(batch), num_slots), np.where(flat >= 0, flat, n).ravel()), 1)
    start = np.cumsum(oldcnt, axis=1) - oldcnt  # [B, n + 1]
    has_pref = replica < np.take_along_axis(oldcnt, experts, axis=1)
    idx = np.minimum(np.take_along_axis(start, experts, axis=1) + replica, num_slots - 1)
    pref = np.where(has_pref, np.take_along_axis(holders, idx, axis=1), _EMPTY)
    return experts, weights, pref


def _lpt(
    experts: np.ndarray,
    weights: np.ndarray,
    load: np.ndarray,
    count: np.ndarray,
    has: np.ndarray,
    spr: int,
) -> np.ndarray:
    """Longest-processing-time packing onto partly filled ranks, in place on load/count/has.

    experts, weights: [B, k] heaviest first, -1 experts as padding. load, count: [B, R].
    has: [B, n + 1, R] whether a rank holds an expert (row n is for padding).
    Each item goes to the least loaded rank with room that lacks the expert; a rank
    that would hold it twice is taken only when nothing else has room (repaired later).
    Returns rank position [B, k] (-1 for padding).
    """
    batch, width = experts.shape
    rows = np.arange(batch)
    pad = has.shape[1] - 1
    out = np.full((batch, width), _EMPTY, dtype=np.int64)
    for j in range(width):
        e = experts[:, j]
        valid = e >= 0
        if not valid.any():
            break
        col = np.where(valid, e, pad)
        room = count < spr
        ok = room & ~has[rows, col]
        rank = np.where(ok, load, np.inf).argmin(axis=1)
        stuck = valid & ~ok[rows, rank]
        if stuck.any():
            rank = np.where(stuck, np.where(room, load, np.inf).argmin(axis=1), rank)
        load[rows, rank] += np.where(valid, weights[:, j], 0.0)
        count[rows, rank] += valid
        has[rows, col, rank] |= valid
        out[:, j] = np.where(valid, rank, _EMPTY)
    return out


def _arrange(experts: np.ndarray, ranks: np.ndarray, old: Optional[np.ndarray], spr: int) -> np.ndarray:
    """Turn (expert, rank) assignments into slots [B, R, S], keeping old slots where possible.

    An expert assigned to a rank that held it before goes back to its old slot; the
    others fill the remaining slots of their rank, lowest slot first.
    """
    batch, width = experts.shape
    num_ranks = width // spr
    n = int(experts.max()) + 1 if experts.size else 0
    slots = np.full((batch, num_ranks, spr), _EMPTY, dtype=np.int64)
    stay = np.zeros((batch, width), dtype=bool)
    if old is not None:
        n = max(n, int(old.max()) + 1)
        new_has = np.zeros((batch, n + 1, num_ranks), dtype=bool)
        new_has[np.arange(batch)[:, None], experts, ranks] = True
        old_has = np.zeros((batch, n + 1, num_ranks), dtype=bool)
        bb, rr, ss = np.nonzero(old >= 0)
        old_has[bb, old[bb, rr, ss], rr] = True
        r_idx = np.broadcast_to(np.arange(num_ranks)[None, :, None], old.shape)
        b_idx = np.broadcast_to(np.arange(batch)[:, None, None], old.shape)
        keep = (old >= 0) & new_has[b_idx, np.where(old >= 0, old, n), r_idx]
        slots[keep] = old[keep]
        stay = old_has[np.arange(batch)[:, None], experts, ranks]
    if old is not None and int(stay.sum()) != int(keep.sum()):
        # A rank given one expert twice (repaired later) keeps it in its old slot once.
        key = (np.arange(batch)[:, None] * (n + 1) + experts) * num_ranks + ranks
        key = np.where(stay, key, -1 - np.arange(width)[None, :] - width * np.arange(batch)[:, None])
        flat = key.ravel()
        order = np.argsort(flat, kind="stable")
        dup = np.zeros(flat.shape, dtype=bool)
        dup[order[1:]] = flat[order[1:]] == flat[order[:-1]]
        stay &= ~dup.reshape(stay.shape)
    b_all = np.broadcast_to(np.arange(batch)[:, None], experts.shape)
    move_b, move_r, move_e = b_all[~stay], ranks[~stay], experts[~stay]
    order = np.lexsort((np.arange(len(move_b)), move_r, move_b))
    free_b, free_r, free_s = np.nonzero(slots == _EMPTY)  # sorted by (b, r, s)
    if len(free_b) != len(order) or not (
        np.array_equal(free_b, move_b[order]) and np.array_equal(free_r, move_r[order])
    ):
        raise AssertionError("packing left a rank with too many or too few experts")
    slots[free_b, free_r, free_s] = move_e[order]
    return slots


def _repair_duplicates(slots: np.ndarray, wrep: np.ndarray) -> None:
    """Swap replicas so that no rank holds one expert twice (rare after LPT). In place.

    slots: [B, R, S]; wrep: [B, n] per-replica load, used to pick the swap that moves least load.
    """
    srt = np.sort(slots, axis=2)
    hits = np.argwhere(srt[:, :, 1:] == srt[:, :, :-1])
    for b, r, i in hits:
        view = slots[b]
        e = int(srt[b, r, i])
        where = np.nonzero(view[r] == e)[0]
        if len(where) < 2:
            continue  # already repaired by an earlier swap
        s = int(where[-1])
        # Candidates: a replica f on a rank without e, such that rank r lacks f.
        ok = ~(view == e).any(axis=1)[:, None] & ~np.isin(view, view[r])
        if not ok.any():
            raise CapacityError(f"cannot place replicas without duplicating expert {e} on a rank")
        cost = np.where(ok, np.abs(wrep[b][view] - wrep[b, e]), np.inf)
        r2, s2 = np.unravel_index(int(cost.argmin()), cost.shape)
        view[r, s], view[r2, s2] = view[r2, s2], e


def _slot_loads(slots: np.ndarray, wrep: np.ndarray) -> np.ndarray:
    """Rank loads [B, R] of slots [B, R, S] (-1: empty) given per-replica loads [B, n]."""
    batch = slots.shape[0]
    flat = slots.reshape(batch, -1)
    per_slot = np.take_along_axis(wrep, np.maximum(flat, 0), axis=1)
    return np.where(flat >= 0, per_slot, 0.0).reshape(slots.shape).sum(axis=2)


def pack(
    weight: np.ndarray, cnt: np.ndarray, num_ranks: int, spr: int, old: Optional[np.ndarray] = None
) -> np.ndarray:
    """Pack ``cnt`` replicas per expert onto ranks: slots [B, R, S].

    weight, cnt: [B, n]. With ``old`` ([B, R, S]), every replica that an old slot can
    keep stays there; only the others are packed (heaviest first, least loaded rank).
    """
    batch, n = weight.shape
    wrep = weight / cnt
    experts, weights, pref = _items(cnt, wrep, old)
    rows = np.broadcast_to(np.arange(batch)[:, None], experts.shape)
    load = np.zeros((batch, num_ranks))
    count = np.zeros((batch, num_ranks), dtype=np.int64)
    has = np.zeros((batch, n + 1, num_ranks), dtype=bool)
    ranks = np.where(pref >= 0, pref // spr, _EMPTY)
    stay = pref >= 0
    if stay.any():
        sb, se, sr = rows[stay], experts[stay], ranks[stay]
        np.add.at(load, (sb, sr), weights[stay])
        np.add.at(count, (sb, sr), 1)
        has[sb, se, sr] = True
    # The rest, heaviest first, left-aligned per problem (padding -1 at the end).
    move = ~stay
    width = int(move.sum(axis=1).max()) if move.size else 0
    if width:
        order = np.argsort(~move, axis=1, kind="stable")[:, :width]
        m_exp = np.take_along_axis(np.where(move, experts, _EMPTY), order, axis=1)
        m_w = np.take_along_axis(weights, order, axis=1)
        placed = _lpt(m_exp, m_w, load, count, has, spr)
        np.put_along_axis(ranks, order, np.where(m_exp >= 0, placed, np.take_along_axis(ranks, order, 1)), axis=1)
    slots = _arrange(experts, ranks, old, spr)
    _repair_duplicates(slots, wrep)
    return slots


def _match_positions(overlap: np.ndarray) -> np.ndarray:
    """Greedy maximum-overlap matching: perm[i] = old position given to new rank i. overlap: [R, R]."""
    size = overlap.shape[0]
    perm = np.full(size, -1, dtype=np.int64)
    used = np.zeros(size, dtype=bool)
    left = size
    for flat in np.argsort(-overlap, axis=None, kind="stable"):
        i, j = divmod(int(flat), size)
        if perm[i] < 0 and not used[j]:
            perm[i] = j
            used[j] = True
            left -= 1
            if not left:
                break
    return perm


def max_rank_load_of(phy2log: np.ndarray, load: np.ndarray, num_ranks: int, spr: int) -> np.ndarray:
    """Max rank load per layer of a placement phy2log [L, P] under load [L, E]: [L]."""
    num_layers, num_experts = load.shape
    cnt = np.zeros((num_layers, num_experts))
    np.add.at(cnt, (np.repeat(np.arange(num_layers), phy2log.shape[1]), phy2log.ravel()), 1)
    wrep = load / np.maximum(cnt, 1)
    return _slot_loads(phy2log.reshape(num_layers, num_ranks, spr), wrep).max(axis=1)


def relabel_to_old(slots: np.ndarray, old: np.ndarray, groups: Optional[np.ndarray] = None) -> np.ndarray:
    """Permute the ranks of a packing to overlap the old one most, then keep old slots.

    slots, old: [B, R, S]. groups: [R] optional; ranks are only permuted within a group
    (a node), so a hierarchical placement stays hierarchical. Balance is unchanged.
    """
    batch, num_ranks, spr = slots.shape
    n = int(max(slots.max(), old.max())) + 2
    new_has = np.zeros((batch, num_ranks, n), dtype=np.int64)
    old_has = np.zeros((batch, num_ranks, n), dtype=np.int64)
    np.put_along_axis(new_has, slots, 1, axis=2)
    np.put_along_axis(old_has, np.where(old >= 0, old, n - 1), 1, axis=2)
    old_has[:, :, n - 1] = 0
    overlap = new_has @ old_has.transpose(0, 2, 1)  # [B, new R, old R]
    if groups is not None:
        same = groups[:, None] == groups[None, :]
        overlap = np.where(same[None], overlap + 1, -1)  # never match across groups
    moved = np.empty_like(slots)
    for b in range(batch):
        moved[b, _match_positions(overlap[b])] = slots[b]
    experts = moved.reshape(batch, -1)
    ranks = np.broadcast_to(np.repeat(np.arange(num_ranks), spr), experts.shape)
    return _arrange(experts, np.ascontiguousarray(ranks), old, spr)


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
    w = np.take_along_axis(wrep, slots.reshape(batch, -1), axis=1).reshape(slots.shape)
    load = w.sum(axis=2)
    act = np.nonzero(load.max(axis=1) > target)[0]
    for _ in range(max_rounds):
        if not len(act):
            break
        sl, ww, ld = slots[act], w[act], load[act]
        rank_order = np.argsort(ld, axis=1, kind="stable")
        hot, cold = rank_order[:, ::-1][:, :m], rank_order[:, :m]  # [A, m]
        ea = np.take_along_axis(sl, hot[:, :, None], axis=1)  # [A, m, S]
        wa = np.take_along_axis(ww, hot[:, :, None], axis=1)
        eb = np.take_along_axis(sl, cold[:, :, None], axis=1)
        wb = np.take_along_axis(ww, cold[:, :, None], axis=1)
        la = np.take_along_axis(ld, hot, axis=1)  # [A, m]
        lb = np.take_along_axis(ld, cold, axis=1)
        d = wa[:, :, :, None] - wb[:, :, None, :]  # [A, m, S(a), S(b)]
        new_max = np.maximum(la[:, :, None, None] - d, lb[:, :, None, None] + d)
        b_on_hot = (eb[:, :, :, None] == ea[:, :, None, :]).any(axis=3)  # [A, m, S(b)]
        a_on_cold = (ea[:, :, :, None] == eb[:, :, None, :]).any(axis=3)  # [A, m, S(a)]
        bad = (d <= 0) | b_on_hot[:, :, None, :] | a_on_cold[:, :, :, None]
        new_max = np.where(bad, np.inf, new_max).reshape(len(act), m, spr * spr)
        best = new_max.argmin(axis=2)  # [A, m]
        best_val = np.take_along_axis(new_max, best[:, :, None], axis=2)[:, :, 0]
        tgt = target[act][:, None]
        do = (best_val < la - 1e-12 * np.maximum(la, 1.0)) & (la > tgt) & (hot != cold)
        if not do.any():
            break
        ai, pi = np.nonzero(do)
        b = act[ai]
        ra, rb = hot[ai, pi], cold[ai, pi]
        ia, jb = np.divmod(best[ai, pi], spr)
        ea_v, wa_v = slots[b, ra, ia].copy(), w[b, ra, ia].copy()
        slots[b, ra, ia], w[b, ra, ia] = slots[b, rb, jb], w[b, rb, jb]
        slots[b, rb, jb], w[b, rb, jb] = ea_v, wa_v
        delta = wa_v - w[b, ra, ia]
        np.subtract.at(load, (b, ra), delta)
        np.add.at(load, (b, rb), delta)
        np.add.at(swaps, b, 1)
        moved = np.unique(b)
        act = moved[load[moved].max(axis=1) > target[moved]]
    return swaps


def solve(
    weight: np.ndarray,
    old: Optional[np.ndarray],
    num_ranks: int,
    spr: int,
    sticky: bool,
    tolerance: float,
) -> np.ndarray:
    """Place n experts (loads weight: [B, n]) on R ranks of S slots: returns slots [B, R, S]."""
    cnt = replicate(weight, num_ranks * spr, num_ranks)
    if not sticky or old is None:
        return pack(weight, cnt, num_ranks, spr)
    wrep = weight / cnt
    # A lower bound on any packing's max rank load: within tolerance of it is within
    # tolerance of eplb too, so eplb itself is only computed where the bound is missed.
    lower = np.maximum(weight.sum(axis=1) / num_ranks, wrep.max(axis=1))
    # Step 1: keep every replica that can stay; pack only the rest (new replicas, lost ones).
    slots = pack(weight, cnt, num_ranks, spr, old)
    got = _slot_loads(slots, wrep).max(axis=1)
    need = np.nonzero(got > lower * (1 + tolerance))[0]
    if not len(need):
        return slots
    # Step 2: where the bound is missed, compare with eplb itself; a placement already
    # within tolerance of eplb stays as it is (so the same load twice moves nothing).
    ref_slots = pack(weight[need], cnt[need], num_ranks, spr)
    ref = _slot_loads(ref_slots, wrep[need]).max(axis=1)
    accept = ref * (1 + tolerance)
    todo = got[need] > accept
    if not todo.any():
        return slots
    idx, ref_slots, target = need[todo], ref_slots[todo], accept[todo]
    # Step 3: swap replicas off the hottest ranks until comfortably within tolerance of eplb.
    sub = slots[idx]
    improve_by_swaps(sub, wrep[idx], ref[todo] * (1 + tolerance / 2), max_rounds=4 * num_ranks)
    ranks_of = np.broadcast_to(np.repeat(np.arange(num_ranks), spr), (len(idx), num_ranks * spr))
    sub = _arrange(sub.reshape(len(idx), -1), np.ascontiguousarray(ranks_of), old[idx], spr)
    # Step 4: what swaps could not fix takes eplb's packing, ranks relabelled to the old ones.
    worse = _slot_loads(sub, wrep[idx]).max(axis=1) > target
    if worse.any():
        sub[worse] = relabel_to_old(ref_slots[worse], old[idx][worse])
    slots[idx] = sub
    return slots


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
        load = validate_load(req.load, num_layers, num_experts)
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
            phy2log = self._place_hierarchical(load, old_slots, nodes, req.num_groups, spr, req.tolerance)
            if self.sticky and old_slots is not None:
                phy2log = self._within_tolerance(load, phy2log, old_slots, nodes, req, spr)
        return ExpertLayout(phy2log, spr, num_experts, ranks, nodes)

    def _within_tolerance(self, load, phy2log, old_slots, nodes, req, spr) -> np.ndarray:
        """Per layer, keep the sticky hierarchical placement only if its max rank load is within
        tolerance of eplb's; otherwise take eplb's, ranks relabelled to the old layout (within nodes)."""
        num_layers, num_experts = load.shape
        num_ranks = len(nodes)

        def max_rank_load(p2l: np.ndarray) -> np.ndarray:
            cnt = np.zeros((num_layers, num_experts))
            np.add.at(cnt, (np.repeat(np.arange(num_layers), p2l.shape[1]), p2l.ravel()), 1)
            wrep = load / np.maximum(cnt, 1)
            return _slot_loads(p2l.reshape(num_layers, num_ranks, spr), wrep).max(axis=1)

        got = max_rank_load(phy2log)
        lower = load.sum(axis=1) / num_ranks
        check = np.nonzero(got > lower * (1 + req.tolerance))[0]
        if not len(check):
            return phy2log
        ref = EplbPolicy()._place_hierarchical(load[check], None, nodes, req.num_groups, spr, req.tolerance)
        sub = phy2log[check]
        worse = got[check] > max_rank_load_of(ref, load[check], num_ranks, spr) * (1 + req.tolerance)
        if worse.any():
            fixed = relabel_to_old(
                ref[worse].reshape(-1, num_ranks, spr), old_slots[check][worse], groups=np.asarray(nodes)
            )
            sub[worse] = fixed.reshape(int(worse.sum()), -1)
            phy2log = phy2log.copy()
            phy2log[check] = sub
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
        out = np.full((num_layers, len(ranks), spr), _EMPTY, dtype=np.int64)
        view = old.rank_view()
        for i, r in enumerate(ranks):
            if r in live and r in old.ranks and old.slots_per_rank == spr:
                out[:, i, :] = view[:, old.position(r), :]
        return out

    def _place_hierarchical(self, load, old_slots, nodes, num_groups, spr, tolerance) -> np.ndarray:
        """Step 1: groups to nodes. Steps 2-3: replicate and pack within each node."""
        num_layers, num_experts = load.shape
        node_ids = sorted(set(nodes))
        num_nodes = len(node_ids)
        per_node = len(nodes) // num_nodes
        group_size = num_experts // num_groups
        groups_per_node = num_groups // num_nodes
        group_load = load.reshape(num_layers, num_groups, group_size).sum(axis=2)
        # Step 1: pack groups onto nodes (each node gets groups_per_node groups).
        positions = [np.nonzero(np.asarray(nodes) == n)[0] for n in node_ids]  # rank positions per node
        old_groups = None
        if self.sticky and old_slots is not None:
            old_groups = _old_group_nodes(old_slots, positions, num_groups, group_size, groups_per_node)
        # Groups are packed like experts with one replica each: sticky keeps a group on its node.
        placed = solve(group_load, old_groups, num_nodes, groups_per_node, self.sticky, tolerance)
        gnode = np.empty((num_layers, num_groups), dtype=np.int64)
        np.put_along_axis(
            gnode, placed.reshape(num_layers, -1), np.repeat(np.arange(num_nodes), groups_per_node)[None, :], axis=1
        )
        # experts of each node, in group order: [L, N, groups_per_node * group_size]
        order = np.argsort(gnode, axis=1, kind="stable")  # [L, G]
        node_groups = order.reshape(num_layers, num_nodes, groups_per_node)
        node_experts = (node_groups[..., None] * group_size + np.arange(group_size)).reshape(
            num_layers, num_nodes, -1
        )
        n_local = node_experts.shape[2]
        weight = np.take_along_axis(load, node_experts.reshape(num_layers, -1), axis=1).reshape(
            num_layers * num_nodes, n_local
        )
        old_local = None
        if old_slots is not None:
            # Map each node's old slots to local ids; experts not owned by the node cannot stay.
            old_local = np.full((num_layers, num_nodes, per_node, spr), _EMPTY, dtype=np.int64)
            to_local = np.full((num_layers, num_nodes, num_experts + 1), _EMPTY, dtype=np.int64)
            ll = np.arange(num_layers)[:, None, None]
            nn = np.arange(num_nodes)[None, :, None]
            to_local[ll, nn, node_experts] = np.arange(n_local)[None, None, :]
            for k, pos in enumerate(positions):
                held = old_slots[:, pos, :]
                idx = np.where(held >= 0, held, num_experts)
                old_local[:, k] = np.take_along_axis(
                    to_local[:, k, :], idx.reshape(num_layers, -1), axis=1
                ).reshape(held.shape)
            old_local = old_local.reshape(num_layers * num_nodes, per_node, spr)
        slots = solve(weight, old_local, per_node, spr, self.sticky, tolerance)
        slots = slots.reshape(num_layers, num_nodes, per_node, spr)
        glob = np.take_along_axis(
            node_experts[:, :, None, :].repeat(per_node, axis=2).reshape(num_layers, num_nodes, per_node, n_local),
            slots,
            axis=3,
        )
        out = np.empty((num_layers, len(nodes), spr), dtype=np.int64)
        for k, pos in enumerate(positions):
            out[:, pos, :] = glob[:, k]
        return out.reshape(num_layers, -1)


def _old_group_nodes(old_slots, positions, num_groups, group_size, groups_per_node) -> np.ndarray:
    """Which groups each node held before: [L, N, groups_per_node] (-1 where none).

    A group belongs to the node holding most of its replicas; a node claiming more than
    ``groups_per_node`` groups keeps those it holds most replicas of.
    """
    num_layers = old_slots.shape[0]
    num_nodes = len(positions)
    count = np.zeros((num_layers, num_groups + 1, num_nodes), dtype=np.int64)
    for k, pos in enumerate(positions):
        held = old_slots[:, pos, :].reshape(num_layers, -1)
        grp = np.where(held >= 0, held // group_size, num_groups)
        np.add.at(count[:, :, k], (np.repeat(np.arange(num_layers), grp.shape[1]), grp.ravel()), 1)
    count = count[:, :num_groups]  # [L, G, N]
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
