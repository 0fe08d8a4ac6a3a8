"""Layerwise rebalances on a real local Ray (Gloo on the CPU): serving threads run through them with every output
checked against the oracle; one commit per step of layers, less staging than the whole-model move; a worker or the
controller dying mid-way leaves a committed partial layout that the retry finishes from."""

import time

import numpy as np
import pytest

from elastic_ep.balance import rebalance_experts
from elastic_ep.cluster import ElasticEPCluster
from elastic_ep.layout import ExpertLayout
from elastic_ep.migration import plan_migration, plan_steps
from elastic_ep.plan import SRC
from elastic_ep.serving.oracle import CheckpointOracle
from elastic_ep.serving.stream import ServingStream, StreamConfig
from elastic_ep.serving_stats import ServingLog
from elastic_ep.testing import SMALL, small_config

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def cluster(ray_local, small_checkpoint, tmp_path_factory):
    cfg = small_config(small_checkpoint, tmp_path_factory.mktemp("layerwise"), slots_per_rank=6, num_spares=1)
    with ElasticEPCluster(cfg) as c:
        yield c


@pytest.fixture(scope="module")
def oracle(small_checkpoint):
    return CheckpointOracle(small_checkpoint, SMALL, "deepseek")


def _load(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack([rng.permutation(1.0 / np.arange(1, SMALL.num_experts + 1) ** 1.5)
                     for _ in range(SMALL.num_layers)]) * 10_000


def _serving(cluster, oracle):
    log = ServingLog()
    stream = ServingStream(cluster.client(view_max_age_s=0.05, log=log), oracle, StreamConfig(tokens=16, threads=2))
    return log, stream


def _assert_served_right(log, stream):
    calls, _ = log.snapshot()
    summary = log.summary()
    assert calls and stream.wrong == 0 and summary.wrong_calls == 0 and summary.checked_calls == len(calls)
    assert stream.failed == 0 and summary.failed_calls == 0
    return calls


def test_serving_runs_through_a_layerwise_rebalance_with_one_commit_per_layer(cluster, oracle):
    whole = cluster.rebalance(load=_load(1))  # the whole model in one commit, for the staging comparison
    assert whole.migration_steps == whole.commits == 1
    log, stream = _serving(cluster, oracle)
    with stream:
        time.sleep(0.5)
        log.mark("rebalance_start")
        rep = cluster.rebalance(load=_load(2), layers_per_step=1)
        log.mark("rebalance_commit")
        time.sleep(0.5)
    calls = _assert_served_right(log, stream)
    assert rep.migration_steps == rep.commits == SMALL.num_layers  # every layer's placement changed
    assert rep.epoch_to == rep.epoch_from + SMALL.num_layers
    served = {c.epoch for c in calls}
    assert {rep.epoch_from, rep.epoch_to} <= served
    assert served & set(range(rep.epoch_from + 1, rep.epoch_to)), served  # calls between the steps' commits
    peak = max(rep.staging_peak_bytes.values())
    assert 0 < peak < rep.plan["max_rank_bytes_staged"]  # one layer's slots, not the whole move's
    ExpertLayout.from_dict(cluster.status()["layout"]).validate()
    assert cluster.verify(against_checkpoint=True)["ok"]


def _victim_load(cluster):
    """A load whose layerwise rebalance has a rank that sends in the second step and sends nothing in the first."""
    st = cluster.status()
    old = ExpertLayout.from_dict(st["layout"])
    cfg = cluster.config
    for seed in range(100, 200):
        load = _load(seed)
        target = rebalance_experts(load, old.ranks, cfg.slots_per_rank, rank_nodes=old.rank_nodes,
                                   num_groups=SMALL.num_groups, old=old, live_ranks=old.ranks, policy=cfg.policy)
        plans = plan_steps(plan_migration(old, target, 1), old.ranks, SMALL.expert_bytes)
        if len(plans) >= 2:
            senders = set(plans[1].transfers[:, SRC].tolist()) - set(plans[0].transfers[:, SRC].tolist())
            if senders:
                return load, min(senders)
    raise AssertionError("no load found with a rank sending in the second step and not in the first")


def test_a_worker_dying_in_the_second_step_keeps_the_first_and_serving_goes_on(cluster, oracle):
    cluster.wait_healthy(timeout_s=90)
    load, victim = _victim_load(cluster)
    epoch0 = cluster.status()["epoch"]
    wid = cluster.arm_worker_fault(victim, "transfer_send")  # dies as it starts sending: in the second step
    log, stream = _serving(cluster, oracle)
    with stream:
        rep = cluster.rebalance(load=load, layers_per_step=1)
        cluster.wait_healthy(timeout_s=90)
        time.sleep(0.3)
    _assert_served_right(log, stream)
    st = cluster.status()
    assert {int(r): w for r, w in st["ranks"].items()}[victim] != wid  # a spare took the rank over
    assert rep.attempt >= 2 and rep.epoch_from == epoch0 + 1  # the first step stayed committed
    assert rep.migration_steps == rep.commits == 1 and any("changes membership" in n for n in rep.notes)
    ExpertLayout.from_dict(st["layout"]).validate()
    assert cluster.verify(against_checkpoint=True)["ok"]


def test_the_controller_dying_at_a_steps_commit_rolls_it_forward_and_the_call_finishes(cluster, oracle):
    cluster.wait_healthy(timeout_s=90)
    before = cluster.status()
    cluster.arm_controller_fault("commit")  # the first step's commit: its layout is decided, the rest not begun
    log, stream = _serving(cluster, oracle)
    with stream:
        rep = cluster.rebalance(load=_load(7), layers_per_step=1)  # retried on the restarted controller
        time.sleep(0.3)
    _assert_served_right(log, stream)
    st = cluster.status()
    assert st["restarts"] == before["restarts"] + 1
    assert rep.epoch_from == before["epoch"] + 1  # the restart rolled the first step forward
    assert 1 <= rep.commits == rep.migration_steps <= SMALL.num_layers and st["epoch"] == rep.epoch_to
    assert cluster.verify(against_checkpoint=True)["ok"]
