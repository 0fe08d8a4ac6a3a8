"""Transfer planning: old layout + new layout + live ranks -> TransferPlan (pure numpy).

Every (layer, rank, slot) of the new layout gets exactly one action:

* keep      the rank already holds that expert in that slot;
* copy      the rank holds it in another slot (a copy within the GPU);
* receive   a live rank that holds it sends it (point-to-point);
* fetch     no live rank holds it: read it from a host backup or the checkpoint;
* relay     the same, but read by a live rank on the destination's node, which
            then sends it (``stripe_fetches``: every GPU's host link carries a share).

Sources are chosen among live holders to balance the bytes each rank sends,
preferring holders on the destination's node. A rank receives an expert at most
once per layer, even if it needs it in two slots (the second is a copy). Dead ranks
are never sources or destinations.

Relays run as a second round, after the first round's transfers and the relaying
rank's reads: they are ordered by (via, dst, layer, expert) in one stage.

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
    relay_sends: [n, 7] relays this rank reads from storage and sends (SRC = this rank), in order.
    relay_recvs: [n, 7] relays this rank receives (DST = this rank), in order.
    """

    rank: int
    sends: np.ndarray
    recvs: np.ndarray
    copies: np.ndarray
    fetches: np.ndarray
    keeps: int
    relay_sends: np.ndarray = field(default_factory=lambda: np.empty((0, 7), dtype=np.int64))
    relay_recvs: np.ndarray = field(default_factory=lambda: np.empty((0, 7), dtype=np.int64))

    @property
    def peers(self) -> list[int]:
        """Every rank this rank exchanges with (either round)."""
        return sorted(set(self.sends[:, DST].tolist()) | set(self.recvs[:, SRC].tolist())
                      | set(self.relay_sends[:, DST].tolist()) | set(self.relay_recvs[:, SRC].tolist()))

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
    relays: [X, 7] like transfers, for experts no live rank holds: SRC reads it from
        storage and sends it to DST in the second round (SRC_SLOT -1, STAGE 0), sorted
        by (src, dst, layer, expert).
    bytes_sent / bytes_received / bytes_fetched: per rank id (relays count as the
        relaying rank's fetch and send, and the destination's receive).
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
    relays: np.ndarray = field(default_factory=lambda: np.empty((0, 7), dtype=np.int64))

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
            relay_sends=self.relays[self.relays[:, SRC] == rank],
            relay_recvs=self.relays[self.relays[:, DST] == rank],
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
        ranks |= set(self.relays[:, SRC].tolist()) | set(self.relays[:, DST].tolist())
        return sorted(int(r) for r in ranks)

    @property
    def is_noop(self) -> bool:
        return not (len(self.transfers) or len(self.copies) or len(self.fetches) or len(self.relays))

    def summary(self) -> dict:
        """Counts and bytes, with max over ranks (JSON friendly)."""
        return {
            "keeps": int(self.keeps.sum()),
            "copies": int(len(self.copies)),
            "transfers": int(len(self.transfers)),
            "fetches": int(len(self.fetches)),
            "relays": int(len(self.relays)),
            "stages": int(self.num_stages),
            "bytes_p2p": int(len(self.transfers)) * self.expert_bytes,
            "bytes_fetched": int(len(self.fetches) + len(self.relays)) * self.expert_bytes,
            "bytes_relayed": int(len(self.relays)) * self.expert_bytes,
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
    stripe_fetches: bool = False,
) -> TransferPlan:
    """Plan the moves that turn ``old`` into ``new``.

    live_ranks: ranks of ``old`` whose slots still hold their weights (survivors).
    fresh_ranks: ranks of ``new`` that start empty (replacements taking over a dead
        rank's id, grown ranks). Defaults to every rank of ``new`` not in ``live_ranks``.
    stripe_fetches: spread storage reads over the destination and the live ranks of
        the new layout on its node (fewest reads first), the others relaying what they
        read: on GPUs each one's host link carries a share instead of one link all.
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
    old_view = old.rank_view()  # [L, R_old, S_old]
    old_live = np.array([r in live for r in old.ranks], dtype=bool)
    # holder[l * E + e, i] = 1 + local slot of expert e on old rank position i if that rank
    # is live, else 0.
    holder = _holders(old_view, old_live, num_experts)

    # Step 1: classify every new slot by where its rank holds the expert now (-1: nowhere).
    new_view = new.rank_view()  # [L, R_new, S]
    old_pos_of_new = np.array(
        [old.ranks.index(r) if (r in live) else -1 for r in new.ranks], dtype=np.int64
    )
    rows_e = (np.arange(num_layers) * num_experts)[:, None, None]
    own_slot = np.where(
        (old_pos_of_new >= 0)[None, :, None],
        holder[rows_e + new_view, np.maximum(old_pos_of_new, 0)[None, :, None]].astype(np.int64) - 1,
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
    order = _lexsort((ns, key), unique=True)
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
    need_row = pl * num_experts + pe  # row of holder for each needed (layer, expert)
    old_nodes = np.asarray(old.rank_nodes, dtype=np.int64)
    new_nodes = np.asarray(new.rank_nodes, dtype=np.int64)
    if old.num_ranks <= _MAX_MASK_RANKS:
        # held[i]: bit p set if live old rank position p holds the i-th needed expert.
        held = _holder_bits(old_view, old_live, num_experts)[need_row]
        has_source = held != 0
        recv_idx = np.nonzero(has_source)[0]
        src_pos = _choose_sources_bits(
            held[recv_idx], new_nodes[pr[recv_idx]], old_nodes, pl[recv_idx], pe[recv_idx]
        )
    else:
        held = holder[need_row] > 0  # [N, R_old]
        has_source = held.any(axis=1)
        recv_idx = np.nonzero(has_source)[0]
        src_pos = _choose_sources(
            held[recv_idx], new_nodes[pr[recv_idx]], old_nodes, expert_bytes, pl[recv_idx], pe[recv_idx]
        )
    fetches = np.stack([pl, pe, dst_rank, ps], axis=1)[~has_source]
    relays = np.empty((0, 7), dtype=np.int64)
    if stripe_fetches and len(fetches):
        helpers = [r for r in new.ranks if r in live]
        fetches, relays = _stripe(fetches, helpers, dict(zip(new.ranks, new.rank_nodes)))
    old_ranks = np.asarray(old.ranks, dtype=np.int64)
    transfers = np.empty((len(recv_idx), 7), dtype=np.int64)
    transfers[:, LAYER] = pl[recv_idx]
    transfers[:, EXPERT] = pe[recv_idx]
    transfers[:, SRC] = old_ranks[src_pos]
    transfers[:, SRC_SLOT] = holder[need_row[recv_idx], src_pos].astype(np.int64) - 1
    transfers[:, DST] = dst_rank[recv_idx]
    transfers[:, DST_SLOT] = ps[recv_idx]
    transfers[:, STAGE] = 0
    num_stages = _assign_stages(transfers)
    transfers = transfers[
        _lexsort(
            (transfers[:, EXPERT], transfers[:, LAYER], transfers[:, DST], transfers[:, SRC], transfers[:, STAGE]),
            unique=True,  # one receive per (layer, expert, destination)
        )
    ]
    copies_arr = np.concatenate(copies) if copies else np.empty((0, 5), dtype=np.int64)
    if len(copies_arr):
        copies_arr = copies_arr[_lexsort((copies_arr[:, 3], copies_arr[:, 0], copies_arr[:, 1]), unique=True)]

    bytes_sent = _per_rank(np.concatenate([transfers[:, SRC], relays[:, SRC]]), sorted(live), expert_bytes)
    bytes_received = _per_rank(np.concatenate([transfers[:, DST], relays[:, DST]]), new.ranks, expert_bytes)
    bytes_fetched = _per_rank(np.concatenate([fetches[:, 2], relays[:, SRC]]), new.ranks, expert_bytes)
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
        relays=relays,
    )


def _stripe(fetches: np.ndarray, helpers: list[int], node_of: dict[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Share storage reads between each destination and the helper ranks on its node.

    fetches: [F, 4] (layer, expert, rank, slot). helpers: live ranks that may read for
    another. Reads go, in (rank, layer, expert) order, to the candidate (the destination,
    or a helper on its node) with the fewest reads so far; ties go to the destination,
    then to the lowest rank. Returns (fetches kept by their destination [F', 4], relays
    [X, 7] sorted by (src, dst, layer, expert)).
    """
    fetches = fetches[_lexsort((fetches[:, 3], fetches[:, 1], fetches[:, 0], fetches[:, 2]))]
    load: dict[int, int] = {}
    by_node: dict[int, list[int]] = {}
    for r in sorted(helpers):
        by_node.setdefault(node_of[r], []).append(r)
    via = np.empty(len(fetches), dtype=np.int64)
    for i, dst in enumerate(fetches[:, 2].tolist()):
        best = dst
        for r in by_node.get(node_of[dst], ()):
            if load.get(r, 0) < load.get(best, 0):
                best = r
        via[i] = best
        load[best] = load.get(best, 0) + 1
    own = via == fetches[:, 2]
    moved = fetches[~own]
    relays = np.empty((len(moved), 7), dtype=np.int64)
    relays[:, LAYER], relays[:, EXPERT], relays[:, SRC] = moved[:, 0], moved[:, 1], via[~own]
    relays[:, SRC_SLOT], relays[:, DST], relays[:, DST_SLOT], relays[:, STAGE] = -1, moved[:, 2], moved[:, 3], 0
    relays = relays[_lexsort((relays[:, EXPERT], relays[:, LAYER], relays[:, DST], relays[:, SRC]), unique=True)]
    return fetches[own], relays


def _holders(old_view: np.ndarray, old_live: np.ndarray, num_experts: int) -> np.ndarray:
    """Table [L * E, R_old]: 1 + local slot of expert e on old rank position i in layer l
    (row l * E + e), 0 where that rank does not hold it or is not live.

    old_view: [L, R_old, S_old]; old_live: [R_old] bool. Small int dtype (the table is sparse).
    """
    num_layers, num_ranks, spr = old_view.shape
    dtype = np.int8 if spr < np.iinfo(np.int8).max else np.int64
    holder = np.zeros((num_layers * num_experts, num_ranks), dtype=dtype)
    live, row = _live_rows(old_view, old_live, num_experts)
    holder.ravel()[row * num_ranks + live[None, :, None]] = np.arange(1, spr + 1, dtype=dtype)
    return holder


def _live_rows(old_view: np.ndarray, old_live: np.ndarray, num_experts: int) -> tuple[np.ndarray, np.ndarray]:
    """Live old rank positions [R_live] and the (layer, expert) row l * E + e of each of
    their slots: [L, R_live, S_old]."""
    live = np.nonzero(old_live)[0]
    held = old_view if len(live) == len(old_live) else old_view[:, live, :]
    return live, (np.arange(old_view.shape[0]) * num_experts)[:, None, None] + held


def _per_rank(column: np.ndarray, ranks: Iterable[int], expert_bytes: int) -> dict[int, int]:
    """Bytes per rank id for the ranks named in ``column`` (one expert per entry)."""
    ranks = [int(r) for r in ranks]
    if not len(column):
        return {r: 0 for r in ranks}
    lo, hi = int(column.min()), int(column.max())
    if hi - lo <= 4 * len(column) + 1024:
        counts = np.bincount(column - lo).tolist()
        eb = int(expert_bytes)
        return {r: (counts[r - lo] * eb if lo <= r <= hi else 0) for r in ranks}
    ids, counts = np.unique(column, return_counts=True)
    by_rank = dict(zip(ids.tolist(), counts.tolist()))
    return {r: int(by_rank.get(r, 0)) * int(expert_bytes) for r in ranks}


def _lexsort(keys: tuple[np.ndarray, ...], unique: bool = False) -> np.ndarray:
    """``np.lexsort(keys)`` (last key primary) for int keys, as one sort of a combined key.

    unique: the key tuples are known to be distinct, so any sort is stable. Falls back to
    ``np.lexsort`` when the combined key would not fit in int64.
    """
    size = len(keys[0])
    if not size:
        return np.lexsort(keys)
    combined = np.zeros(size, dtype=np.int64)
    span = 1
    for k in reversed(keys):  # primary key first
        lo, hi = int(k.min()), int(k.max())
        width = hi - lo + 1
        span *= width
        if span >= 2**62:
            return np.lexsort(keys)
        combined = combined * width + (k - lo)
    if unique:  # sort (key, position) pairs, then read the positions back
        shift = size.bit_length()
        if span << shift < 2**62:
            return np.sort((combined << shift) | np.arange(size)) & ((1 << shift) - 1)
    return np.argsort(combined, kind="stable")


_MAX_MASK_RANKS = 52  # rank sets as bit masks: exact through float64 sums up to 2**52


def _holder_bits(old_view: np.ndarray, old_live: np.ndarray, num_experts: int) -> np.ndarray:
    """Bit mask of the live old rank positions holding each (layer, expert): [L * E] uint64.

    old_view: [L, R_old, S_old] with R_old <= 52; old_live: [R_old] bool. Distinct bits
    add up to their OR, and float64 holds the sums exactly.
    """
    num_layers = old_view.shape[0]
    live, row = _live_rows(old_view, old_live, num_experts)
    bit = np.broadcast_to((2.0 ** live)[None, :, None], row.shape)
    return np.bincount(row.ravel(), weights=bit.ravel(), minlength=num_layers * num_experts).astype(np.uint64)


def _popcount(x: np.ndarray) -> np.ndarray:
    """Set bits of each entry of a uint64 array: int64 array of the same shape."""
    if hasattr(np, "bitwise_count"):  # numpy >= 2.0
        return np.bitwise_count(x).astype(np.int64)
    u = np.uint64
    x = x - ((x >> u(1)) & u(0x5555555555555555))
    x = (x & u(0x3333333333333333)) + ((x >> u(2)) & u(0x3333333333333333))
    x = (x + (x >> u(4))) & u(0x0F0F0F0F0F0F0F0F)
    return ((x * u(0x0101010101010101)) >> u(56)).astype(np.int64)


def _choose_sources_bits(
    held: np.ndarray, dst_node: np.ndarray, src_nodes: np.ndarray, layers: np.ndarray, experts: np.ndarray
) -> np.ndarray:
    """``_choose_sources`` with the holders of each receive as a bit mask: held [N] uint64.

    Same rule: receives with one holder are forced; the others, fewest holders first,
    then by layer and expert, take a holder on their node if there is one, else any,
    the one that has sent least so far (ties: lowest position). Returns [N] positions.
    """
    num, num_src = len(held), len(src_nodes)
    out = np.empty(num, dtype=np.int64)
    if num == 0:
        return out
    nholders = _popcount(held)
    single = nholders == 1
    out[single] = _popcount(held[single] - np.uint64(1))  # the position of the only bit
    sent = np.bincount(out[single], minlength=num_src)
    multi = np.nonzero(~single)[0]
    if len(multi) == 0:
        return out
    order = multi[_lexsort((experts[multi], layers[multi], nholders[multi]))]
    # Holders on the receiver's node if there are any, else all holders.
    node_ids, src_node_idx = np.unique(src_nodes, return_inverse=True)
    node_bits = np.bincount(src_node_idx, weights=2.0 ** np.arange(num_src), minlength=len(node_ids))
    at = np.minimum(np.searchsorted(node_ids, dst_node[order]), len(node_ids) - 1)
    local = np.where(node_ids[at] == dst_node[order], node_bits[at], 0.0).astype(np.uint64)
    cand = held[order]
    near = cand & local
    cand = np.where(near != 0, near, cand)
    sent_list = sent.tolist()
    picks = []
    for mask in cand.tolist():
        if not mask & (mask - 1):  # one candidate
            best = mask.bit_length() - 1
            sent_list[best] += 1
            picks.append(best)
            continue
        best, low = -1, None
        while mask:  # positions in increasing order: ties keep the lowest
            bit = mask & -mask
            c = bit.bit_length() - 1
            if low is None or sent_list[c] < low:
                best, low = c, sent_list[c]
            mask ^= bit
        picks.append(best)
        sent_list[best] = low + 1
    out[order] = picks
    return out


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
    nholders = held.sum(axis=1)
    single = nholders == 1
    out[single] = held[single].argmax(axis=1)
    sent = np.bincount(out[single], minlength=num_src)
    multi = np.nonzero(~single)[0]
    if len(multi) == 0:
        return out
    order = multi[_lexsort((experts[multi], layers[multi], nholders[multi]))]
    # Candidates per receive: the holders on its node if there are any, else all holders.
    cand = held[order]
    near = cand & (src_nodes[None, :] == dst_node[order][:, None])
    cand = np.where(near.any(axis=1)[:, None], near, cand)
    rows, cols = np.nonzero(cand)  # by receive, then position: ties go to the lowest position
    bounds = np.searchsorted(rows, np.arange(len(order) + 1)).tolist()
    cols = cols.tolist()
    sent_list = sent.tolist()
    picks = []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        best = cols[lo]
        low = sent_list[best]
        for c in cols[lo + 1 : hi]:
            if sent_list[c] < low:
                best, low = c, sent_list[c]
        picks.append(best)
        sent_list[best] = low + 1
    out[order] = picks
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
    pos, num_ranks = _dense_ids(transfers[:, [SRC, DST]])
    n = num_ranks + (num_ranks % 2)
    if n <= 2:
        transfers[:, STAGE] = 0
        return 1
    i = np.minimum(pos[:, 0], pos[:, 1])
    j = np.maximum(pos[:, 0], pos[:, 1])
    half = n // 2  # the inverse of 2 modulo n - 1
    rnd = np.where(j == n - 1, i, ((i + j) * half) % (n - 1))
    stage, num_stages = _dense_ids(rnd)
    transfers[:, STAGE] = stage
    return num_stages


def _dense_ids(values: np.ndarray) -> tuple[np.ndarray, int]:
    """Rank of each value among the distinct values (``np.unique``'s inverse), and their number.

    values: int array of any shape; the result has the same shape.
    """
    lo, hi = int(values.min()), int(values.max())
    if hi - lo > 4 * values.size + 1024:  # sparse ids: sort
        distinct, inverse = np.unique(values, return_inverse=True)
        return inverse.reshape(values.shape), len(distinct)
    present = np.zeros(hi - lo + 1, dtype=np.int64)
    present[values.ravel() - lo] = 1
    dense = np.cumsum(present) - 1
    return dense[values - lo], int(dense[-1]) + 1


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
    for layer, expert, via, _, dst, _, _ in plan.relays:
        if via not in plan.live_ranks or via == dst:
            raise AssertionError(f"plan relays through rank {via} (live: {sorted(plan.live_ranks)}, to {dst})")
    reads = np.concatenate([plan.fetches, plan.relays[:, [LAYER, EXPERT, DST, DST_SLOT]]])  # (layer, expert, rank, slot)
    for layer, expert, rank, slot in reads:
        out[rank][layer, slot] = expert
        if storage is not None:
            storage[(int(layer), int(expert))] = storage.get((int(layer), int(expert)), 0) + 1
    for layer, rank, src_slot, dst_slot, after in plan.copies:
        source = out[rank] if after else state[rank]
        out[rank][layer, dst_slot] = source[layer, src_slot]
    return out
