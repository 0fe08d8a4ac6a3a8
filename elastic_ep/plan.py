"""Transfer planning: old layout + new layout + live ranks -> TransferPlan (pure numpy).

Every (layer, rank, slot) of the new layout gets exactly one action:

* keep      the rank already holds that expert in that slot;
* copy      the rank holds it in another slot (a copy within the GPU);
* receive   a live rank that holds it sends it (point-to-point);
* fetch     no live rank holds it: read it from a host backup or the checkpoint.

Sources are chosen among live holders to balance the bytes each rank sends,
preferring holders on the destination's node. A rank receives an expert at most
once per layer, even if it needs it in two slots (the second is a copy). Dead ranks
are never sources or destinations.

Transfers are grouped into *stages*. In one stage every rank talks to at most one
peer, so blocking send/recv cannot deadlock if, within a stage, the lower rank of
each pair sends first and the higher rank receives first. Executors that post
grouped, non-blocking operations may run several stages at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Optional

import numpy as np

from .errors import LayoutError
from .layout import ExpertLayout

# Columns of TransferPlan.transfers
LAYER, EXPERT, SRC, SRC_SLOT, DST, DST_SLOT, STAGE = range(7)
# Columns of copies: layer, rank, src_slot, dst_slot, after_receive (1: source is a slot filled this round)
# Columns of fetches: layer, expert, rank, slot


@dataclass(frozen=True)
class RankPlan:
    """One rank's part of a TransferPlan. All arrays are int64; slots are local.

    sends: [n, 7] transfers this rank sends, in execution order.
    recvs: [n, 7] transfers this rank receives, in execution order.
    copies: [n, 5] (layer, rank, src_slot, dst_slot, after_receive).
    fetches: [n, 4] (layer, expert, rank, slot).
    keeps: number of slots left as they are.
    """

    rank: int
    sends: np.ndarray
    recvs: np.ndarray
    copies: np.ndarray
    fetches: np.ndarray
    keeps: int

    @property
    def peers(self) -> list[int]:
        """Every rank this rank exchanges with."""
        return sorted(set(self.sends[:, DST].tolist()) | set(self.recvs[:, SRC].tolist()))

    def ops_in_order(self) -> list[tuple[str, int, int]]:
        """(kind, index into sends/recvs, peer) in the deadlock-free blocking order.

        Stage by stage; within a stage the lower rank of a pair sends first.
        """
        ops: list[tuple[int, int, int, str, int, int]] = []
        for i, t in enumerate(self.sends):
            peer = int(t[DST])
            first = 0 if self.rank < peer else 1
            ops.append((int(t[STAGE]), first, i, "send", i, peer))
        for i, t in enumerate(self.recvs):
            peer = int(t[SRC])
            first = 1 if self.rank < peer else 0
            ops.append((int(t[STAGE]), first, i, "recv", i, peer))
        ops.sort()
        return [(kind, idx, peer) for _, _, _, kind, idx, peer in ops]


@dataclass(frozen=True)
class TransferPlan:
    """Everything that must happen to turn the old layout into the new one.

    transfers: [T, 7] (layer, expert, src, src_slot, dst, dst_slot, stage), sorted by
        (stage, src, dst, layer, expert): every rank derives the same order.
    copies: [C, 5] (layer, rank, src_slot, dst_slot, after_receive).
    fetches: [F, 4] (layer, expert, rank, slot).
    keeps: [L, P_new] bool, slots left untouched.
    bytes_sent / bytes_received / bytes_fetched: per rank id.
    """

    old: ExpertLayout
    new: ExpertLayout
    live_ranks: frozenset[int]
    transfers: np.ndarray
    copies: np.ndarray
    fetches: np.ndarray
    keeps: np.ndarray
    expert_bytes: int
    num_stages: int
    bytes_sent: dict[int, int] = field(default_factory=dict)
    bytes_received: dict[int, int] = field(default_factory=dict)
    bytes_fetched: dict[int, int] = field(default_factory=dict)

    # -- views -------------------------------------------------------------------------

    def for_rank(self, rank: int) -> RankPlan:
        """This rank's part of the plan."""
        t = self.transfers
        return RankPlan(
            rank=int(rank),
            sends=t[t[:, SRC] == rank],
            recvs=t[t[:, DST] == rank],
            copies=self.copies[self.copies[:, 1] == rank],
            fetches=self.fetches[self.fetches[:, 2] == rank],
            keeps=int(self.keeps[:, self._cols(rank)].sum()) if rank in self.new.ranks else 0,
        )

    def _cols(self, rank: int) -> slice:
        pos = self.new.position(rank)
        spr = self.new.slots_per_rank
        return slice(pos * spr, (pos + 1) * spr)

    @property
    def participants(self) -> list[int]:
        """Ranks with anything to do (send, receive, copy or fetch)."""
        ranks = set(self.transfers[:, SRC].tolist()) | set(self.transfers[:, DST].tolist())
        ranks |= set(self.copies[:, 1].tolist()) | set(self.fetches[:, 2].tolist())
        return sorted(int(r) for r in ranks)

    @property
    def is_noop(self) -> bool:
        return not (len(self.transfers) or len(self.copies) or len(self.fetches))

    def summary(self) -> dict:
        """Counts and bytes, with max over ranks (JSON friendly)."""
        return {
            "keeps": int(self.keeps.sum()),
            "copies": int(len(self.copies)),
            "transfers": int(len(self.transfers)),
            "fetches": int(len(self.fetches)),
            "stages": int(self.num_stages),
            "bytes_p2p": int(len(self.transfers)) * self.expert_bytes,
            "bytes_fetched": int(len(self.fetches)) * self.expert_bytes,
            "max_rank_bytes_sent": max(self.bytes_sent.values(), default=0),
            "max_rank_bytes_received": max(self.bytes_received.values(), default=0),
            "max_rank_bytes_fetched": max(self.bytes_fetched.values(), default=0),
        }


def plan_transfers(
    old: ExpertLayout,
    new: ExpertLayout,
    live_ranks: Iterable[int],
    *,
    expert_bytes: int = 1,
    fresh_ranks: Optional[Iterable[int]] = None,
) -> TransferPlan:
    """Plan the moves that turn ``old`` into ``new``.

    live_ranks: ranks of ``old`` whose slots still hold their weights (survivors).
    fresh_ranks: ranks of ``new`` that start empty (replacements taking over a dead
        rank's id, grown ranks). Defaults to every rank of ``new`` not in ``live_ranks``.
    Every rank of ``new`` must be live or fresh; a dead rank is never a destination.
    """
    if old.num_layers != new.num_layers or old.num_experts != new.num_experts:
        raise LayoutError(
            f"old layout is {old.num_layers} layers x {old.num_experts} experts, "
            f"new is {new.num_layers} x {new.num_experts}"
        )
    live = frozenset(int(r) for r in live_ranks)
    unknown = sorted(live - set(old.ranks))
    if unknown:
        raise LayoutError(f"live ranks {unknown} are not in the old layout (ranks {list(old.ranks)})")
    fresh = (
        frozenset(new.ranks) - live if fresh_ranks is None else frozenset(int(r) for r in fresh_ranks)
    )
    both = sorted(live & fresh)
    if both:
        raise LayoutError(f"ranks {both} cannot be both live (holding weights) and fresh (empty)")
    orphan = [r for r in new.ranks if r not in live and r not in fresh]
    if orphan:
        raise LayoutError(f"new layout places experts on dead ranks {orphan} with no replacement")
    if new.num_layers == 0:
        raise LayoutError("empty layout")

    num_layers, num_experts = new.num_layers, new.num_experts
    spr_new = new.slots_per_rank
    # holder[l, e, i] = local slot of expert e on old rank position i, if that rank is live.
    old_view = old.rank_view()
    old_live = np.array([r in live for r in old.ranks], dtype=bool)
    holder = np.full((num_layers, num_experts, old.num_ranks), -1, dtype=np.int64)
    ll, ii, ss = np.nonzero(np.broadcast_to(old_live[None, :, None], old_view.shape))
    holder[ll, old_view[ll, ii, ss], ii] = ss

    # Step 1: classify every new slot.
    new_view = new.rank_view()  # [L, R_new, S]
    old_pos_of_new = np.array(
        [old.ranks.index(r) if (r in live) else -1 for r in new.ranks], dtype=np.int64
    )
    rows_l = np.arange(num_layers)[:, None, None]
    has_old = old_pos_of_new >= 0
    own_slot = np.where(
        has_old[None, :, None],
        holder[rows_l, new_view, np.maximum(old_pos_of_new, 0)[None, :, None]],
        -1,
    )  # [L, R_new, S]: where this rank holds the expert now, or -1
    local_idx = np.arange(spr_new)[None, None, :]
    keep = own_slot == local_idx
    copy = (own_slot >= 0) & ~keep
    need = own_slot < 0

    copies = []
    cl, cr, cs = np.nonzero(copy)
    if len(cl):
        copies.append(
            np.stack(
                [cl, np.asarray(new.ranks)[cr], own_slot[cl, cr, cs], cs, np.zeros_like(cl)], axis=1
            )
        )

    # Step 2: a rank needing one expert in two slots receives it once, then copies.
    nl, nr, ns = np.nonzero(need)
    ne = new_view[nl, nr, ns]
    key = (nl * new.num_ranks + nr) * num_experts + ne
    order = np.lexsort((ns, key))
    key_sorted = key[order]
    first = np.ones(len(order), dtype=bool)
    first[1:] = key_sorted[1:] != key_sorted[:-1]
    prim = order[first]
    if (~first).any():
        dup = order[~first]
        run_start = np.maximum.accumulate(np.where(first, np.arange(len(order)), 0))
        src_slot = ns[order[run_start[~first]]]
        copies.append(
            np.stack(
                [nl[dup], np.asarray(new.ranks)[nr[dup]], src_slot, ns[dup], np.ones(len(dup), np.int64)],
                axis=1,
            )
        )
    pl, pr, ps, pe = nl[prim], nr[prim], ns[prim], ne[prim]
    dst_rank = np.asarray(new.ranks, dtype=np.int64)[pr]

    # Step 3: receive from a live holder, or fetch when there is none.
    cand = holder[pl, pe, :]  # [N, R_old] local slot per old rank position, -1 if not held
    held = cand >= 0
    has_source = held.any(axis=1)
    fetches = np.stack([pl, pe, dst_rank, ps], axis=1)[~has_source]

    recv_idx = np.nonzero(has_source)[0]
    old_ranks = np.asarray(old.ranks, dtype=np.int64)
    old_nodes = np.asarray(old.rank_nodes, dtype=np.int64)
    new_nodes = np.asarray(new.rank_nodes, dtype=np.int64)
    src_pos = _choose_sources(
        held[recv_idx], new_nodes[pr[recv_idx]], old_nodes, expert_bytes, pl[recv_idx], pe[recv_idx]
    )
    transfers = np.empty((len(recv_idx), 7), dtype=np.int64)
    transfers[:, LAYER] = pl[recv_idx]
    transfers[:, EXPERT] = pe[recv_idx]
    transfers[:, SRC] = old_ranks[src_pos]
    transfers[:, SRC_SLOT] = cand[recv_idx, src_pos]
    transfers[:, DST] = dst_rank[recv_idx]
    transfers[:, DST_SLOT] = ps[recv_idx]
    transfers[:, STAGE] = 0
    num_stages = _assign_stages(transfers)
    transfers = transfers[
        np.lexsort(
            (transfers[:, EXPERT], transfers[:, LAYER], transfers[:, DST], transfers[:, SRC], transfers[:, STAGE])
        )
    ]
    copies_arr = np.concatenate(copies) if copies else np.empty((0, 5), dtype=np.int64)
    if len(copies_arr):
        copies_arr = copies_arr[np.lexsort((copies_arr[:, 3], copies_arr[:, 0], copies_arr[:, 1]))]

    bytes_sent = _per_rank(transfers[:, SRC], sorted(live), expert_bytes)
    bytes_received = _per_rank(transfers[:, DST], new.ranks, expert_bytes)
    bytes_fetched = _per_rank(fetches[:, 2], new.ranks, expert_bytes)
    return TransferPlan(
        old=old,
        new=new,
        live_ranks=live,
        transfers=transfers,
        copies=copies_arr.astype(np.int64),
        fetches=fetches.astype(np.int64),
        keeps=keep.reshape(num_layers, -1),
        expert_bytes=int(expert_bytes),
        num_stages=num_stages,
        bytes_sent=bytes_sent,
        bytes_received=bytes_received,
        bytes_fetched=bytes_fetched,
    )


def _per_rank(column: np.ndarray, ranks: Iterable[int], expert_bytes: int) -> dict[int, int]:
    """Bytes per rank id for the ranks named in ``column`` (one expert per entry)."""
    ids, counts = np.unique(column, return_counts=True)
    by_rank = dict(zip(ids.tolist(), counts.tolist()))
    return {int(r): int(by_rank.get(int(r), 0)) * int(expert_bytes) for r in ranks}


def _choose_sources(
    held: np.ndarray,
    dst_node: np.ndarray,
    src_nodes: np.ndarray,
    expert_bytes: int,
    layers: np.ndarray,
    experts: np.ndarray,
) -> np.ndarray:
    """Pick a holder per receive: same node first, then the least bytes sent so far.

    held: [N, R_old] which old rank positions hold each needed expert. Returns [N].
    Receives with a single holder are forced; the others are assigned greedily one by
    one (fewest holders first, then layer, expert), each seeing every earlier choice.
    """
    num, num_src = held.shape
    out = np.empty(num, dtype=np.int64)
    if num == 0:
        return out
    sent = np.zeros(num_src, dtype=np.int64)
    nholders = held.sum(axis=1)
    single = nholders == 1
    out[single] = held[single].argmax(axis=1)
    np.add.at(sent, out[single], 1)
    multi = np.nonzero(~single)[0]
    if len(multi) == 0:
        return out
    order = multi[np.lexsort((experts[multi], layers[multi], nholders[multi]))]
    remote = src_nodes[None, :] != dst_node[order][:, None]
    cands = [np.nonzero(row)[0] for row in held[order]]
    sent_list = sent.tolist()
    for i, idx in enumerate(order.tolist()):
        c = cands[i]
        far = remote[i, c]
        best = min(range(len(c)), key=lambda k: (bool(far[k]), sent_list[c[k]], int(c[k])))
        pick = int(c[best])
        out[idx] = pick
        sent_list[pick] += 1
    return out


def _assign_stages(transfers: np.ndarray) -> int:
    """Give every rank pair a stage so that in a stage each rank talks to one peer at most. In place.

    Round-robin tournament (circle method) over the ranks involved: with n ranks
    (n even, a dummy added if odd), pair (i, j) of positions below n-1 meets in round
    (i + j) / 2 mod (n - 1), and pair (i, n - 1) in round i: a proper colouring with
    n - 1 colours, computed without a loop. Unused rounds are squeezed out.
    Returns the number of stages.
    """
    if len(transfers) == 0:
        return 0
    ranks, inverse = np.unique(transfers[:, [SRC, DST]], return_inverse=True)
    pos = inverse.reshape(-1, 2)
    n = len(ranks) + (len(ranks) % 2)
    if n <= 2:
        transfers[:, STAGE] = 0
        return 1
    i = np.minimum(pos[:, 0], pos[:, 1])
    j = np.maximum(pos[:, 0], pos[:, 1])
    half = n // 2  # the inverse of 2 modulo n - 1
    rnd = np.where(j == n - 1, i, ((i + j) * half) % (n - 1))
    used, stage = np.unique(rnd, return_inverse=True)
    transfers[:, STAGE] = stage.ravel()
    return int(len(used))


def apply_plan(plan: TransferPlan, state: dict[int, np.ndarray], storage: Optional[dict] = None) -> dict[int, np.ndarray]:
    """Reference executor over simulated state: rank -> [L, S] expert ids (-1 empty).

    Reads sources only from the old state (as the real executor reads live weights
    and writes staging), so the result is independent of execution order. ``storage``
    is unused for content (a fetch yields the expert id) but counts fetches if given.
    """
    new = plan.new
    out = {r: np.full((new.num_layers, new.slots_per_rank), -1, dtype=np.int64) for r in new.ranks}
    for r in new.ranks:
        if r in plan.live_ranks:
            layers, slots = np.nonzero(plan.keeps[:, plan._cols(r)])
            out[r][layers, slots] = state[r][layers, slots]
    for layer, expert, src, src_slot, dst, dst_slot, _ in plan.transfers:
        if src not in plan.live_ranks:
            raise AssertionError(f"plan sends from dead rank {src}")
        out[dst][layer, dst_slot] = state[src][layer, src_slot]
    for layer, expert, rank, slot in plan.fetches:
        out[rank][layer, slot] = expert
        if storage is not None:
            storage[(int(layer), int(expert))] = storage.get((int(layer), int(expert)), 0) + 1
    for layer, rank, src_slot, dst_slot, after in plan.copies:
        source = out[rank] if after else state[rank]
        out[rank][layer, dst_slot] = source[layer, src_slot]
    return out
