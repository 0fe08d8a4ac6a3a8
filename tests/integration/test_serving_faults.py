"""Serving through deaths and moves on a real local Ray: SIGKILLed ranks masked at once, only their pairs re-sent
within the call, serving threads running through a rebalance and a recovery with zero wrong and zero failed calls."""

import dataclasses
import os
import signal
import time

import numpy as np
import pytest
import ray
import torch

from elastic_ep.cluster import ElasticEPCluster
from elastic_ep.degraded import degrade_routing
from elastic_ep.errors import ElasticEPError, ExpertsUnavailableError
from elastic_ep.layout import ExpertLayout
from elastic_ep.serving.client import MoEClient
from elastic_ep.serving.dispatch import plan_dispatch
from elastic_ep.serving.oracle import CheckpointOracle, output_tolerance
from elastic_ep.serving.stream import ServingStream, StreamConfig
from elastic_ep.serving_stats import ServingLog
from elastic_ep.testing import SMALL, sigkill_workers, small_config

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def cluster(ray_local, small_checkpoint, tmp_path_factory):
    # 4 ranks x 6 slots over 12 experts: every expert has two replicas on two ranks, so one death loses none
    with ElasticEPCluster(small_config(small_checkpoint, tmp_path_factory.mktemp("faults"), slots_per_rank=6)) as c:
        yield c


@pytest.fixture(scope="module")
def oracle(small_checkpoint):
    return CheckpointOracle(small_checkpoint, SMALL, "deepseek")


def _batch(seed, num_tokens=32, top_k=2):
    rng = np.random.default_rng(seed)
    ids = np.argsort(rng.random((num_tokens, SMALL.num_experts)), axis=1)[:, :top_k]
    weights = rng.random((num_tokens, top_k)).astype(np.float32)
    hidden = torch.from_numpy(rng.standard_normal((num_tokens, SMALL.hidden)).astype(np.float32)).to(torch.bfloat16)
    return hidden, ids, weights


def _assert_close(out, ref):
    assert float((out.float() - ref).abs().max()) <= output_tolerance(ref, torch.bfloat16)


def test_a_sigkilled_rank_is_masked_within_the_call_before_the_controller_says_so(cluster, oracle):
    layout = ExpertLayout.from_dict(cluster.status()["layout"])
    assert (layout.logcnt >= 2).all()  # every expert of every layer has a second replica
    log = ServingLog()
    client = cluster.client(view_max_age_s=3600.0, log=log)  # learns nothing from the controller after this view
    hidden, ids, weights = _batch(1)
    _assert_close(client.moe(0, hidden, ids, weights), oracle(0, hidden, ids, weights))
    view = client.view()
    victim = 1
    pid = ray.get(cluster.worker(victim).ping.remote(), timeout=30).pid
    os.kill(pid, signal.SIGKILL)  # and serve at once: the client learns of the death from its own call
    hidden, ids, weights = _batch(10)
    # the first attempt's plan (the client's next rotation): what the victim is sent and never answers
    first = plan_dispatch(0, view.phy2log[0], view.slots_per_rank, view.ranks, view.dead_ranks, ids, client._rotation)
    (lost,) = [part for part in first.parts if part.rank == victim]
    _assert_close(client.moe(0, hidden, ids, weights), oracle(0, hidden, ids, weights))
    assert victim in client.masked_ranks(view)
    calls, _ = log.snapshot()
    # served on the old epoch by the survivors: the call waited neither for the controller nor for the recovery
    assert len(calls) == 2 and calls[1].ok and calls[1].epoch == view.epoch
    # only the victim's pairs were sent again; the survivors' partial sums were kept
    assert calls[1].retried_pairs == len(lost.pairs) < ids.size
    assert calls[1].retried_tokens == len(lost.tokens) < len(ids)
    assert client.stats.retried_pairs == len(lost.pairs) and client.stats.failed == 0
    for layer in range(SMALL.num_layers):  # later calls plan around the masked rank (or on the recovered epoch)
        hidden, ids, weights = _batch(20 + layer)
        _assert_close(client.moe(layer, hidden, ids, weights), oracle(layer, hidden, ids, weights))
    # no rank dies under them; one that meets the recovered epoch re-sends its whole call there (never a mix)
    assert all(c.retried_pairs % (2 * c.tokens) == 0 for c in log.snapshot()[0][2:]) and client.stats.failed == 0
    cluster.wait_healthy(timeout_s=90)


def test_a_client_behind_a_commit_reads_the_view_from_a_rank_while_the_controller_cannot_answer(cluster, oracle):
    """A controller killed after a commit (restarting for seconds) must not stall clients that hold the old view."""
    cluster.wait_healthy(timeout_s=90)
    first = cluster.client().view(refresh=True)
    asked = []

    def controller_view():  # answers once, then is unreachable
        asked.append(1)
        if len(asked) > 1:
            raise ElasticEPError("the controller is restarting")
        return first

    log = ServingLog()
    client = MoEClient(controller_view, SMALL, view_max_age_s=3600.0, log=log)
    hidden, ids, weights = _batch(40)
    _assert_close(client.moe(0, hidden, ids, weights), oracle(0, hidden, ids, weights))
    cluster.rebalance(load=np.random.default_rng(4).random((SMALL.num_layers, SMALL.num_experts)) * 100)
    epoch = cluster.status()["epoch"]
    assert epoch > first.epoch  # every rank committed a layout this client was not told of
    for layer in range(SMALL.num_layers):
        hidden, ids, weights = _batch(41 + layer)
        _assert_close(client.moe(layer, hidden, ids, weights), oracle(layer, hidden, ids, weights))
    calls, _ = log.snapshot()
    assert [c.epoch for c in calls] == [first.epoch] + [epoch] * SMALL.num_layers and all(c.ok for c in calls)
    assert len(asked) == 1 and client.view().epoch == epoch  # the new view came from a rank, not the controller


def test_serving_threads_run_through_a_rebalance_and_a_sigkill_recovery(cluster, oracle):
    cluster.wait_healthy(timeout_s=90)
    log = ServingLog()
    client = cluster.client(view_max_age_s=0.2, log=log)
    epochs = [cluster.status()["epoch"]]
    with ServingStream(client, oracle, StreamConfig(tokens=16, threads=2)) as stream:
        time.sleep(1.0)
        log.mark("rebalance_start")
        cluster.rebalance(load=np.random.default_rng(0).random((SMALL.num_layers, SMALL.num_experts)) * 100)
        log.mark("rebalance_commit")
        epochs.append(cluster.status()["epoch"])
        time.sleep(1.0)
        log.mark("kill", "rank 2")
        sigkill_workers(cluster, [2])
        log.mark("detect", "rank 2")
        cluster.wait_healthy(timeout_s=90)
        log.mark("commit", "rank 2")
        epochs.append(cluster.status()["epoch"])
        time.sleep(1.0)
    calls, _ = log.snapshot()
    summary = log.summary()
    assert stream.wrong == 0 and summary.wrong_calls == 0 and summary.checked_calls == len(calls)
    assert stream.failed == 0 and summary.failed_calls == 0  # every expert kept a live copy throughout
    assert epochs[0] < epochs[1] < epochs[2]
    served_epochs = {c.epoch for c in calls}
    assert set(epochs) <= served_epochs, (epochs, served_epochs)  # calls on both sides of each commit
    assert len(summary.kills) == 1 and summary.kills[0].recovered


def test_lost_experts_wait_then_fail_naming_them_or_degrade_when_asked(cluster, oracle):
    """The controller's view says two ranks are dead (so some experts have no live replica)."""
    cluster.wait_healthy(timeout_s=90)
    real = cluster.client().view(refresh=True)
    layout = ExpertLayout.from_dict(cluster.status()["layout"])
    dead = (layout.ranks[0], layout.ranks[1])
    view = dataclasses.replace(real, workers={r: h for r, h in real.workers.items() if r not in dead},
                               dead_ranks=tuple(sorted(set(real.dead_ranks) | set(dead))))
    held = np.zeros(SMALL.num_experts, dtype=bool)
    held[layout.rank_view()[0][[layout.position(r) for r in layout.ranks if r not in dead]].ravel()] = True
    lost = np.flatnonzero(~held)
    assert len(lost)
    hidden, ids, weights = _batch(3)
    kept = held.nonzero()[0]
    ids[:, 1] = kept[np.arange(len(ids)) % len(kept)]  # every token keeps one live expert ...
    ids[:, 0] = np.where(ids[:, 0] == ids[:, 1], kept[(np.arange(len(ids)) + 1) % len(kept)], ids[:, 0])
    ids[:4, 0] = lost[0]  # ... and a few need a lost one
    log = ServingLog()
    strict = type(cluster.client())(lambda: view, SMALL, unavailable_timeout_s=0.3, log=log)
    with pytest.raises(ExpertsUnavailableError) as err:
        strict.moe(0, hidden, ids, weights)
    assert (0, int(lost[0])) in err.value.experts and strict.stats.failed == 1
    assert not log.snapshot()[0][0].ok and log.snapshot()[0][0].error == "ExpertsUnavailableError"
    loose = type(cluster.client())(lambda: view, SMALL, unavailable_timeout_s=0.3, degraded=True)
    out = loose.moe(0, hidden, ids, weights)
    routed = degrade_routing(ids, weights, unavailable=~held)
    kept_ids = np.where(routed.kept, ids, ids[np.arange(len(ids)), np.argmax(routed.kept, axis=1)][:, None])
    _assert_close(out, oracle(0, hidden, kept_ids, routed.topk_weights))
    assert loose.stats.degraded_tokens == routed.num_degraded >= 4 and loose.stats.failed == 0
