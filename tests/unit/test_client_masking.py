"""MoEClient's decisions that need no worker: masking by epoch, waiting (bounded) for lost experts, degraded routing."""

import numpy as np
import pytest
import torch

from elastic_ep.errors import ExpertsUnavailableError
from elastic_ep.serving.client import MoEClient
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
