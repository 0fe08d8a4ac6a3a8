"""Eight workers on the CPU with Gloo: 7 ranks + a hot spare, and 8 ranks on 2 nodes with none.

The CPU stand-in for the eight-GPU recovery run: one kill, then two at once, every slot
verified against the checkpoint after each; on 2 nodes of 4 the placement is hierarchical
(each expert group lives on one node) until a death leaves the nodes unequal.
"""

import time

import numpy as np
import pytest

from elastic_ep.cluster import ElasticEPCluster
from elastic_ep.config import ModelSpec
from elastic_ep.layout import ExpertLayout
from elastic_ep.storage import write_synthetic_checkpoint
from elastic_ep.testing import small_config

pytestmark = pytest.mark.timeout(420)

# 32 experts in 4 groups of 8: two groups per node on 2 nodes.
SPEC = ModelSpec(num_layers=2, num_experts=32, hidden=32, intermediate=16, num_groups=4)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt8")
    write_synthetic_checkpoint(path, SPEC, preset="deepseek", num_shards=2)
    return str(path)


def _layout(cluster) -> ExpertLayout:
    return ExpertLayout.from_dict(cluster.status()["layout"])


def _history(cluster, since: int) -> list[dict]:
    return [h for h in cluster.status()["history"][since:] if h["reason"] == "recover"]


def _kill_two_at_once(cluster, a: int, b: int) -> None:
    """Two ranks die milliseconds apart (timers armed together); returns once both deaths are seen."""
    wids = [cluster.arm_worker_fault(a, "idle", 0.3), cluster.arm_worker_fault(b, "idle", 0.3)]
    deadline = time.monotonic() + 30
    while not set(wids) <= set(cluster.status()["dead"]):
        assert time.monotonic() < deadline, f"workers {wids} armed to die did not"
        time.sleep(0.02)


def _assert_served(cluster, ranks: tuple) -> ExpertLayout:
    layout = _layout(cluster)
    layout.validate()
    assert layout.ranks == ranks
    ver = cluster.verify(against_checkpoint=True)
    assert ver.ok, ver
    assert ver.slots_checked == len(ranks) * layout.slots_per_rank * SPEC.num_layers
    return layout


def _groups_on_one_node(layout: ExpertLayout) -> bool:
    """Hierarchical placement: every replica of every expert of a group sits on one node."""
    node_of_slot = np.repeat(np.asarray(layout.rank_nodes), layout.slots_per_rank)
    group_size = SPEC.num_experts // SPEC.num_groups
    for layer in range(layout.num_layers):
        group = layout.phy2log[layer] // group_size
        for g in range(SPEC.num_groups):
            if len(set(node_of_slot[group == g].tolist())) != 1:
                return False
    return True


def test_seven_ranks_and_a_hot_spare_one_kill_then_two(ray_local, checkpoint, tmp_path):
    cfg = small_config(checkpoint, tmp_path, model=SPEC, num_ranks=7, slots_per_rank=6, num_spares=1, name="seven")
    with ElasticEPCluster(cfg) as c:
        _assert_served(c, tuple(range(7)))
        spare = c.status()["spares"][0]
        seen = len(c.status()["history"])
        c.kill(3)
        st = c.wait_healthy(timeout_s=120)
        (rec,) = _history(c, seen)
        assert rec["replaced"] == {"3": spare} and rec["bytes_from_checkpoint"] == 0
        _assert_served(c, tuple(range(7)))
        print(f"\n7+1 ranks, kill rank 3: restored and verified {rec['since_death_s']:.2f} s after the death")

        # Two at once: the replenished spare takes one rank's place; without a second spare
        # the other rank's slots are dropped and the six left hold every expert.
        assert len(st["spares"]) == 1
        seen = len(st["history"])
        _kill_two_at_once(c, 1, 5)
        c.wait_healthy(timeout_s=120)
        recs = _history(c, seen)
        replaced = {int(r) for rec in recs for r in rec["replaced"]}
        dropped = {int(r) for rec in recs for r in rec["dropped"]}
        assert len(replaced) == 1 and replaced | dropped == {1, 5} and len(dropped) == 1
        _assert_served(c, tuple(r for r in range(7) if r not in dropped))
        print("7+1 ranks, two at once: " + ", ".join(f"{r['since_death_s']:.2f} s" for r in recs))


def test_eight_ranks_on_two_nodes_without_spares(ray_local, checkpoint, tmp_path):
    cfg = small_config(checkpoint, tmp_path, model=SPEC, num_ranks=8, slots_per_rank=8, num_spares=0,
                       num_nodes=2, name="eight")
    with ElasticEPCluster(cfg) as c:
        layout = _assert_served(c, tuple(range(8)))
        assert layout.rank_nodes == (0, 0, 0, 0, 1, 1, 1, 1)
        assert _groups_on_one_node(layout)

        c.run_workload(batches=8, seed=3, zipf_s=1.4)
        rep = c.rebalance()
        layout = _assert_served(c, tuple(range(8)))
        assert rep.plan["transfers"] > 0 and _groups_on_one_node(layout)  # moved, and still by node

        seen = len(c.status()["history"])
        c.kill(6)
        c.wait_healthy(timeout_s=120)
        (rec,) = _history(c, seen)
        assert rec["dropped"] == [6] and rec["bytes_from_checkpoint"] == 0
        _assert_served(c, (0, 1, 2, 3, 4, 5, 7))  # nodes of 4 and 3: global placement from here
        print(f"\n8 ranks on 2 nodes, kill rank 6: shrunk and verified {rec['since_death_s']:.2f} s after the death")

        seen = len(c.status()["history"])
        _kill_two_at_once(c, 0, 4)
        c.wait_healthy(timeout_s=120)
        recs = _history(c, seen)
        assert sorted(r for rec in recs for r in rec["dropped"]) == [0, 4]
        _assert_served(c, (1, 2, 3, 5, 7))
        print("8 ranks on 2 nodes, two at once: " + ", ".join(f"{r['since_death_s']:.2f} s" for r in recs))
