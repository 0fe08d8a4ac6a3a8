"""End-to-end tests of the running system on a real local Ray (CPU, Gloo): real actors, files, groups."""

import time

import numpy as np
import pytest

from elastic_ep.cluster import ElasticEPCluster
from elastic_ep.errors import CapacityError, UnknownRankError
from elastic_ep.layout import ExpertLayout

from elastic_ep.testing import SMALL, small_config

pytestmark = pytest.mark.timeout(240)


def _layout(cluster) -> ExpertLayout:
    return ExpertLayout.from_dict(cluster.status()["layout"])


def _last(status, reason):
    return next(h for h in reversed(status["history"]) if h["reason"] == reason)


@pytest.fixture(scope="module")
def cluster(ray_local, small_checkpoint, tmp_path_factory):
    c = ElasticEPCluster(small_config(small_checkpoint, tmp_path_factory.mktemp("c1")))
    c.start()
    yield c
    c.shutdown()


def test_start_loads_every_slot_from_the_checkpoint(cluster):
    st = cluster.status()
    layout = _layout(cluster)
    layout.validate()
    assert st["epoch"] == 0 and len(st["ranks"]) == 4 and len(st["spares"]) == 1
    assert cluster.last_start.checkpoint_bytes == 4 * SMALL.num_layers * 4 * SMALL.expert_bytes
    ver = cluster.verify(against_checkpoint=True)
    assert ver.ok, ver
    assert ver.slots_checked == 4 * 4 * SMALL.num_layers


def test_rebalance_follows_load_and_verifies(cluster):
    cluster.run_workload(batches=8, seed=1, zipf_s=1.5)
    before = _layout(cluster)
    rep = cluster.rebalance()
    after = _layout(cluster)
    assert rep.epoch_to == rep.epoch_from + 1
    assert rep.bytes_p2p == rep.plan["transfers"] * SMALL.expert_bytes
    assert rep.bytes_from_checkpoint == 0 and rep.bytes_from_backup == 0
    assert rep.slots_verified == rep.plan["transfers"] + rep.plan["copies"]
    assert not np.array_equal(before.phy2log, after.phy2log)
    # The hottest expert of each layer got extra replicas.
    assert after.logcnt.max() > 1
    assert cluster.verify(against_checkpoint=True).ok


def test_rebalance_twice_on_same_load_moves_nothing_more(cluster):
    rep = cluster.rebalance()
    assert rep.plan.get("transfers", 0) == 0 or rep.noop
    assert cluster.verify().ok


def test_kill_recovers_from_spare_with_peers_and_backups(cluster):
    st = cluster.status()
    victim_rank = 2
    victim = st["ranks"][victim_rank] if victim_rank in st["ranks"] else st["ranks"][str(victim_rank)]
    spare = st["spares"][0]
    # The hot spare has mapped every host backup ahead of need (page-locking is GPU-only).
    deadline = time.monotonic() + 60
    while st["spares_prepared"].get(spare) in (None, "preparing") and time.monotonic() < deadline:
        time.sleep(0.2)
        st = cluster.status()
    assert st["spares_prepared"][spare]["experts"] == st["backed_up"] == SMALL.num_layers * SMALL.num_experts
    assert st["spares_prepared"][spare]["pinned_bytes"] == 0 and st["spares_prepared"][spare]["pin_error"] is None
    cluster.kill(victim_rank)
    st = cluster.wait_healthy(timeout_s=90)
    rec = _last(st, "recover")
    assert rec["replaced"] == {str(victim_rank): spare}
    assert victim in st["dead"]
    # Experts a survivor still held came over P2P, the others from host backups: nothing from disk.
    assert rec["bytes_p2p"] + rec["bytes_from_backup"] == SMALL.num_layers * 4 * SMALL.expert_bytes
    assert rec["bytes_from_checkpoint"] == 0
    assert rec["bytes_from_backup"] == rec["plan"]["fetches"] * SMALL.expert_bytes
    assert len(st["spares"]) == 1 and st["spares"][0] != spare  # replenished
    ver = cluster.verify(against_checkpoint=True)
    assert ver.ok, ver


def test_unknown_rank_is_a_clear_error(cluster):
    with pytest.raises(UnknownRankError, match="no rank 99"):
        cluster.kill(99)
    with pytest.raises(UnknownRankError):
        cluster.shrink([99])
    assert cluster.verify().ok


def test_grow_then_shrink(cluster):
    rep = cluster.grow(1)
    assert rep.added and len(cluster.status()["ranks"]) == 5
    assert cluster.verify(against_checkpoint=True).ok
    new_rank = rep.added[0]
    st = cluster.status()
    retired = st["ranks"].get(new_rank, st["ranks"].get(str(new_rank)))
    rep = cluster.shrink(new_rank)
    st = cluster.status()
    assert rep.dropped == (new_rank,) and len(st["ranks"]) == 4
    # The spare pool was full, so the retired worker is released (its GPU freed), not kept; no failure recorded.
    assert len(st["spares"]) == 1 and retired not in st["spares"] and retired not in st["dead"]
    # A shrink moves what the retired rank held off it before it leaves: no storage reads.
    assert rep.bytes_from_checkpoint == 0
    assert cluster.verify(against_checkpoint=True).ok


def test_controller_restart_resumes(cluster, ray_local):
    ray = ray_local
    before = cluster.status()
    ray.kill(cluster.controller, no_restart=False)
    deadline = time.monotonic() + 60
    while True:
        try:
            st = cluster.status()  # ray.kill is asynchronous: wait for the restarted incarnation
            if st["restarts"] == before["restarts"] + 1:
                break
        except Exception:
            pass
        assert time.monotonic() < deadline, "controller did not come back"
        time.sleep(0.2)
    assert st["epoch"] == before["epoch"]
    assert st["restarts"] == before["restarts"] + 1
    assert st["layout"] == before["layout"]
    assert cluster.verify().ok
    cluster.run_workload(batches=4, seed=3, zipf_s=1.1)
    rep = cluster.rebalance()
    assert rep.epoch_to == before["epoch"] + 1
    assert cluster.verify(against_checkpoint=True).ok


def test_a_start_ray_has_no_room_for_is_refused_at_once_with_the_numbers(ray_local, small_checkpoint, tmp_path):
    # This Ray advertises no GPU, so GPU workers could never be placed: refused before any worker is
    # started, instead of waiting startup_timeout_s for workers that never come.
    cfg = small_config(small_checkpoint, tmp_path, device="cuda", startup_timeout_s=120.0, name="noroom")
    t0 = time.monotonic()
    with pytest.raises(CapacityError, match=r"4 ranks and 1 spares need 5 workers but only 0 can be placed: Ray has "
                                            r"0 GPU, [0-9.]+ CPU free: room for 0 more workers asking 1 GPU, 1 CPU each"):
        ElasticEPCluster(cfg).start()
    assert time.monotonic() - t0 < cfg.startup_timeout_s / 4
    names = [a["name"] for a in ray_local.util.list_named_actors(all_namespaces=True)]
    assert not [n for n in names if n.startswith("noroom") and not n.endswith("-controller")], names  # no worker


def test_no_spare_and_no_backups_drops_the_rank_and_reads_its_experts_from_the_checkpoint(ray_local, small_checkpoint,
                                                                                         tmp_path):
    cfg = small_config(small_checkpoint, tmp_path, num_spares=0, keep_backups=False, name="bare")
    with ElasticEPCluster(cfg) as c:
        c.kill(3)
        st = c.wait_healthy(timeout_s=90)
        rec = _last(st, "recover")
        assert rec["dropped"] == [3]  # no spare: the survivors take its experts
        assert rec["bytes_from_backup"] == 0  # no backups: what no survivor held comes from the file
        assert rec["bytes_from_checkpoint"] == rec["plan"]["fetches"] * SMALL.expert_bytes > 0
        layout = _layout(c)
        assert layout.ranks == (0, 1, 2) and layout.num_slots == 12
        layout.validate()
        assert c.verify(against_checkpoint=True).ok


def test_recovery_by_ray_actor_restart(ray_local, small_checkpoint, tmp_path):
    cfg = small_config(small_checkpoint, tmp_path, num_spares=0, max_restarts=2, name="restart")
    with ElasticEPCluster(cfg) as c:
        wid = c.kill(0, allow_restart=True)
        time.sleep(0.5)
        rep = c.recover()
        st = c.status()
        assert rep.replaced == {0: f"{wid} (restarted)"}
        assert st["ranks"][0] == wid and wid not in st["dead"]
        assert c.verify(against_checkpoint=True).ok
