"""Whole-node loss on a 3-node Ray cluster on one machine: the experts a node held come back from
peers and from backups kept on other nodes; every slot verifies; backups are re-made elsewhere."""

import time

import pytest

from elastic_ep.cluster import ElasticEPCluster
from elastic_ep.config import ClusterConfig
from elastic_ep.storage import write_synthetic_checkpoint
from elastic_ep.testing import SMALL, ray_node_cluster

pytestmark = [pytest.mark.timeout(240), pytest.mark.slow]

# Node death is noticed by the GCS health check: period x threshold (+ timeout) ~ 1.5 s here
# instead of the 3 s x 5 default (RAY_NOTES.md).
HEALTH_CHECK = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 300,
                "health_check_timeout_ms": 300, "health_check_failure_threshold": 3}


@pytest.fixture(scope="module")
def ray_nodes():
    """A head and two worker nodes, 2 CPUs and a custom resource each; the driver on the head."""
    with ray_node_cluster(3, "elastic-ep-nodes", HEALTH_CHECK) as nodes:
        yield nodes


def _node_of(ray, handle) -> str:
    return ray.get(handle.ping.remote(), timeout=30).node_id


def test_node_loss_recovers_from_peers_and_backups_on_other_nodes(ray_nodes, tmp_path):
    ray, rc, workers = ray_nodes
    ckpt = write_synthetic_checkpoint(tmp_path / "ckpt", SMALL, num_shards=2)
    cfg = ClusterConfig(model=SMALL, checkpoint=str(ckpt), num_ranks=3, slots_per_rank=6, num_spares=2,
                        num_nodes=3, call_timeout_s=10.0, transfer_timeout_s=5.0, startup_timeout_s=60.0,
                        state_dir=str(tmp_path / "state"), name="nodes")
    with ElasticEPCluster(cfg) as c:
        st = c.status()
        placed = {r: _node_of(ray, c.worker(r)) for r in st["ranks"]}
        assert len(set(placed.values())) == 3, placed  # one logical node per Ray node...
        assert all(placed[r] == st["node_ids"][st["rank_nodes"][r]] for r in placed)  # ...as pinned
        assert st["backed_up"] == SMALL.num_layers * SMALL.num_experts
        here = ray.get_runtime_context().get_node_id()  # the driver's node, never removed below
        node_of_controller = c.controller.__ray_call__.remote(lambda _: ray.get_runtime_context().get_node_id())
        assert ray.get(node_of_controller, timeout=30) == here  # next to the driver: a node loss spares it
        victim = next(n for n in workers if n.node_id in placed.values())
        lost_ranks = sorted(r for r, n in placed.items() if n == victim.node_id)
        lost_wids = {st["ranks"][r] for r in lost_ranks}

        t0 = time.monotonic()
        rc.remove_node(victim, allow_graceful=False)  # a crash: noticed through the health check
        deadline = time.monotonic() + 60
        while not lost_wids <= set(c.status()["dead"]):
            assert time.monotonic() < deadline, "the node's workers were never noticed dead"
            time.sleep(0.1)
        noticed_s = time.monotonic() - t0
        st = c.wait_healthy(timeout_s=90)
        healed_s = time.monotonic() - t0

        rec = [h for h in st["history"] if h["reason"] == "recover" and h["replaced"]][-1]
        assert sorted(int(r) for r in rec["replaced"]) == lost_ranks
        # Peers and backups on surviving nodes gave everything back: nothing read from disk.
        assert rec["bytes_from_checkpoint"] == 0, rec
        assert rec["bytes_p2p"] + rec["bytes_from_backup"] > 0
        assert st["lost"] == [] and st["unserved"] == [] and len(st["ranks"]) == 3
        assert st["restarts"] == 0
        alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
        assert victim.node_id not in alive
        for r in st["ranks"]:
            assert _node_of(ray, c.worker(r)) in alive
        ver = c.verify(against_checkpoint=True)
        assert ver.ok, ver
        # Backups the dead node's store held are made again on a live node.
        assert c.status()["backed_up"] == SMALL.num_layers * SMALL.num_experts
        print(f"node loss noticed in {noticed_s:.1f}s, healed in {healed_s:.1f}s; recovery phases {rec['phases']}")
