"""Each named fault, once, on one long-lived cluster: kill a worker at every phase, the controller mid-rebalance.

After every fault the chaos invariants must hold (see elastic_ep/chaos.py): healthy again
within a bound, every slot verifies against the checkpoint, nothing lost, the epoch only
moves forward, and a controller killed mid-rebalance leaves exactly the old or the planned
layout in force. Then the cases where recovery is impossible: typed errors, nothing guessed.
"""

import shutil

import numpy as np
import pytest

from elastic_ep.chaos import ChaosRunner, chaos_config
from elastic_ep.cluster import ElasticEPCluster
from elastic_ep.errors import ExpertsLostError
from elastic_ep.faults import CONTROLLER_PHASES, ROLLED_FORWARD
from elastic_ep.layout import ExpertLayout

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def cluster(ray_local, chaos_checkpoint, tmp_path_factory):
    c = ElasticEPCluster(chaos_config(chaos_checkpoint, tmp_path_factory.mktemp("state")))
    c.start()
    yield c
    c.shutdown()


@pytest.fixture(scope="module")
def runner(cluster):
    return ChaosRunner(cluster, np.random.default_rng(7), settle_s=90.0)


def _step(runner, name, kills):
    res = runner.step(name)
    assert res.ok, res
    assert res.kills >= kills, res
    assert not res.hang and res.corrupted_slots == 0 and res.lost_experts == 0
    assert res.epoch_to >= res.epoch_from
    return res


def test_idle_rank(runner, cluster):
    before = cluster.status()
    _step(runner, "idle", 1)
    st = cluster.status()
    assert st["epoch"] == before["epoch"] + 1 and len(st["ranks"]) == 4


def test_hot_spare_killed_is_replaced(runner, cluster):
    before = cluster.status()
    spare = before["spares"][0]
    _step(runner, "spare_idle", 1)
    st = cluster.status()
    assert spare in st["dead"] and spare not in st["spares"] and len(st["spares"]) == 2
    assert st["layout"] == before["layout"]  # a spare's death moves no expert


def test_kill_while_forming_communicators(runner, cluster):
    seen = len(cluster.status()["history"])
    _step(runner, "form_group", 2)
    # Communicators are re-formed after the commit; a failure there is a note of the record.
    failures = [f for h in cluster.status()["history"][seen:] for f in h.get("failures", []) + h.get("notes", [])]
    # The member that died before joining got the formation called off: the others were
    # released at once (FormationAbandoned), not left to wait out the transfer timeout.
    assert any("formation abandoned" in f for f in failures), failures
    assert not any("did not join within" in f for f in failures), failures


def test_kill_sender_mid_transfer(runner):
    res = _step(runner, "transfer_send", 1)
    # The rebalance itself saw the death and re-planned around it (then committed).
    assert res.failures and "execute failed" in res.failures[0], res.failures


def test_kill_receiver_mid_transfer(runner):
    res = _step(runner, "transfer_recv", 1)
    assert res.failures and "execute failed" in res.failures[0], res.failures


def test_kill_while_fetching_from_backups(runner):
    _step(runner, "fetch", 2)


def test_kill_between_staging_and_commit(runner):
    res = _step(runner, "staged", 1)
    assert res.failures and "execute failed" in res.failures[0], res.failures


def test_two_workers_at_once(runner):
    _step(runner, "two_at_once", 2)


def test_kill_while_a_recovery_runs(runner):
    _step(runner, "during_recovery", 2)


def test_spare_killed_while_taking_over(runner):
    _step(runner, "spare_takeover", 2)


# On real Ray, one phase of each kind: staging mid-flight (rolled back), all staged and verified but not
# decided (the last roll-back), decided (rolled forward), committed (replenishing). The in-process unit
# test (test_controller_steps.py) kills the controller at every phase.
REAL_RAY_PHASES = ("transfer", "persist", "commit", "replenish")
assert set(REAL_RAY_PHASES) <= set(CONTROLLER_PHASES) and set(ROLLED_FORWARD) <= set(REAL_RAY_PHASES)


@pytest.mark.parametrize("phase", REAL_RAY_PHASES)
def test_controller_killed_mid_rebalance_commits_atomically(runner, cluster, phase):
    before = cluster.status()
    res = _step(runner, f"controller_{phase}", 1)
    st = cluster.status()
    assert st["restarts"] == before["restarts"] + 1
    rolled_forward = phase in ROLLED_FORWARD
    assert st["epoch"] == before["epoch"] + (1 if rolled_forward else 0), res
    assert (st["layout"] == before["layout"]) != rolled_forward


def test_rebalance_call_outlives_a_controller_restart(runner, cluster):
    """Through the public API the call is retried on the restarted controller, which rolled forward first."""
    st = cluster.status()
    load, expected, _ = runner._load_where(st, lambda p: [] if p.is_noop else [0])
    cluster.arm_controller_fault("commit")
    rep = cluster.rebalance(load)
    now = cluster.status()
    assert now["restarts"] == st["restarts"] + 1
    assert rep.noop and now["epoch"] == st["epoch"] + 1  # the retry found the planned layout in force
    assert ExpertLayout.from_dict(now["layout"]) == expected
    assert cluster.verify(against_checkpoint=True).ok


# -- recovery impossible: typed errors, the cluster keeps serving what it can -------------------


@pytest.fixture()
def tight(ray_local, chaos_checkpoint, tmp_path):
    """No spare, no backups, capacity for exactly every expert once; its own copy of the checkpoint."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(chaos_checkpoint, ckpt)
    cfg = chaos_config(str(ckpt), tmp_path / "state", num_spares=0, slots_per_rank=3, keep_backups=False,
                       name="tight")
    c = ElasticEPCluster(cfg)
    c.start()
    yield c, ckpt, chaos_checkpoint
    c.shutdown()


def test_no_room_heals_cold_then_lost_experts_are_typed_and_nothing_is_guessed(tight):
    c, ckpt, pristine = tight
    before = c.status()
    # 3 ranks x 3 slots cannot hold 12 experts and there is no spare: a worker started cold takes
    # rank 1 over, reading what no survivor holds from the checkpoint (no backups here).
    c.kill(1)
    st = c.wait_healthy(timeout_s=90)
    rec = [h for h in st["history"] if h["reason"] == "recover"][-1]
    assert rec["replaced"]["1"].endswith("(cold)") and rec["bytes_from_checkpoint"] > 0
    assert sorted(st["ranks"]) == [0, 1, 2, 3] and st["unserved"] == [] and st["last_error"] is None
    assert c.verify(against_checkpoint=True).ok
    before = st

    # The checkpoint disappears too: a new worker could hold rank 1, but nothing can give its weights.
    shutil.rmtree(ckpt)
    c.kill(1)
    with pytest.raises(ExpertsLostError) as info:
        c.recover()
    st = c.status()
    dead_rank = ExpertLayout.from_dict(st["layout"]).experts_of(1)
    assert sorted(info.value.lost) == sorted(st["unserved"])
    assert sorted(st["unserved"]) == sorted({(l, int(e)) for l in range(3) for e in dead_rank[l]})
    assert sorted(st["lost"]) == sorted(info.value.lost)
    assert st["layout"] == before["layout"] and st["epoch"] == before["epoch"]
    ver = c.verify()
    assert ver.num_bad == 0 and ver.ranks_unreachable == (1,)  # still serving what it can, nothing overwritten

    # The checkpoint comes back: the same request now succeeds and every slot verifies.
    shutil.copytree(pristine, ckpt)
    rep = c.recover()
    assert rep.epoch_to == before["epoch"] + 1 and rep.bytes_from_checkpoint > 0
    st = c.wait_healthy(timeout_s=60)
    assert st["lost"] == [] and st["unserved"] == [] and st["last_error"] is None
    assert c.verify(against_checkpoint=True).ok
