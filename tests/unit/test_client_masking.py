"""MoEClient's decisions that need no worker: masking by epoch, waiting (bounded) for lost experts, degraded routing,
and re-sending only a dead rank's pairs (partial sums kept within one epoch)."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from elastic_ep.errors import ExpertsUnavailableError
from elastic_ep.serving.client import MoEClient, _PartialSums
from elastic_ep.serving.dispatch import plan_dispatch
from elastic_ep.serving_stats import ServingLog
from elastic_ep.status import CommittedView
from elastic_ep.testing import SMALL

# 3 ranks x 4 slots over 12 experts: each expert once; rank 1 (slots 4..7) is dead in the view
PHY2LOG = np.tile(np.arange(12), (SMALL.num_layers, 1))


def _view(epoch=3, dead=(1,)):
    return CommittedView(epoch=epoch, phy2log=PHY2LOG, slots_per_rank=4,
                         workers={r: object() for r in (0, 1, 2) if r not in dead}, dead_ranks=tuple(dead))


def _call(ids):
    ids = np.asarray(ids)
    return torch.zeros((len(ids), SMALL.hidden), dtype=torch.bfloat16), ids, np.ones(ids.shape, np.float32)


def test_a_lost_expert_waits_for_the_timeout_then_fails_naming_it_and_is_recorded():
    log = ServingLog()
    views = []
    client = MoEClient(lambda: views.append(1) or _view(), SMALL, unavailable_timeout_s=0.2, retry_sleep_s=0.02,
                       log=log)
    with pytest.raises(ExpertsUnavailableError) as err:
        client.moe(0, *_call([[5, 0], [1, 2]]))
    assert err.value.experts == [(0, 5)] and "experts [5]" in str(err.value)
    assert len(views) > 2  # it re-read the view while waiting for a recovery's commit
    (rec,), _ = log.snapshot()
    assert not rec.ok and rec.error == "ExpertsUnavailableError" and rec.epoch == 3 and rec.tokens == 2
    assert client.stats.calls == 1 and client.stats.failed == 1 and client.stats.tokens == 0


def test_masked_ranks_hold_for_their_epoch_only():
    client = MoEClient(_view, SMALL)
    client._mask(3, [2])
    assert client.masked_ranks(_view(3)) == {1, 2}
    assert client.masked_ranks(_view(4, dead=())) == set()  # a new epoch starts from the controller's view
    client._mask(4, [0])
    assert client.masked_ranks(_view(3)) == {1}


def test_degraded_routing_points_dropped_pairs_at_a_kept_expert_with_weight_zero():
    client = MoEClient(_view, SMALL, degraded=True)
    ids = np.array([[5, 0], [1, 2], [6, 9]])
    weights = np.array([[0.6, 0.2], [0.5, 0.5], [0.3, 0.1]], np.float32)
    call_ids, call_weights, degraded = client._route(0, PHY2LOG[0], _view(), frozenset({1}), ids, weights)
    assert degraded == 2
    np.testing.assert_array_equal(call_ids, [[0, 0], [1, 2], [9, 9]])
    np.testing.assert_allclose(call_weights, [[0, 0.8], [0.5, 0.5], [0, 0.4]], rtol=1e-6)
    strict = MoEClient(_view, SMALL)
    assert strict._route(0, PHY2LOG[0], _view(), frozenset({1}), ids, weights)[2] == 0
    with pytest.raises(ExpertsUnavailableError) as err:  # a token with every expert lost cannot degrade
        client._route(0, PHY2LOG[0], _view(), frozenset({1}), np.array([[4, 5]]), np.ones((1, 2), np.float32))
    assert err.value.experts == [(0, 4), (0, 5)]


# 3 ranks x 4 slots over 6 experts, each on two ranks: any one death leaves every expert a live replica
TWICE = np.array([0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5])
HIDDEN = 3


def _answer(part, x, ids, weights):
    """What a rank returns for its part, with expert e(x) = (e + 1) * x: [len(part.tokens), HIDDEN] float32."""
    out = np.zeros((len(part.tokens), HIDDEN), np.float32)
    scale = (ids.ravel()[part.pairs] + 1) * weights.ravel()[part.pairs]
    np.add.at(out, part.rows, scale[:, None] * x[part.pairs // ids.shape[1]])
    return out


def _expected(x, ids, weights):
    return ((ids + 1) * weights).sum(axis=1)[:, None] * x


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 2**31), st.integers(1, 24), st.sampled_from([0, 1, 2]), st.integers(0, 50))
def test_a_rank_dying_mid_call_costs_only_its_pairs(seed, num_tokens, victim, rotation):
    rng = np.random.default_rng(seed)
    ids = np.argsort(rng.random((num_tokens, 6)), axis=1)[:, :2]
    weights = rng.random(ids.shape).astype(np.float32)
    x = rng.standard_normal((num_tokens, HIDDEN)).astype(np.float32)
    sums = _PartialSums(num_tokens, 2, HIDDEN)
    # attempt 1: every rank planned; the victim dies, the others answer and are kept
    plan = plan_dispatch(0, TWICE, 4, (0, 1, 2), (), ids, rotation, sums.pending(7, ids, weights))
    sums.sending(plan)
    lost = [p for p in plan.parts if p.rank == victim]
    for part in plan.parts:
        if part.rank != victim:
            sums.add(part, _answer(part, x, ids, weights), ids, weights)
    # attempt 2, same epoch, victim masked: exactly the victim's pairs are planned, over the live ranks
    pending = sums.pending(7, ids, weights)
    again = plan_dispatch(0, TWICE, 4, (0, 1, 2), (victim,), ids, rotation, pending)
    sums.sending(again)
    pairs_of = lambda parts: sorted(p for part in parts for p in part.pairs.tolist())  # noqa: E731
    assert pairs_of(again.parts) == pairs_of(lost)
    assert victim not in [p.rank for p in again.parts]
    for part in again.parts:
        sums.add(part, _answer(part, x, ids, weights), ids, weights)
    np.testing.assert_allclose(sums.out.numpy(), _expected(x, ids, weights), rtol=1e-5, atol=1e-5)
    assert sums.done.all() and not sums.pending(7, ids, weights).any()
    assert sums.resent_pairs == sum(len(p.pairs) for p in lost)
    assert sums.resent_tokens() == len({p // 2 for p in pairs_of(lost)})
    # a new epoch keeps nothing: every pair is planned (and counted as re-sent) again
    assert sums.pending(8, ids, weights).all() and not sums.out.any()


def test_a_reweighted_token_starts_over_and_the_others_keep_their_sums():
    ids = np.array([[0, 1], [2, 3]])
    weights = np.array([[0.5, 0.5], [0.25, 0.75]], np.float32)
    x = np.ones((2, HIDDEN), np.float32)
    sums = _PartialSums(2, 2, HIDDEN)
    plan = plan_dispatch(0, TWICE, 4, (0, 1, 2), (), ids, 0, sums.pending(1, ids, weights))
    sums.sending(plan)
    for part in plan.parts:
        sums.add(part, _answer(part, x, ids, weights), ids, weights)
    degraded = np.array([[0.0, 1.0], [0.25, 0.75]], np.float32)  # token 0 lost expert 0: renormalised
    pending = sums.pending(1, ids, degraded)
    np.testing.assert_array_equal(pending, [[True, True], [False, False]])
    assert not sums.out[0].any() and sums.out[1].any()
    for part in plan_dispatch(0, TWICE, 4, (0, 1, 2), (), ids, 0, pending).parts:
        sums.add(part, _answer(part, x, ids, degraded), ids, degraded)
    np.testing.assert_allclose(sums.out.numpy(), _expected(x, ids, degraded), rtol=1e-6)


def test_a_dead_ranks_pair_whose_expert_has_no_other_replica_names_only_that_expert():
    ids = np.array([[4, 0], [8, 1]])  # PHY2LOG: rank 1 alone holds experts 4..7
    sums = _PartialSums(2, 2, HIDDEN)
    done = np.array([[False, True], [True, True]])  # expert 0's and token 1's pairs already summed
    sums.done[:], sums.ids[:], sums.weights[:], sums.epoch = done, ids, 1.0, 3
    pending = sums.pending(3, ids, np.ones((2, 2), np.float32))
    with pytest.raises(ExpertsUnavailableError) as err:
        plan_dispatch(0, PHY2LOG[0], 4, (0, 1, 2), (1,), ids, 0, pending)
    assert err.value.experts == [(0, 4)]


def test_a_due_view_refresh_runs_in_the_background_and_a_failing_one_keeps_the_held_view():
    """A slow or restarting controller never stalls a call: the held view serves until a new one arrives."""
    import threading

    release, asked, done = threading.Event(), threading.Event(), threading.Event()
    answers = [_view(3), "block", RuntimeError("controller restarting"), _view(5, dead=())]

    def get_view():
        answer = answers.pop(0)
        asked.set()
        if answer == "block":
            assert release.wait(30)
            answer = _view(4, dead=())
        if isinstance(answer, Exception):
            raise answer
        return answer

    client = MoEClient(get_view, SMALL, view_max_age_s=3600.0)
    original = client._refresh_in_background
    client._refresh_in_background = lambda: (original(), done.set())
    assert client.view().epoch == 3
    client._view_time = float("-inf")  # due
    assert client.view().epoch == 3  # a refresh starts in the background; the held view answers at once
    assert asked.wait(30) and client.view().epoch == 3  # while the controller has not answered
    release.set()
    assert done.wait(30) and client.view().epoch == 4  # the background refresh landed
    asked.clear(), done.clear()
    client._view_time = float("-inf")
    assert client.view().epoch == 4
    assert done.wait(30) and client._view.epoch == 4  # the refresh failed: the held view stays
    assert client.view(refresh=True).epoch == 5 and not answers  # a forced read asks the controller directly


def test_a_rank_behind_the_views_epoch_is_waited_for_and_one_ahead_makes_the_client_re_read():
    """Between the controller publishing epoch E and a rank applying it, the rank rejects E-calls as stale:
    the client waits for that rank (keeping the others' sums) instead of re-reading the controller's view."""
    from elastic_ep.errors import StaleEpochError

    reads = []

    def get_view():
        reads.append(len(reads))
        return _view(5, dead=())

    client = MoEClient(get_view, SMALL, view_max_age_s=3600.0, retry_sleep_s=0.001)
    behind = {"left": 3}
    sent = []

    def run(view, plan, bits, call_ids, call_weights, sums, deadline):
        sent.append(sorted(part.rank for part in plan.parts))
        for part in plan.parts:
            if part.rank == 2 and behind["left"] > 0:
                continue
            sums.add(part, np.zeros((len(part.tokens), SMALL.hidden), np.float32), call_ids, call_weights)
        if behind["left"] > 0 and 2 in sent[-1]:
            behind["left"] -= 1
            raise StaleEpochError("rank 2 holds epoch 4", worker_epoch=4, call_epoch=5)

    client._run = run
    x, ids, w = _call([[0, 4], [8, 9], [1, 5]])
    client.moe(0, x, ids, w)
    assert reads == [0]  # the first read only: a rank behind is waited for, not re-read
    assert sent[0] == [0, 1, 2] and all(ranks == [2] for ranks in sent[1:]) and len(sent) == 4

    def ahead(view, plan, bits, call_ids, call_weights, sums, deadline):
        if view.epoch == 5:
            raise StaleEpochError("rank 0 holds epoch 6", worker_epoch=6, call_epoch=5)

    client._run = ahead
    client._get_view = lambda: (reads.append(len(reads)), _view(6, dead=()))[1]
    client.moe(0, x, ids, w)
    assert len(reads) == 2 and client.view().epoch == 6  # a rank ahead: the view was re-read once
