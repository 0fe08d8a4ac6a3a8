"""Transfer planning: plans turn the old layout into the new one, exactly, for every elastic event."""

import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from elastic_ep.balance import rebalance_experts
from elastic_ep.errors import LayoutError
from elastic_ep.layout import ExpertLayout
from elastic_ep.plan import (
    DST,
    DST_SLOT,
    EXPERT,
    LAYER,
    SRC,
    STAGE,
    RankPlan,
    TransferPlan,
    apply_plan,
    plan_transfers,
)
from elastic_ep.plan import _MAX_MASK_RANKS, _choose_sources, _choose_sources_bits

# ---------------------------------------------------------------------------
# Helpers: an independent executor, the plan invariants, a blocking send/recv model
# ---------------------------------------------------------------------------


def old_state(old: ExpertLayout, live) -> dict[int, np.ndarray]:
    """What each live rank holds: rank -> [L, S_old] expert ids (identity values)."""
    return {r: old.experts_of(r).copy() for r in live}


def execute(plan: TransferPlan, state: dict[int, np.ndarray]) -> dict[int, np.ndarray]:
    """An executor written from the plan's documented semantics (not apply_plan's code)."""
    new = plan.new
    spr = new.slots_per_rank
    out = {r: np.full((new.num_layers, spr), -1, dtype=np.int64) for r in new.ranks}
    for pos, r in enumerate(new.ranks):
        for layer, slot in zip(*np.nonzero(plan.keeps[:, pos * spr : (pos + 1) * spr])):
            out[r][layer, slot] = state[r][layer, slot]  # a keep leaves local slot `slot` as it is
    for layer, expert, src, src_slot, dst, dst_slot, _ in plan.transfers:
        assert state[src][layer, src_slot] == expert, "source slot does not hold the expert"
        out[dst][layer, dst_slot] = state[src][layer, src_slot]
    for layer, expert, rank, slot in plan.fetches:
        out[rank][layer, slot] = expert
    for layer, expert, via, _, dst, dst_slot, _ in plan.relays:  # second round: via read it, dst receives it
        assert via in state, "a relay through a rank that holds no weights"
        out[dst][layer, dst_slot] = expert
    for layer, rank, src_slot, dst_slot, after in plan.copies:
        out[rank][layer, dst_slot] = (out[rank] if after else state[rank])[layer, src_slot]
    return out


def assert_reaches_new(plan: TransferPlan, old: ExpertLayout, new: ExpertLayout, live) -> None:
    for result in (execute(plan, old_state(old, live)), apply_plan(plan, old_state(old, live))):
        assert set(result) == set(new.ranks)
        for r in new.ranks:
            assert np.array_equal(result[r], new.experts_of(r)), f"rank {r}"


def simulate_blocking(plan: TransferPlan) -> bool:
    """Every rank walks ops_in_order(); a send and a recv complete together when both are at the head.

    Returns True if every rank finishes (no deadlock). Also checks matched ops are the same transfer.
    """
    ranks = sorted(set(plan.transfers[:, SRC].tolist()) | set(plan.transfers[:, DST].tolist()))
    parts = {r: plan.for_rank(r) for r in ranks}
    ops = {r: parts[r].ops_in_order() for r in ranks}
    head = {r: 0 for r in ranks}
    progress = True
    while progress:
        progress = False
        for a in ranks:
            if head[a] >= len(ops[a]):
                continue
            kind, i, peer = ops[a][head[a]]
            if kind != "send" or head[peer] >= len(ops[peer]):
                continue
            kind2, j, peer2 = ops[peer][head[peer]]
            if kind2 == "recv" and peer2 == a:
                assert np.array_equal(parts[a].sends[i], parts[peer].recvs[j]), "send/recv pair mismatch"
                head[a] += 1
                head[peer] += 1
                progress = True
    return all(head[r] == len(ops[r]) for r in ranks)


def check_invariants(plan: TransferPlan, old: ExpertLayout, new: ExpertLayout, live, fresh) -> None:
    live, fresh = set(live), set(fresh)
    dead = set(old.ranks) - live
    spr = new.slots_per_rank
    t, c, f, x = plan.transfers, plan.copies, plan.fetches, plan.relays
    assert t.dtype == c.dtype == f.dtype == x.dtype == np.int64 and x.shape[1:] == (7,)
    assert t.shape[1:] == (7,) and c.shape[1:] == (5,) and f.shape[1:] == (4,)
    assert plan.keeps.shape == new.phy2log.shape and plan.keeps.dtype == bool
    assert plan.live_ranks == frozenset(live)

    # dead ranks are never sources; destinations are ranks of the new layout (live or fresh)
    assert set(t[:, SRC].tolist()) <= live
    assert set(t[:, DST].tolist()) <= set(new.ranks)
    assert not (set(t[:, DST].tolist()) & (dead - fresh))
    assert not (set(t[:, SRC].tolist()) & dead)
    assert set(f[:, 2].tolist()) <= set(new.ranks)
    # a copy reads the rank's own old slot: only live ranks (or a slot filled this round) copy
    assert all(int(r) in live for r in c[c[:, 4] == 0][:, 1])
    assert (t[:, SRC] != t[:, DST]).all()

    # what moves is right: sources hold the expert, destinations need it
    for layer, expert, src, src_slot, dst, dst_slot, stage in t:
        assert old.experts_of(src)[layer, src_slot] == expert
        assert new.experts_of(dst)[layer, dst_slot] == expert
        assert 0 <= stage < plan.num_stages
    for layer, expert, rank, slot in f:
        assert new.experts_of(rank)[layer, slot] == expert
    # relays: read by a live rank of the new layout on the destination's node, for another rank
    node_of = dict(zip(new.ranks, new.rank_nodes))
    for layer, expert, via, via_slot, dst, dst_slot, stage in x:
        assert via in live and via in new.ranks and via != dst and node_of[via] == node_of[dst]
        assert via_slot == -1 and stage == 0
        assert new.experts_of(dst)[layer, dst_slot] == expert
    order = np.lexsort((x[:, EXPERT], x[:, LAYER], x[:, DST], x[:, SRC]))
    assert np.array_equal(order, np.arange(len(x)))

    # no fetch for an expert any live rank holds in that layer
    for layer, expert in np.concatenate([f[:, :2], x[:, :2]]):
        for r in live:
            assert expert not in old.experts_of(r)[layer], f"fetch of ({layer}, {expert}) held by live {r}"

    # each (layer, dst, expert) is received at most once
    keys = {(int(x[LAYER]), int(x[DST]), int(x[EXPERT])) for x in t}
    assert len(keys) == len(t)

    # every new slot gets exactly one action
    actions: dict[tuple[int, int, int], str] = {}

    def mark(key, what):
        assert key not in actions, f"slot {key} has {actions[key]} and {what}"
        actions[key] = what

    for pos, r in enumerate(new.ranks):
        for layer, slot in zip(*np.nonzero(plan.keeps[:, pos * spr : (pos + 1) * spr])):
            mark((int(layer), r, int(slot)), "keep")
            assert r in live
            assert old.experts_of(r)[layer, slot] == new.experts_of(r)[layer, slot]
    for row in t:
        mark((int(row[LAYER]), int(row[DST]), int(row[DST_SLOT])), "receive")
    for row in f:
        mark((int(row[0]), int(row[2]), int(row[3])), "fetch")
    for row in x:
        mark((int(row[LAYER]), int(row[DST]), int(row[DST_SLOT])), "relay")
    for row in c:
        mark((int(row[0]), int(row[1]), int(row[3])), "copy")
    assert len(actions) == new.num_layers * new.num_slots

    # stages: in one stage a rank talks to at most one peer
    for stage in range(plan.num_stages):
        rows = t[t[:, STAGE] == stage]
        assert len(rows), f"stage {stage} is empty"
        peers: dict[int, set[int]] = {}
        for a, b in zip(rows[:, SRC].tolist(), rows[:, DST].tolist()):
            peers.setdefault(a, set()).add(b)
            peers.setdefault(b, set()).add(a)
        assert all(len(p) == 1 for p in peers.values()), peers
    assert plan.num_stages == (int(t[:, STAGE].max()) + 1 if len(t) else 0)

    # transfers are sorted by (stage, src, dst, layer, expert)
    order = np.lexsort((t[:, EXPERT], t[:, LAYER], t[:, DST], t[:, SRC], t[:, STAGE]))
    assert np.array_equal(order, np.arange(len(t)))

    # bytes
    eb = plan.expert_bytes
    assert plan.bytes_sent == {r: int((t[:, SRC] == r).sum() + (x[:, SRC] == r).sum()) * eb for r in sorted(live)}
    assert plan.bytes_received == {r: int((t[:, DST] == r).sum() + (x[:, DST] == r).sum()) * eb for r in new.ranks}
    assert plan.bytes_fetched == {r: int((f[:, 2] == r).sum() + (x[:, SRC] == r).sum()) * eb for r in new.ranks}
    assert sum(plan.bytes_sent.values()) == (len(t) + len(x)) * eb
    assert sum(plan.bytes_received.values()) == (len(t) + len(x)) * eb
    assert sum(plan.bytes_fetched.values()) == (len(f) + len(x)) * eb
    summary = plan.summary()
    assert summary["bytes_p2p"] == len(t) * eb and summary["bytes_fetched"] == (len(f) + len(x)) * eb
    assert summary["bytes_relayed"] == len(x) * eb
    assert summary["keeps"] == int(plan.keeps.sum())
    assert (summary["transfers"], summary["copies"], summary["fetches"], summary["relays"]) == (
        len(t), len(c), len(f), len(x))

    # for_rank parts partition the plan
    everyone = sorted(set(new.ranks) | live)
    parts = [plan.for_rank(r) for r in everyone]
    assert sum(len(p.sends) for p in parts) == len(t)
    assert sum(len(p.recvs) for p in parts) == len(t)
    assert sum(len(p.copies) for p in parts) == len(c)
    assert sum(len(p.fetches) for p in parts) == len(f)
    assert sum(p.keeps for p in parts) == int(plan.keeps.sum())
    assert sum(len(p.relay_sends) for p in parts) == sum(len(p.relay_recvs) for p in parts) == len(x)
    for p in parts:
        assert isinstance(p, RankPlan)
        assert (p.sends[:, SRC] == p.rank).all() and (p.recvs[:, DST] == p.rank).all()
        assert (p.copies[:, 1] == p.rank).all() and (p.fetches[:, 2] == p.rank).all()
        assert (p.relay_sends[:, SRC] == p.rank).all() and (p.relay_recvs[:, DST] == p.rank).all()
        assert p.peers == sorted(set(p.sends[:, DST].tolist()) | set(p.recvs[:, SRC].tolist())
                                 | set(p.relay_sends[:, DST].tolist()) | set(p.relay_recvs[:, SRC].tolist()))
        assert len(p.ops_in_order()) == len(p.sends) + len(p.recvs)
    stacked = np.concatenate([p.sends for p in parts])
    assert sorted(map(tuple, stacked.tolist())) == sorted(map(tuple, t.tolist()))
    assert plan.participants == sorted(
        set(t[:, SRC].tolist()) | set(t[:, DST].tolist()) | set(c[:, 1].tolist()) | set(f[:, 2].tolist())
        | set(x[:, SRC].tolist()) | set(x[:, DST].tolist())
    )
    assert plan.is_noop == (len(t) + len(c) + len(f) + len(x) == 0)


def assert_same_plan(a: TransferPlan, b: TransferPlan) -> None:
    for name in ("transfers", "copies", "fetches", "relays", "keeps"):
        assert np.array_equal(getattr(a, name), getattr(b, name)), name
    assert a.num_stages == b.num_stages
    assert (a.bytes_sent, a.bytes_received, a.bytes_fetched) == (b.bytes_sent, b.bytes_received, b.bytes_fetched)


# ---------------------------------------------------------------------------
# Hypothesis: random old/new layouts from the policies, for every elastic event
# ---------------------------------------------------------------------------

EVENTS = ("rebalance", "replace", "shrink", "grow", "swap")


@st.composite
def scenarios(draw, events=EVENTS):
    event = draw(st.sampled_from(events))
    num_layers = draw(st.integers(1, 3))
    num_experts = draw(st.integers(4, 16))
    num_ranks = draw(st.integers(2, 6))
    if event == "shrink":
        spr = draw(st.integers(-(-num_experts // (num_ranks - 1)), num_experts))
    else:
        spr = draw(st.integers(-(-num_experts // num_ranks), num_experts))
    num_nodes = draw(st.integers(1, 2))
    seed = draw(st.integers(0, 2**31 - 1))
    old_kind = draw(st.sampled_from(["eplb", "sticky", "round_robin"]))
    new_policy = draw(st.sampled_from(["eplb", "sticky"]))
    expert_bytes = draw(st.integers(1, 4096))
    rng = np.random.default_rng(seed)
    first = 10 * draw(st.integers(0, 3))  # rank ids need not start at 0
    ranks = [first + i for i in range(num_ranks)]
    node = lambda r: r % num_nodes  # noqa: E731
    shape = (num_layers, num_experts)
    load = rng.zipf(1.5, shape) * (rng.random(shape) > 0.2)
    if old_kind == "round_robin":
        old = ExpertLayout.round_robin(num_layers, num_experts, ranks, spr, [node(r) for r in ranks])
    else:
        old = rebalance_experts(load, ranks, spr, rank_nodes=[node(r) for r in ranks], policy=old_kind)
    new_load = load * rng.exponential(1.0, shape)

    if event == "rebalance":
        live, new_ranks = list(ranks), list(ranks)
    elif event == "replace":  # one or two ranks die; replacements take over their ids
        k = draw(st.integers(1, min(2, num_ranks)))
        dead = set(rng.choice(ranks, k, replace=False).tolist())
        live, new_ranks = [r for r in ranks if r not in dead], list(ranks)
    elif event == "shrink":
        k_max = max(k for k in range(1, num_ranks) if (num_ranks - k) * spr >= num_experts)
        k = draw(st.integers(1, k_max))
        dead = set(rng.choice(ranks, k, replace=False).tolist())
        live = [r for r in ranks if r not in dead]
        new_ranks = list(live)
    elif event == "grow":
        live = list(ranks)
        new_ranks = ranks + [100 + i for i in range(draw(st.integers(1, 2)))]
    else:  # swap: dead ranks replaced by spares with new ids
        k = draw(st.integers(1, min(2, num_ranks)))
        dead = set(rng.choice(ranks, k, replace=False).tolist())
        live = [r for r in ranks if r not in dead]
        new_ranks = live + [200 + i for i in range(k)]
        new_ranks = [new_ranks[i] for i in rng.permutation(len(new_ranks))]
    new = rebalance_experts(
        new_load, new_ranks, spr, rank_nodes=[node(r) for r in new_ranks], old=old,
        live_ranks=live, policy=new_policy,
    )
    fresh = [r for r in new_ranks if r not in live]
    return event, old, new, live, fresh, expert_bytes


@settings(max_examples=100, deadline=None)
@given(scenarios())
def test_plan_reaches_new_layout(scenario):
    _, old, new, live, fresh, eb = scenario
    plan = plan_transfers(old, new, live, expert_bytes=eb)
    assert_reaches_new(plan, old, new, live)
    check_invariants(plan, old, new, live, fresh)


@pytest.mark.parametrize("event", EVENTS)
@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_plan_reaches_new_layout_per_event(event, data):
    _, old, new, live, fresh, eb = data.draw(scenarios(events=(event,)))
    plan = plan_transfers(old, new, live, expert_bytes=eb, fresh_ranks=fresh)
    assert_reaches_new(plan, old, new, live)
    check_invariants(plan, old, new, live, fresh)
    if event in ("rebalance", "grow"):
        assert len(plan.fetches) == 0  # every old rank is live and old layouts cover every expert
    for r in fresh:
        assert plan.for_rank(r).keeps == 0 and len(plan.for_rank(r).copies) == 0


@pytest.mark.parametrize("event", EVENTS)
@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_striped_plan_reaches_new_layout_per_event(event, data):
    _, old, new, live, fresh, eb = data.draw(scenarios(events=(event,)))
    plan = plan_transfers(old, new, live, expert_bytes=eb, fresh_ranks=fresh, stripe_fetches=True)
    assert_reaches_new(plan, old, new, live)
    check_invariants(plan, old, new, live, fresh)
    plain = plan_transfers(old, new, live, expert_bytes=eb, fresh_ranks=fresh)
    # striping only moves reads: the same experts are read, the rest of the plan is unchanged
    reads = lambda p: sorted(map(tuple, np.concatenate([p.fetches[:, [0, 1, 2, 3]], p.relays[:, [LAYER, EXPERT, DST, DST_SLOT]]]).tolist()))  # noqa: E731
    assert reads(plan) == reads(plain)
    for name in ("transfers", "copies", "keeps"):
        assert np.array_equal(getattr(plan, name), getattr(plain, name)), name
    # per node, reads are spread: a candidate never has 2+ more reads than another candidate of that node
    node_of = dict(zip(new.ranks, new.rank_nodes))
    counts: dict[int, int] = {}
    for r in np.concatenate([plan.fetches[:, 2], plan.relays[:, SRC]]).tolist():
        counts[r] = counts.get(r, 0) + 1
    for dst in set(plan.fetches[:, 2].tolist()) | set(plan.relays[:, DST].tolist()):
        helpers = [r for r in new.ranks if r in set(live) and node_of[r] == node_of[dst]]
        assert counts.get(dst, 0) <= min(counts.get(r, 0) for r in helpers) + 1 if helpers else True


def test_striping_shares_a_dead_ranks_reads_with_its_node():
    # 1 layer; ranks 0, 1, 2 on node 0 and rank 3 on node 1, 2 slots each; rank 2 dies and is replaced.
    old = ExpertLayout(np.array([[0, 1, 2, 3, 4, 5, 6, 7]]), 2, 8, (0, 1, 2, 3), (0, 0, 0, 1))
    plan = plan_transfers(old, old, [0, 1, 3], expert_bytes=10, fresh_ranks=[2], stripe_fetches=True)
    # (layer, expert, rank, slot): the replacement reads expert 4 itself...
    assert plan.fetches.tolist() == [[0, 4, 2, 0]]
    # ...and rank 0 (fewest reads, lowest id; rank 3 is on another node) reads expert 5 and relays it
    assert plan.relays.tolist() == [[0, 5, 0, -1, 2, 1, 0]]
    assert plan.bytes_fetched == {0: 10, 1: 0, 2: 10, 3: 0}
    assert plan.bytes_sent == {0: 10, 1: 0, 3: 0} and plan.bytes_received[2] == 10
    assert plan.for_rank(0).relay_sends.tolist() == [[0, 5, 0, -1, 2, 1, 0]]
    assert plan.for_rank(2).relay_recvs.tolist() == [[0, 5, 0, -1, 2, 1, 0]]
    assert plan.for_rank(2).peers == [0]
    assert apply_plan(plan, {0: np.array([[0, 1]]), 1: np.array([[2, 3]]), 3: np.array([[6, 7]])})[2].tolist() == [[4, 5]]
    assert len(plan_transfers(old, old, [0, 1, 3], fresh_ranks=[2]).relays) == 0  # off by default


def test_apply_plan_refuses_a_relay_through_a_dead_rank():
    old = ExpertLayout(np.array([[0, 1, 2, 3]]), 2, 4, (0, 1), (0, 0))
    plan = plan_transfers(old, old, [0], fresh_ranks=[1], stripe_fetches=True)
    assert plan.relays[:, SRC].tolist() == [0]
    bad = dataclasses.replace(plan, relays=plan.relays.copy())
    bad.relays[:, SRC] = 1
    with pytest.raises(AssertionError, match="relays through rank 1"):
        apply_plan(bad, {0: np.array([[0, 1]])})


@settings(max_examples=60, deadline=None)
@given(scenarios())
def test_plan_is_deterministic(scenario):
    _, old, new, live, _, eb = scenario
    a = plan_transfers(old, new, live, expert_bytes=eb)
    b = plan_transfers(old, new, list(reversed(live)), expert_bytes=eb)
    assert_same_plan(a, b)
    a = plan_transfers(old, new, live, expert_bytes=eb, stripe_fetches=True)
    b = plan_transfers(old, new, list(reversed(live)), expert_bytes=eb, stripe_fetches=True)
    assert_same_plan(a, b)


@settings(max_examples=100, deadline=None)
@given(scenarios())
def test_blocking_order_never_deadlocks(scenario):
    _, old, new, live, _, eb = scenario
    plan = plan_transfers(old, new, live, expert_bytes=eb)
    assert simulate_blocking(plan)


def test_blocking_model_detects_a_deadlock():
    # Sanity check of the model itself: two ranks that both send first block forever.
    class Fake:
        def __init__(self, ops, sends, recvs):
            self._ops, self.sends, self.recvs = ops, sends, recvs

        def ops_in_order(self):
            return self._ops

    row01 = np.array([0, 0, 0, 0, 1, 0, 0])
    row10 = np.array([0, 1, 1, 0, 0, 0, 0])

    class FakePlan:
        transfers = np.stack([row01, row10])

        def for_rank(self, r):
            if r == 0:
                return Fake([("send", 0, 1), ("recv", 0, 1)], row01[None], row10[None])
            return Fake([("send", 0, 0), ("recv", 0, 0)], row10[None], row01[None])

    assert not simulate_blocking(FakePlan())


# ---------------------------------------------------------------------------
# Golden: a small example worked by hand
# ---------------------------------------------------------------------------

# 2 layers, 4 experts, ranks 0, 1, 2 x 2 slots, all on node 0. Rank 2 dies and a
# replacement takes over its id (fresh, empty).
#            rank 0   rank 1   rank 2
# old L0     [0, 1]   [2, 3]   [0, 2]
# old L1     [3, 2]   [1, 2]   [0, 3]      expert 0 in L1 lives only on the dead rank
# new L0     [1, 0]   [2, 1]   [3, 0]
# new L1     [3, 0]   [1, 3]   [2, 0]
GOLD_OLD = [[0, 1, 2, 3, 0, 2], [3, 2, 1, 2, 0, 3]]
GOLD_NEW = [[1, 0, 2, 1, 3, 0], [3, 0, 1, 3, 2, 0]]


@pytest.fixture
def golden() -> tuple[ExpertLayout, ExpertLayout, TransferPlan]:
    old = ExpertLayout(np.array(GOLD_OLD), 2, 4, (0, 1, 2), (0, 0, 0))
    new = ExpertLayout(np.array(GOLD_NEW), 2, 4, (0, 1, 2), (0, 0, 0))
    return old, new, plan_transfers(old, new, [0, 1], expert_bytes=10)


def test_golden_plan(golden):
    old, new, plan = golden
    # keeps: L0 rank 1 slot 0 (expert 2); L1 rank 0 slot 0 (3), rank 1 slot 0 (1)
    assert plan.keeps.tolist() == [
        [False, False, True, False, False, False],
        [True, False, True, False, False, False],
    ]
    # copies: rank 0 swaps its two L0 experts in place (both read old slots)
    assert plan.copies.tolist() == [[0, 0, 1, 0, 0], [0, 0, 0, 1, 0]]
    # fetches: L1 expert 0 had its only copy on the dead rank; ranks 0 and 2 each fetch it
    assert plan.fetches.tolist() == [[1, 0, 0, 1], [1, 0, 2, 1]]
    # receives (layer, expert, src, src_slot, dst, dst_slot):
    #   L0 e1 0:1 -> 1:1, L0 e3 1:1 -> 2:0, L0 e0 0:0 -> 2:1, L1 e3 0:0 -> 1:1 (single holders)
    #   L1 e2 -> 2:0 has holders 0:1 and 1:1; rank 0 already sends 3, rank 1 one, so rank 1 sends.
    t = plan.transfers
    assert sorted(t[:, :STAGE].tolist()) == [
        [0, 0, 0, 0, 2, 1],
        [0, 1, 0, 1, 1, 1],
        [0, 3, 1, 1, 2, 0],
        [1, 2, 1, 1, 2, 0],
        [1, 3, 0, 0, 1, 1],
    ]
    # stages: the pairs (0,1), (1,2), (0,2) form a triangle, so exactly 3 stages, one pair each;
    # both transfers of a pair share its stage.
    assert plan.num_stages == 3
    pair_stage = {}
    for row in t.tolist():
        pair = (min(row[SRC], row[DST]), max(row[SRC], row[DST]))
        assert pair_stage.setdefault(pair, row[STAGE]) == row[STAGE]
    assert sorted(pair_stage) == [(0, 1), (0, 2), (1, 2)]
    assert sorted(pair_stage.values()) == [0, 1, 2]
    # rows sorted by (stage, src, dst, layer, expert)
    assert t.tolist() == sorted(t.tolist(), key=lambda x: (x[STAGE], x[SRC], x[DST], x[LAYER], x[EXPERT]))
    assert plan.expert_bytes == 10
    assert plan.bytes_sent == {0: 30, 1: 20}
    assert plan.bytes_received == {0: 0, 1: 20, 2: 30}
    assert plan.bytes_fetched == {0: 10, 1: 0, 2: 10}
    assert plan.summary() == {
        "keeps": 3, "copies": 2, "transfers": 5, "fetches": 2, "relays": 0, "stages": 3,
        "bytes_p2p": 50, "bytes_fetched": 20, "bytes_relayed": 0,
        "max_rank_bytes_sent": 30, "max_rank_bytes_received": 30, "max_rank_bytes_fetched": 10,
    }
    assert plan.participants == [0, 1, 2]
    assert not plan.is_noop
    assert plan.live_ranks == frozenset({0, 1})


def test_golden_rank_parts(golden):
    _, _, plan = golden
    r0, r1, r2 = plan.for_rank(0), plan.for_rank(1), plan.for_rank(2)
    assert (r0.keeps, r1.keeps, r2.keeps) == (1, 2, 0)
    assert r0.peers == [1, 2] and r1.peers == [0, 2] and r2.peers == [0, 1]
    # each rank's ops go stage by stage; within a stage the lower rank of the pair sends first
    stage = {tuple(x[:STAGE]): x[STAGE] for x in plan.transfers.tolist()}
    for part in (r0, r1, r2):
        ops = part.ops_in_order()
        assert sorted((k, i) for k, i, _ in ops) == sorted(
            [("send", i) for i in range(len(part.sends))] + [("recv", i) for i in range(len(part.recvs))]
        )
        keyed = []
        for kind, i, peer in ops:
            row = (part.sends if kind == "send" else part.recvs)[i]
            assert peer == (row[DST] if kind == "send" else row[SRC])
            lower_sends_first = (kind == "send") == (part.rank < peer)
            keyed.append((stage[tuple(row[:STAGE].tolist())], 0 if lower_sends_first else 1))
        assert keyed == sorted(keyed)
    assert [k for k, _, _ in r0.ops_in_order()] == ["send"] * 3  # rank 0 only sends
    assert [k for k, _, _ in r2.ops_in_order()] == ["recv"] * 3  # the replacement only receives
    # rank 1 talks to 0 (receives) and to 2 (sends), one peer per stage
    assert sorted(r1.ops_in_order()) == [("recv", 0, 0), ("recv", 1, 0), ("send", 0, 2), ("send", 1, 2)]
    assert r0.copies.tolist() == [[0, 0, 1, 0, 0], [0, 0, 0, 1, 0]]
    assert r0.fetches.tolist() == [[1, 0, 0, 1]] and r1.fetches.tolist() == []
    assert r2.sends.shape == (0, 7) and r0.recvs.shape == (0, 7)
    assert simulate_blocking(plan)


def test_golden_execution(golden):
    old, new, plan = golden
    storage: dict = {}
    out = apply_plan(plan, old_state(old, [0, 1]), storage)
    assert {r: out[r].tolist() for r in out} == {
        0: [[1, 0], [3, 0]], 1: [[2, 1], [1, 3]], 2: [[3, 0], [2, 0]],
    }
    assert storage == {(1, 0): 2}
    assert_reaches_new(plan, old, new, [0, 1])
    check_invariants(plan, old, new, [0, 1], [2])


def test_golden_with_every_rank_live_has_no_fetches():
    old = ExpertLayout(np.array(GOLD_OLD), 2, 4, (0, 1, 2), (0, 0, 0))
    new = ExpertLayout(np.array(GOLD_NEW), 2, 4, (0, 1, 2), (0, 0, 0))
    plan = plan_transfers(old, new, [0, 1, 2])
    assert len(plan.fetches) == 0
    # rank 2 (live now) needs expert 0 in L0 slot 1 and holds it in slot 0: a copy, not a receive
    assert [0, 2, 0, 1, 0] in plan.copies.tolist()
    assert_reaches_new(plan, old, new, [0, 1, 2])
    check_invariants(plan, old, new, [0, 1, 2], [])


# ---------------------------------------------------------------------------
# Source choice
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dst_node,src", [(0, 0), (1, 2)])
def test_source_on_destination_node_preferred(dst_node, src):
    # expert 0 lives on rank 0 (node 0) and rank 2 (node 1); grown rank 3 needs it.
    old = ExpertLayout(np.array([[0, 1, 0]]), 1, 2, (0, 1, 2), (0, 0, 1))
    new = ExpertLayout(np.array([[0, 1, 0, 0]]), 1, 2, (0, 1, 2, 3), (0, 0, 1, dst_node))
    plan = plan_transfers(old, new, [0, 1, 2])
    assert plan.transfers.tolist() == [[0, 0, src, 0, 3, 0, 0]]


def test_sources_spread_bytes_over_holders():
    # expert 0 on ranks 0 and 1 in both layers; grown ranks 2 and 3 need it in both: 2 sends each.
    old = ExpertLayout(np.array([[0, 0], [0, 0]]), 1, 1, (0, 1), (0, 0))
    new = ExpertLayout(np.array([[0, 0, 0, 0], [0, 0, 0, 0]]), 1, 1, (0, 1, 2, 3), (0, 0, 0, 0))
    plan = plan_transfers(old, new, [0, 1], expert_bytes=5)
    assert plan.bytes_sent == {0: 10, 1: 10}
    assert plan.bytes_received == {0: 0, 1: 0, 2: 10, 3: 10}
    # Greedy balancing may pair each source with one receiver (1 stage) or both (2 stages).
    assert plan.num_stages in (1, 2)
    assert simulate_blocking(plan)


def test_sources_balance_within_one_chunk():
    old = ExpertLayout(np.zeros((1, 8), dtype=np.int64), 1, 1, tuple(range(8)), (0,) * 8)
    new = ExpertLayout(np.zeros((1, 16), dtype=np.int64), 1, 1, tuple(range(16)), (0,) * 16)
    plan = plan_transfers(old, new, range(8))
    assert sum(plan.bytes_sent.values()) == 8
    assert max(plan.bytes_sent.values()) == 1, plan.bytes_sent


@settings(max_examples=200, deadline=None)
@given(
    num_src=st.integers(1, _MAX_MASK_RANKS),
    num=st.integers(0, 60),
    num_nodes=st.integers(1, 4),
    seed=st.integers(0, 2**31 - 1),
)
def test_bitmask_source_choice_equals_the_array_rule(num_src, num, num_nodes, seed):
    # Up to _MAX_MASK_RANKS old ranks, plan_transfers picks sources on bit masks; past
    # that, on a [N, R] bool array. Both must choose exactly the same holders.
    rng = np.random.default_rng(seed)
    held = rng.random((num, num_src)) < rng.uniform(0.05, 0.9)
    held[np.arange(num), rng.integers(0, num_src, num)] = True  # every receive has a holder
    bits = (held.astype(np.uint64) << np.arange(num_src, dtype=np.uint64)).sum(axis=1, dtype=np.uint64)
    src_nodes = rng.integers(0, num_nodes, num_src)
    dst_node = rng.integers(0, num_nodes, num)
    layers, experts = rng.integers(0, 3, num), rng.integers(0, 8, num)
    by_bits = _choose_sources_bits(bits, dst_node, src_nodes, layers, experts)
    by_array = _choose_sources(held, dst_node, src_nodes, 1, layers, experts)
    assert by_bits.tolist() == by_array.tolist()
    assert held[np.arange(num), by_array].all()  # every pick holds the expert


def test_plan_over_more_ranks_than_a_mask_holds():
    # 60 old ranks: sources are chosen on the array path; the plan still reaches the new layout.
    num_ranks, spr, num_experts = _MAX_MASK_RANKS + 8, 2, 40
    ranks = list(range(num_ranks))
    nodes = [r // 15 for r in ranks]
    rng = np.random.default_rng(3)
    load = rng.zipf(1.5, (2, num_experts)).astype(np.float64)
    old = rebalance_experts(load, ranks, spr, rank_nodes=nodes, policy="eplb")
    live = ranks[:-3]  # three ranks die; replacements take their ids
    new = rebalance_experts(load[::-1].copy(), ranks, spr, rank_nodes=nodes, old=old, live_ranks=live)
    plan = plan_transfers(old, new, live, expert_bytes=7)
    assert len(plan.transfers) > 0
    assert_reaches_new(plan, old, new, live)
    check_invariants(plan, old, new, live, [r for r in ranks if r not in live])


# ---------------------------------------------------------------------------
# Simple cases
# ---------------------------------------------------------------------------


def test_identical_layouts_are_a_noop():
    lay = rebalance_experts(np.random.default_rng(0).zipf(1.5, (3, 12)), [0, 1, 2, 3], 4)
    plan = plan_transfers(lay, lay, lay.ranks, expert_bytes=100)
    assert plan.is_noop
    assert plan.keeps.all()
    assert plan.num_stages == 0
    assert plan.participants == []
    assert all(v == 0 for v in plan.bytes_sent.values())
    assert plan.summary()["keeps"] == lay.num_layers * lay.num_slots
    assert plan.for_rank(2).ops_in_order() == []


def test_everything_lost_is_fetched():
    old = ExpertLayout.round_robin(2, 4, [0, 1], 2)
    new = ExpertLayout.round_robin(2, 4, [0, 1], 2)
    plan = plan_transfers(old, new, [])  # every rank replaced
    assert len(plan.transfers) == 0 and len(plan.copies) == 0
    assert len(plan.fetches) == 8
    assert plan.bytes_sent == {}
    assert_reaches_new(plan, old, new, [])


def test_graceful_scale_down_live_rank_leaves_and_sends():
    # rank 2 is alive but removed from the new layout: it may still be a source.
    old = ExpertLayout(np.array([[0, 1, 2, 3, 4, 5]]), 2, 6, (0, 1, 2), (0, 0, 0))
    new = ExpertLayout(np.array([[0, 1, 4, 2, 3, 5]]), 3, 6, (0, 1), (0, 0))
    plan = plan_transfers(old, new, [0, 1, 2])
    check_invariants(plan, old, new, [0, 1, 2], [])
    assert plan.bytes_sent[2] == 2  # experts 4 and 5 come from the leaving rank
    assert len(plan.fetches) == 0


def test_explicit_fresh_ranks():
    old = ExpertLayout(np.array(GOLD_OLD), 2, 4, (0, 1, 2), (0, 0, 0))
    new = ExpertLayout(np.array(GOLD_NEW), 2, 4, (0, 1, 2), (0, 0, 0))
    a = plan_transfers(old, new, [0, 1])
    b = plan_transfers(old, new, [0, 1], fresh_ranks=[2])
    assert_same_plan(a, b)


def test_plan_correct_when_slots_per_rank_changes():
    # Shrinking can need more slots per rank: 4 x 2 -> 3 x 3 (checked with the independent executor).
    load = np.ones((2, 8))
    old = rebalance_experts(load, [10, 11, 12, 13], 2, policy="eplb")
    new = rebalance_experts(load, [10, 11, 12], 3, old=old, live_ranks=[10, 11, 12], policy="sticky")
    plan = plan_transfers(old, new, [10, 11, 12])
    out = execute(plan, old_state(old, [10, 11, 12]))
    for r in new.ranks:
        assert np.array_equal(out[r], new.experts_of(r))


def test_apply_plan_when_slots_per_rank_changes():
    load = np.ones((2, 8))
    old = rebalance_experts(load, [10, 11, 12, 13], 2, policy="eplb")
    new = rebalance_experts(load, [10, 11, 12], 3, old=old, live_ranks=[10, 11, 12], policy="sticky")
    plan = plan_transfers(old, new, [10, 11, 12])
    out = apply_plan(plan, old_state(old, [10, 11, 12]))
    for r in new.ranks:
        assert np.array_equal(out[r], new.experts_of(r))


def test_apply_plan_refuses_a_dead_source():
    old = ExpertLayout(np.array(GOLD_OLD), 2, 4, (0, 1, 2), (0, 0, 0))
    new = ExpertLayout(np.array(GOLD_NEW), 2, 4, (0, 1, 2), (0, 0, 0))
    plan = plan_transfers(old, new, [0, 1])
    forged = TransferPlan(**{**plan.__dict__, "live_ranks": frozenset({0})})
    with pytest.raises(AssertionError, match="dead rank 1"):
        apply_plan(forged, old_state(old, [0, 1]))


# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------


@pytest.fixture
def pair() -> tuple[ExpertLayout, ExpertLayout]:
    old = ExpertLayout(np.array(GOLD_OLD), 2, 4, (0, 1, 2), (0, 0, 0))
    new = ExpertLayout(np.array(GOLD_NEW), 2, 4, (0, 1, 2), (0, 0, 0))
    return old, new


def test_live_rank_not_in_old_layout(pair):
    old, new = pair
    with pytest.raises(LayoutError, match=r"live ranks \[7, 99\] are not in the old layout \(ranks \[0, 1, 2\]\)"):
        plan_transfers(old, new, [0, 1, 99, 7])


def test_new_rank_neither_live_nor_fresh_is_named(pair):
    old, new = pair
    with pytest.raises(LayoutError, match=r"dead ranks \[2\] with no replacement"):
        plan_transfers(old, new, [0, 1], fresh_ranks=[])
    with pytest.raises(LayoutError, match=r"dead ranks \[1, 2\]"):
        plan_transfers(old, new, [0], fresh_ranks=[5])


def test_rank_both_live_and_fresh(pair):
    old, new = pair
    with pytest.raises(LayoutError, match=r"ranks \[1\] cannot be both live \(holding weights\) and fresh"):
        plan_transfers(old, new, [0, 1], fresh_ranks=[1, 2])


def test_mismatched_layer_count(pair):
    old, _ = pair
    new = ExpertLayout.round_robin(3, 4, [0, 1, 2], 2)
    with pytest.raises(LayoutError, match="old layout is 2 layers x 4 experts, new is 3 x 4"):
        plan_transfers(old, new, [0, 1, 2])


def test_mismatched_expert_count(pair):
    old, _ = pair
    new = ExpertLayout.round_robin(2, 5, [0, 1, 2], 2)
    with pytest.raises(LayoutError, match="old layout is 2 layers x 4 experts, new is 2 x 5"):
        plan_transfers(old, new, [0, 1, 2])
