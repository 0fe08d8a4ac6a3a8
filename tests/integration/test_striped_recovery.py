"""Striped storage reads on a real local Ray (CPU, Gloo): survivors read part of a dead rank's experts and relay them."""

import time

import pytest

from elastic_ep.cluster import ElasticEPCluster
from elastic_ep.testing import SMALL, small_config

pytestmark = pytest.mark.timeout(240)


def _wait_prepared(cluster, timeout_s: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        st = cluster.status()
        prepared = {**st["spares_prepared"], **st["members_prepared"]}
        if len(prepared) == 5 and "preparing" not in prepared.values():
            return st
        assert time.monotonic() < deadline, prepared
        time.sleep(0.2)


def test_striped_recovery_relays_reads_through_survivors_and_verifies(ray_local, small_checkpoint, tmp_path):
    cluster = ElasticEPCluster(small_config(small_checkpoint, tmp_path, stripe_fetches=True))
    cluster.start()
    try:
        st = _wait_prepared(cluster)
        # members mapped every backup (what they could relay for a dead peer, whatever a rebalance moves)
        assert sorted(st["members_prepared"]) == sorted(st["ranks"].values())
        for wid in st["ranks"].values():
            assert st["members_prepared"][wid]["experts"] == SMALL.num_layers * SMALL.num_experts
        cluster.kill(2)
        st = cluster.wait_healthy(timeout_s=90)
        rec = next(h for h in reversed(st["history"]) if h["reason"] == "recover")
        plan = rec["plan"]
        assert plan["relays"] > 0 and plan["fetches"] > 0, plan  # survivors and the replacement share the reads
        # relays are part of the storage reads; point-to-point counts only experts survivors held
        assert plan["bytes_relayed"] == plan["relays"] * SMALL.expert_bytes
        assert rec["bytes_from_backup"] == (plan["fetches"] + plan["relays"]) * SMALL.expert_bytes
        assert rec["bytes_p2p"] == plan["transfers"] * SMALL.expert_bytes
        assert rec["bytes_from_checkpoint"] == 0
        assert rec["slots_verified"] == plan["transfers"] + plan["fetches"] + plan["relays"] + plan["copies"]
        ver = cluster.verify(against_checkpoint=True)
        assert ver.ok, ver
        # the next recovery works from the new membership too
        cluster.kill(0)
        st = cluster.wait_healthy(timeout_s=90)
        assert cluster.verify(against_checkpoint=True).ok
    finally:
        cluster.shutdown()
