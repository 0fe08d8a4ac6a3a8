"""On a 2-node Ray cluster: a spare and a rank SIGKILLed together with no room left on the survivor;
a worker started cold on the dead rank's node heals the cluster and every slot verifies."""

import pytest

from elastic_ep.cluster import ElasticEPCluster
from elastic_ep.storage import write_synthetic_checkpoint
from elastic_ep.testing import SMALL, ray_node_cluster, sigkill_workers, small_config

pytestmark = [pytest.mark.timeout(240), pytest.mark.slow]


@pytest.fixture(scope="module")
def ray_nodes():
    with ray_node_cluster(2, "elastic-ep-cold-nodes") as nodes:
        yield nodes


def test_cold_replacement_on_the_dead_ranks_node(ray_nodes, tmp_path):
    ray, _, _ = ray_nodes
    ckpt = write_synthetic_checkpoint(tmp_path / "ckpt", SMALL, num_shards=2)
    # 2 ranks x 6 slots hold the 12 experts exactly: one rank alone cannot.
    cfg = small_config(ckpt, tmp_path, num_ranks=2, slots_per_rank=6, num_spares=1, num_nodes=2, name="coldn")
    with ElasticEPCluster(cfg) as c:
        before = c.status()
        sigkill_workers(c, [before["spares"][0], 1])
        st = c.wait_healthy(timeout_s=120)
        assert sorted(st["ranks"]) == [0, 1] and st["unserved"] == [] and st["last_error"] is None
        rec = [h for h in st["history"] if h["reason"] == "recover" and h["replaced"]][-1]
        assert rec["replaced"]["1"].endswith("(cold)")
        node = ray.get(c.worker(1).ping.remote(), timeout=30).node_id
        assert node == st["node_ids"][st["rank_nodes"][1]]  # started where the dead rank's node is pinned
        assert len([w for w in st["spares"] if w not in st["dead"]]) == 1
        ver = c.verify(against_checkpoint=True)
        assert ver.ok and ver.slots_checked == 2 * 6 * SMALL.num_layers, ver
