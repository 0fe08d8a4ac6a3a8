"""Layerwise migration (elastic_ep.migration): every intermediate layout valid, each step exactly the target's
moves for its layers, the last layout the one-shot target; staged bytes as planned, on the real executor."""

from __future__ import annotations

import queue
import threading
from collections import defaultdict

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from elastic_ep.balance import rebalance_experts
from elastic_ep.config import ModelSpec
from elastic_ep.errors import LayoutError
from elastic_ep.executor import ExpertWeights, commit, execute_rank_plan
from elastic_ep.layout import ExpertLayout
from elastic_ep.migration import (
    blend,
    changed_layers,
    peak_staged_bytes,
    plan_migration,
    plan_steps,
    split_layers,
    staged_bytes,
)
from elastic_ep.plan import DST, DST_SLOT, EXPERT, LAYER, apply_plan, plan_transfers
from tests.strategies import placement_sizes


@st.composite
def rebalances(draw):
    """(old, target, layers_per_step, expert_bytes): a load-driven re-placement over the same ranks."""
    num_layers, num_experts, num_ranks, spr = placement_sizes(draw, 7, 16, 6)
    num_nodes = draw(st.integers(1, 2))
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    ranks = [10 * draw(st.integers(0, 2)) + i for i in range(num_ranks)]
    nodes = [r % num_nodes for r in ranks]
    shape = (num_layers, num_experts)
    load = rng.zipf(1.5, shape) * (rng.random(shape) > 0.2)
    old_kind = draw(st.sampled_from(["eplb", "sticky", "round_robin"]))
    if old_kind == "round_robin":
        old = ExpertLayout.round_robin(num_layers, num_experts, ranks, spr, nodes)
    else:
        old = rebalance_experts(load, ranks, spr, rank_nodes=nodes, policy=old_kind)
    new_load = load * rng.exponential(1.0, shape) * (rng.random(num_layers) > 0.3)[:, None]  # some layers unchanged
    target = rebalance_experts(new_load, ranks, spr, rank_nodes=nodes, old=old, live_ranks=ranks,
                               policy=draw(st.sampled_from(["eplb", "sticky"])))
    return old, target, draw(st.integers(1, 4)), draw(st.integers(1, 4096))


def _actions(plan, layers=None) -> dict[str, set]:
    """What a plan does to each destination slot, without the sources it picked: per kind, a set of rows."""
    keep = {(int(l), int(p)) for l, p in zip(*np.nonzero(plan.keeps))}
    out = {
        "keep": keep,
        "receive": {tuple(t) for t in plan.transfers[:, [LAYER, EXPERT, DST, DST_SLOT]].tolist()},
        "copy": {tuple(c) for c in plan.copies.tolist()},
        "fetch": {tuple(f) for f in plan.fetches.tolist()} | {tuple(t) for t in plan.relays[:, [LAYER, EXPERT, DST, DST_SLOT]].tolist()},
    }
    if layers is not None:
        out = {k: {row for row in v if row[0] in layers} for k, v in out.items()}
    return out


@settings(max_examples=150, deadline=None)
@given(rebalances())
def test_every_step_is_a_valid_layout_and_moves_exactly_the_targets_layers(case):
    old, target, lps, eb = case
    sched = plan_migration(old, target, lps)
    changed = changed_layers(old, target).tolist()
    # Steps: the changed layers, ascending, lps at a time (the last may be shorter); nothing else.
    assert [layer for step in sched.steps for layer in step] == changed
    assert all(len(step) == lps for step in sched.steps[:-1]) and all(1 <= len(s) <= lps for s in sched.steps)
    assert sched.num_steps == -(-len(changed) // lps) == len(sched.layouts)
    assert (sched.layouts[-1] == target) if changed else sched.layouts == ()
    whole = plan_transfers(old, target, old.ranks, expert_bytes=eb)
    plans = plan_steps(sched, old.ranks, eb)
    state = {r: old.experts_of(r).copy() for r in old.ranks}
    done: list[int] = []
    for k, (step, layout, plan) in enumerate(zip(sched.steps, sched.layouts, plans)):
        done += step
        # A complete valid layout over the same ranks: target rows for the layers done, old rows for the rest.
        layout.validate()
        assert layout.ranks == old.ranks and layout.rank_nodes == old.rank_nodes
        for layer in range(old.num_layers):
            assert np.array_equal(layout.phy2log[layer], (target if layer in done else old).phy2log[layer])
        assert sched.before(k) == (old if k == 0 else sched.layouts[k - 1])
        # The step's moves are the one-shot plan's moves for its layers, and the other layers are all kept.
        mine, theirs = _actions(plan, set(step)), _actions(whole, set(step))
        assert mine == theirs
        others = _actions(plan, set(range(old.num_layers)) - set(step))
        assert not (others["receive"] or others["copy"] or others["fetch"])
        assert len(others["keep"]) == (old.num_layers - len(step)) * old.num_slots
        assert plan.fetches.size == 0 and plan.relays.size == 0  # every expert has a live copy in a rebalance
        state = apply_plan(plan, state)
        for r in old.ranks:
            assert np.array_equal(state[r], layout.experts_of(r))
    for r in old.ranks:  # executed one after the other, the steps reach the one-shot target
        assert np.array_equal(state[r], target.experts_of(r))
    # Staging: the steps stage what the whole move stages, a step at a time.
    per_step = [staged_bytes(p) for p in plans]
    whole_staged = staged_bytes(whole)
    assert {r: sum(s[r] for s in per_step) for r in old.ranks} == (whole_staged if plans else {r: 0 for r in old.ranks})
    peak = peak_staged_bytes(plans, old.ranks)
    assert all(peak[r] <= whole_staged[r] for r in old.ranks)
    assert all(peak[r] == max((s[r] for s in per_step), default=0) for r in old.ranks)


def test_a_worked_example():
    old = ExpertLayout.round_robin(5, 4, [0, 1], 2)  # every layer: rank 0 holds 0, 1; rank 1 holds 2, 3
    rows = old.phy2log.copy()
    for layer in (0, 3, 4):
        rows[layer] = [2, 1, 0, 3]  # experts 0 and 2 swap ranks
    target = ExpertLayout(rows, 2, 4, (0, 1), (0, 0))
    sched = plan_migration(old, target, 2)
    assert sched.steps == ((0, 3), (4,))
    assert np.array_equal(sched.layouts[0].phy2log[:, 0], [2, 0, 0, 2, 0])
    assert sched.layouts[1] == target
    plans = plan_steps(sched, [0, 1], expert_bytes=100)
    assert [len(p.transfers) for p in plans] == [4, 2]  # each swapped layer: one receive per rank
    assert [staged_bytes(p) for p in plans] == [{0: 200, 1: 200}, {0: 100, 1: 100}]
    assert peak_staged_bytes(plans) == {0: 200, 1: 200}
    assert staged_bytes(plan_transfers(old, target, [0, 1], expert_bytes=100)) == {0: 300, 1: 300}


def test_nothing_changed_is_no_step_and_one_layer_per_step_by_default_of_size():
    old = ExpertLayout.round_robin(3, 4, [0, 1], 3)
    assert plan_migration(old, old, 1).steps == ()
    assert split_layers([5, 1, 2], 5) == ((5, 1, 2),)
    assert split_layers([], 2) == ()


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_layers_per_step_must_be_a_positive_int(bad):
    with pytest.raises(ValueError, match="layers_per_step"):
        split_layers([0, 1], bad)


def test_a_membership_change_is_refused_naming_both_sides():
    old = ExpertLayout.round_robin(2, 4, [0, 1], 2)
    grown = ExpertLayout.round_robin(2, 4, [0, 1, 2], 2)
    with pytest.raises(LayoutError, match=r"old has ranks \[0, 1\].*target has ranks \[0, 1, 2\]"):
        plan_migration(old, grown, 1)
    with pytest.raises(ValueError, match=r"layers \[2\]"):
        blend(old, old, [2])


# -- the real executor: each step stages exactly staged_bytes, and the steps reach the target ------------------


class _Wires:
    """In-process point-to-point links between ranks run as threads: a FIFO per (sender, receiver)."""

    def __init__(self):
        self._queues: dict = defaultdict(queue.Queue)
        self._lock = threading.Lock()

    def link(self, src: int, dst: int) -> queue.Queue:
        with self._lock:
            return self._queues[(src, dst)]

    def transport(self, rank: int):
        wires = self

        class Transport:
            def execute_rounds(self, rounds, timeout_s):
                for ops in rounds:
                    for kind, tensor, peer in ops:
                        if kind == "send":
                            wires.link(rank, peer).put(tensor.clone())
                    for kind, tensor, peer in ops:
                        if kind == "recv":
                            tensor.copy_(wires.link(peer, rank).get(timeout=timeout_s))

        return Transport()


def _identity_row(weights: ExpertWeights, layer: int, expert: int) -> torch.Tensor:
    """A row whose every 4-byte word encodes (layer, expert), so any misplaced expert shows."""
    words = torch.full((weights.row_bytes // 4,), 1000 * layer + expert + 1, dtype=torch.int32)
    return words.view(torch.uint8)


@pytest.mark.parametrize("lps", [1, 2, 0])
def test_executor_stages_what_the_plan_says_step_by_step_and_reaches_the_target(lps):
    spec = ModelSpec(num_layers=4, num_experts=8, hidden=8, intermediate=4)
    ranks, spr = [0, 1, 2], 4
    old = ExpertLayout.round_robin(spec.num_layers, spec.num_experts, ranks, spr)
    load = np.random.default_rng(3).zipf(1.5, (spec.num_layers, spec.num_experts)).astype(float)
    target = rebalance_experts(load, ranks, spr, old=old, live_ranks=ranks, policy="eplb")
    weights = {}
    for r in ranks:
        w = ExpertWeights.zeros(spec.expert_format, spec.num_layers, spr, "cpu")
        w.experts[:] = old.experts_of(r)
        for layer, slot in np.ndindex(spec.num_layers, spr):
            w.rows[layer, slot].copy_(_identity_row(w, layer, int(w.experts[layer, slot])))
        weights[r] = w
    plans = plan_steps(plan_migration(old, target, lps), ranks, spec.expert_bytes) if lps else \
        [plan_transfers(old, target, ranks, expert_bytes=spec.expert_bytes)]
    assert len(plans) == (len(changed_layers(old, target)) + lps - 1) // lps if lps else 1
    assert len(plans) > 1 or not lps
    for epoch, plan in enumerate(plans, start=1):
        wires, staged, errors = _Wires(), {}, []

        def run(rank):
            try:
                staged[rank] = execute_rank_plan(plan.for_rank(rank), weights[rank], epoch, wires.transport(rank),
                                                 {r: r for r in ranks}, lambda keys: {}, 30.0)
            except BaseException as exc:  # noqa: BLE001 - raised below on the test's thread
                errors.append(exc)

        threads = [threading.Thread(target=run, args=(r,)) for r in ranks]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors, errors
        assert {r: staged[r].nbytes for r in ranks} == staged_bytes(plan)
        for r in ranks:
            commit(weights[r], staged[r])
            assert np.array_equal(weights[r].experts, plan.new.experts_of(r))
    for r in ranks:
        for layer, slot in np.ndindex(spec.num_layers, spr):
            expert = int(target.experts_of(r)[layer, slot])
            assert int(weights[r].experts[layer, slot]) == expert
            assert torch.equal(weights[r].rows[layer, slot], _identity_row(weights[r], layer, expert))
