"""The dispatch planner: every pair to exactly one live replica, spread evenly, dead ranks masked; bad input named."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from elastic_ep.errors import ExpertsUnavailableError, NotAnMoELayerError, ServingInputError
from elastic_ep.layout import ExpertLayout
from elastic_ep.serving.dispatch import check_call, pairs_to_send, plan_dispatch


@st.composite
def layer_calls(draw):
    """A random valid layout row (every expert held, no rank holding one twice), ranks, dead set, and a call."""
    num_experts = draw(st.integers(1, 9))
    num_ranks = draw(st.integers(1, 5))
    spr = draw(st.integers(-(-num_experts // num_ranks), num_experts + 2))
    spr = min(spr, num_experts)  # a rank holds an expert at most once
    num_slots = num_ranks * spr
    if num_slots < num_experts:
        spr = -(-num_experts // num_ranks)
        num_slots = num_ranks * spr
    rng = np.random.default_rng(draw(st.integers(0, 2**31)))
    # Each rank holds spr distinct experts; union covers all experts (first ranks take a permutation).
    perm = rng.permutation(num_experts)
    rows = []
    for pos in range(num_ranks):
        base = perm[pos * spr:(pos + 1) * spr].tolist()
        extra = [e for e in rng.permutation(num_experts).tolist() if e not in base][: spr - len(base)]
        rows.append(base + extra)
    row = np.array(rows, dtype=np.int64).ravel()
    ranks = tuple(sorted(rng.choice(100, size=num_ranks, replace=False).tolist()))
    dead = tuple(r for r in ranks if draw(st.booleans()) and draw(st.booleans()))
    num_tokens = draw(st.integers(0, 40))
    top_k = draw(st.integers(1, min(4, num_experts)))
    ids = np.stack([rng.choice(num_experts, size=top_k, replace=False) for _ in range(num_tokens)]) \
        if num_tokens else np.zeros((0, top_k), dtype=np.int64)
    return row, spr, ranks, dead, ids, draw(st.integers(0, 1000))


@settings(max_examples=400, deadline=None)
@given(layer_calls())
def test_every_pair_goes_once_to_a_live_replica_spread_evenly(call):
    row, spr, ranks, dead, ids, rotation = call
    ExpertLayout(row[None, :], spr, int(row.max()) + 1, ranks, (0,) * len(ranks))  # the drawn row is a valid layout
    live_positions = [i for i, r in enumerate(ranks) if r not in dead]
    live_experts = set(row.reshape(len(ranks), spr)[live_positions].ravel().tolist())
    needed = set(ids.ravel().tolist())
    if not needed <= live_experts:
        with pytest.raises(ExpertsUnavailableError) as err:
            plan_dispatch(3, row, spr, ranks, dead, ids, rotation)
        assert {e for _, e in err.value.experts} == needed - live_experts
        return
    plan = plan_dispatch(3, row, spr, ranks, dead, ids, rotation)
    num_tokens, top_k = ids.shape
    seen = np.zeros(num_tokens * top_k, dtype=int)
    per_slot = {}
    assert [p.rank for p in plan.parts] == sorted({p.rank for p in plan.parts})
    for part in plan.parts:
        assert part.rank not in dead
        pos = ranks.index(part.rank)
        assert len(part.rows) > 0
        assert np.array_equal(part.tokens, np.unique(part.tokens))  # each token once, ascending
        assert set(part.rows.tolist()) == set(range(len(part.tokens)))  # no token sent in vain
        assert np.all((part.slots >= 0) & (part.slots < spr))
        # the pair's token is the row's token, and the slot holds the pair's expert
        assert np.array_equal(part.tokens[part.rows], part.pairs // top_k)
        assert np.array_equal(row[pos * spr + part.slots], ids.ravel()[part.pairs])
        seen[part.pairs] += 1
        for s in (pos * spr + part.slots).tolist():
            per_slot[s] = per_slot.get(s, 0) + 1
    assert np.all(seen == 1)
    # An expert's pairs differ by at most one between its live replicas.
    for expert in needed:
        replicas = [p for p in range(len(row)) if row[p] == expert and ranks[p // spr] not in dead]
        counts = [per_slot.get(p, 0) for p in replicas]
        assert max(counts) - min(counts) <= 1, (expert, counts)


def test_rotation_spreads_one_token_calls_over_replicas():
    row = np.array([0, 1, 1, 0])  # 2 ranks x 2 slots: experts 0 and 1 on both
    hits = {0: 0, 1: 0}
    for rotation in range(10):
        plan = plan_dispatch(0, row, 2, (0, 1), (), np.array([[0]]), rotation)
        hits[plan.parts[0].rank] += 1
    assert hits == {0: 5, 1: 5}


def test_same_call_same_plan():
    rng = np.random.default_rng(0)
    row = np.array([0, 1, 2, 3, 0, 1, 2, 3])
    ids = rng.integers(0, 4, size=(50, 2))
    a, b = (plan_dispatch(0, row, 4, (0, 1), (), ids, 7) for _ in range(2))
    for pa, pb in zip(a.parts, b.parts):
        assert pa.rank == pb.rank and all(np.array_equal(getattr(pa, f), getattr(pb, f))
                                         for f in ("tokens", "rows", "slots", "pairs"))


GOOD = dict(num_layers=3, num_experts=8, hidden=16, dtype="bfloat16", checkpoint_layers=(1, 3, 5))


def _check(layer=0, shape=(4, 16), dtype="bfloat16", ids=None, weights=None):
    ids = np.zeros((4, 2), dtype=np.int64) if ids is None else ids
    weights = np.full(np.shape(ids), 0.5, dtype=np.float32) if weights is None else weights
    check_call(layer, shape, dtype, ids, weights, **GOOD)


def test_check_call_accepts_good_input():
    _check()


@pytest.mark.parametrize("kwargs, cls, text", [
    (dict(layer=3), NotAnMoELayerError, "layer 3 is not an MoE layer: MoE layers are 0..2 (checkpoint layers [1, 3, 5])"),
    (dict(layer=-1), NotAnMoELayerError, "layer -1"),
    (dict(layer="0"), NotAnMoELayerError, "layer '0'"),
    (dict(shape=(4, 15)), ServingInputError, "[num_tokens, 16], got [4, 15]"),
    (dict(shape=(4,)), ServingInputError, "got [4]"),
    (dict(dtype="float32"), ServingInputError, "must be bfloat16 (the model dtype), got float32"),
    (dict(ids=np.array([[0, 8]] * 4)), ServingInputError, "topk_ids[0, 1] = 8 is not an expert id in [0, 8)"),
    (dict(ids=np.array([[0, 1]] * 3 + [[-1, 0]])), ServingInputError, "topk_ids[3, 0] = -1"),
    (dict(ids=np.zeros((5, 2), dtype=np.int64)), ServingInputError, "topk_ids must be [num_tokens=4, top_k], got [5, 2]"),
    (dict(ids=np.zeros((4, 2))), ServingInputError, "topk_ids must be integers"),
    (dict(weights=np.array([[0.5, -0.1]] * 4)), ServingInputError, "topk_weights[0, 1] = -0.1 is not a finite"),
    (dict(weights=np.array([[0.5, 0.5]] * 3 + [[np.nan, 0.5]])), ServingInputError, "topk_weights[3, 0] = nan"),
    (dict(weights=np.zeros((4, 3))), ServingInputError, "topk_weights must have topk_ids' shape [4, 2], got [4, 3]"),
])
def test_check_call_names_the_bad_value(kwargs, cls, text):
    with pytest.raises(cls) as err:
        _check(**kwargs)
    assert text in str(err.value)
    assert isinstance(err.value, ValueError)


def test_dispatch_imports_no_ray_or_torch():
    root = Path(__file__).resolve().parents[2]
    code = ("import sys, elastic_ep.serving.dispatch, elastic_ep.status\n"
            "print([m for m in ('ray', 'torch', 'torch.distributed') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=60,
                         env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(root)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


@settings(max_examples=300, deadline=None)
@given(layer_calls(), st.integers(0, 2**31))
def test_only_pending_pairs_are_planned_each_once_and_only_their_experts_must_be_live(call, seed):
    row, spr, ranks, dead, ids, rotation = call
    pending = np.random.default_rng(seed).random(ids.shape) < 0.5
    live_positions = [i for i, r in enumerate(ranks) if r not in dead]
    live_experts = set(row.reshape(len(ranks), spr)[live_positions].ravel().tolist())
    needed = set(ids[pending].tolist())
    if not needed <= live_experts:
        with pytest.raises(ExpertsUnavailableError) as err:
            plan_dispatch(3, row, spr, ranks, dead, ids, rotation, pending)
        assert {e for _, e in err.value.experts} == needed - live_experts  # a done pair's expert is not asked for
        return
    plan = plan_dispatch(3, row, spr, ranks, dead, ids, rotation, pending)
    top_k = ids.shape[1]
    seen = np.zeros(ids.size, dtype=int)
    for part in plan.parts:
        assert part.rank not in dead
        pos = ranks.index(part.rank)
        assert np.array_equal(part.tokens, np.unique(part.pairs // top_k))  # only the pending pairs' tokens
        assert np.array_equal(part.tokens[part.rows], part.pairs // top_k)
        assert np.array_equal(row[pos * spr + part.slots], ids.ravel()[part.pairs])
        seen[part.pairs] += 1
    assert np.array_equal(seen, pending.ravel().astype(int))
    if pending.all():  # every pair pending is the plain plan
        full = plan_dispatch(3, row, spr, ranks, dead, ids, rotation)
        assert [(p.rank, p.pairs.tolist(), p.slots.tolist()) for p in plan.parts] == \
            [(p.rank, p.pairs.tolist(), p.slots.tolist()) for p in full.parts]


def test_pending_of_the_wrong_shape_is_named():
    with pytest.raises(ServingInputError, match=r"pending must be \[num_tokens, top_k\] = \[2, 1\], got \[2\]"):
        plan_dispatch(0, np.array([0, 1]), 1, (0, 1), (), np.array([[0], [1]]), 0, np.array([True, False]))


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 2**31), st.integers(0, 12), st.integers(1, 4))
def test_pairs_to_send_keeps_exactly_the_done_pairs_of_tokens_whose_routing_is_unchanged(seed, num_tokens, top_k):
    rng = np.random.default_rng(seed)
    shape = (num_tokens, top_k)
    done = rng.random(shape) < 0.6
    sent_ids, sent_weights = rng.integers(0, 5, shape), rng.random(shape).astype(np.float32)
    ids, weights = sent_ids.copy(), sent_weights.copy()
    moved = rng.random(shape) < 0.2  # degraded mode re-routed or re-weighted these pairs
    ids[moved & (rng.random(shape) < 0.5)] += 1
    weights[moved] *= 2
    reset, pending = pairs_to_send(done, sent_ids, sent_weights, ids, weights)
    for t in range(num_tokens):
        changed = any(done[t, k] and (ids[t, k] != sent_ids[t, k] or weights[t, k] != sent_weights[t, k])
                      for k in range(top_k))
        assert reset[t] == changed
        for k in range(top_k):
            assert pending[t, k] == (changed or not done[t, k])
    _, nothing_done = pairs_to_send(np.zeros(shape, bool), sent_ids, sent_weights, ids, weights)
    assert nothing_done.all()


def test_pairs_to_send_names_mismatched_shapes():
    with pytest.raises(ServingInputError, match="equal shapes"):
        pairs_to_send(np.zeros((2, 2), bool), np.zeros((2, 2)), np.zeros((2, 2)), np.zeros((2, 1)), np.zeros((2, 1)))
