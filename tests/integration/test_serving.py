"""Serving through a real local Ray cluster: outputs against the checkpoint oracle before and after every
reconfiguration (rebalance, SIGKILL recovery, grow, shrink), load from served tokens, threads, bad input."""

import os
import signal
import threading

import numpy as np
import pytest
import ray
import torch

from elastic_ep.cluster import ElasticEPCluster
from elastic_ep.errors import NotAnMoELayerError, ServingInputError
from elastic_ep.layout import ExpertLayout
from elastic_ep.serving.oracle import CheckpointOracle, output_tolerance
from elastic_ep.testing import SMALL, small_config

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def cluster(ray_local, small_checkpoint, tmp_path_factory):
    with ElasticEPCluster(small_config(small_checkpoint, tmp_path_factory.mktemp("serve"))) as c:
        yield c


@pytest.fixture(scope="module")
def oracle(small_checkpoint):
    return CheckpointOracle(small_checkpoint, SMALL, "deepseek")


def _batch(seed, num_tokens=48, top_k=3, hot=None):
    rng = np.random.default_rng(seed)
    ids = np.stack([rng.choice(SMALL.num_experts, size=top_k, replace=False) for _ in range(num_tokens)])
    if hot is not None:
        ids[:, 0] = hot
        ids[:, 1:] = np.where(ids[:, 1:] == hot, (hot + 1) % SMALL.num_experts, ids[:, 1:])
    weights = rng.random((num_tokens, top_k)).astype(np.float32)
    hidden = torch.from_numpy(rng.standard_normal((num_tokens, SMALL.hidden)).astype(np.float32)).to(torch.bfloat16)
    return hidden, ids, weights


def _check(serve, oracle, layer, seed, **kw):
    hidden, ids, weights = _batch(seed, **kw)
    out = serve(layer, hidden, ids, weights)
    ref = oracle(layer, hidden, ids, weights)
    assert out.dtype == torch.bfloat16 and out.shape == hidden.shape
    err = float((out.float() - ref).abs().max())
    assert err <= output_tolerance(ref, torch.bfloat16), (layer, err, output_tolerance(ref, torch.bfloat16))
    return ids


def _check_all_layers(cluster, oracle, seed):
    for layer in range(SMALL.num_layers):
        _check(cluster.moe, oracle, layer, seed + layer)


def test_outputs_match_the_checkpoint_oracle_and_load_is_what_was_served(cluster, oracle):
    cluster.served_load()  # start from drained worker counters
    before = cluster.served_load()
    before = np.zeros((SMALL.num_layers, SMALL.num_experts)) if before is None else before
    served = np.zeros_like(before)
    for layer in range(SMALL.num_layers):
        for seed in range(3):
            ids = _check(cluster.moe, oracle, layer, 10 * layer + seed, hot=layer)
            served[layer] += np.bincount(ids.ravel(), minlength=SMALL.num_experts)
    after = cluster.served_load()
    np.testing.assert_array_equal(after - before, served)  # every (token, expert) pair counted once, by expert
    hidden, ids, weights = _batch(1)
    assert cluster.moe(0, hidden[:0], ids[:0], weights[:0]).shape == (0, SMALL.hidden)  # an empty call is fine


def test_rebalance_by_served_load_replicates_hot_experts_and_splits_their_tokens(cluster, oracle):
    hidden, ids, weights = _batch(5, num_tokens=96, hot=4)
    for _ in range(4):
        cluster.moe(0, hidden, ids, weights)
    epoch = cluster.status()["epoch"]
    rep = cluster.rebalance()
    layout = ExpertLayout.from_dict(cluster.status()["layout"])
    assert rep.epoch_to == epoch + 1
    assert layout.logcnt[0, 4] >= 2  # expert 4 was served most in layer 0: it got replicas
    _check_all_layers(cluster, oracle, 100)
    for r in layout.ranks:  # drain the counters, then serve only expert 4 once
        ray.get(cluster.worker(r).take_load.remote(), timeout=30)
    cluster.moe(0, hidden[:64], np.full((64, 1), 4), np.ones((64, 1), np.float32))
    counts = []
    for pos, r in enumerate(layout.ranks):
        got = ray.get(cluster.worker(r).take_load.remote(), timeout=30)
        counts += [got.tokens[0, s] for s in range(layout.slots_per_rank) if got.experts[0, s] == 4]
    assert len(counts) == layout.logcnt[0, 4] and sum(counts) == 64
    assert max(counts) - min(counts) <= 1  # round-robin over its replicas


def test_threads_and_clients_during_a_rebalance_never_mix_epochs(cluster, oracle):
    clients = [cluster.client(view_max_age_s=0.0), cluster.client()]
    errors = []

    def serve(i):
        try:
            for j in range(8):
                _check(clients[i % 2].moe, oracle, j % SMALL.num_layers, 1000 * i + j)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=serve, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    rng = np.random.default_rng(0)
    cluster.rebalance(rng.random((SMALL.num_layers, SMALL.num_experts)) * 100)  # epochs switch under the calls
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert sum(c.stats.calls for c in clients) == 32


def test_sigkill_of_a_worker_recovers_and_serves_correctly(cluster, oracle):
    epoch = cluster.status()["epoch"]
    pid = ray.get(cluster.worker(1).ping.remote(), timeout=30).pid
    os.kill(pid, signal.SIGKILL)
    _check_all_layers(cluster, oracle, 200)  # retried on a fresh view until its experts are served again
    st = cluster.wait_healthy(timeout_s=90)
    assert st["epoch"] > epoch
    _check_all_layers(cluster, oracle, 300)
    assert cluster.verify().ok


def test_grow_and_shrink_keep_outputs_right(cluster, oracle):
    cluster.grow(1)
    ranks = sorted(cluster.status()["ranks"])
    assert len(ranks) == 5
    _check_all_layers(cluster, oracle, 400)
    cluster.shrink([ranks[0]])
    assert sorted(cluster.status()["ranks"]) == ranks[1:]
    _check_all_layers(cluster, oracle, 500)


@pytest.mark.parametrize("change, cls, text", [
    (lambda h, i, w: (7, h, i, w), NotAnMoELayerError, "layer 7 is not an MoE layer"),
    (lambda h, i, w: (0, h[:, :-1], i, w), ServingInputError, f"[num_tokens, {SMALL.hidden}], got [48, 31]"),
    (lambda h, i, w: (0, h.float(), i, w), ServingInputError, "must be bfloat16 (the model dtype), got float32"),
    (lambda h, i, w: (0, h, np.where(i == i[2, 1], 12, i), w), ServingInputError, "= 12 is not an expert id in [0, 12)"),
    (lambda h, i, w: (0, h, i[:-1], w[:-1]), ServingInputError, "topk_ids must be [num_tokens=48, top_k], got [47, 3]"),
    (lambda h, i, w: (0, h, i, -w), ServingInputError, "is not a finite, non-negative weight"),
    (lambda h, i, w: (0, h, i, np.where(np.arange(3) == 1, np.nan, w).astype(np.float32)), ServingInputError, "= nan"),
])
def test_bad_input_is_named_and_the_cluster_keeps_serving(cluster, oracle, change, cls, text):
    hidden, ids, weights = _batch(9)
    client = cluster.client()
    with pytest.raises(cls) as err:
        client.moe(*change(hidden, ids, weights))
    assert text in str(err.value)
    assert client.stats.calls == 0
    _check(client.moe, oracle, 1, 9)


def test_a_worker_refuses_a_call_planned_on_another_epoch(cluster):
    from elastic_ep.serving.bits import to_bits
    from elastic_ep.errors import StaleEpochError

    epoch = cluster.status()["epoch"]
    rank = sorted(cluster.status()["ranks"])[0]
    hidden = to_bits(torch.zeros(2, SMALL.hidden, dtype=torch.bfloat16))
    args = (rank, 0, hidden, np.array([0, 1]), np.array([0, 0]), np.ones(2, np.float32))
    out = ray.get(cluster.worker(rank).serve_layer.remote(epoch, *args), timeout=30)
    assert out.shape == (2, SMALL.hidden) and out.dtype == np.float32
    with pytest.raises(ray.exceptions.RayTaskError) as err:
        ray.get(cluster.worker(rank).serve_layer.remote(epoch - 1, *args), timeout=30)
    assert isinstance(err.value.cause, StaleEpochError) and err.value.cause.worker_epoch == epoch
