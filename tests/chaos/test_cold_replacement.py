"""The two self-healing holes, with worker processes SIGKILLed from outside: a dead idle spare is
replaced; a spare and a rank dying together with no room left on the survivors are healed by a
worker started cold, which loads the dead rank from peers, backups and the checkpoint."""

import pytest

from elastic_ep.chaos import chaos_config
from elastic_ep.cluster import ElasticEPCluster
from elastic_ep.errors import CapacityError
from elastic_ep.testing import sigkill_workers

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def tight(ray_local, chaos_checkpoint, tmp_path_factory):
    """4 ranks x 3 slots for 12 experts (no room to spare) and 1 hot spare."""
    cfg = chaos_config(chaos_checkpoint, tmp_path_factory.mktemp("state"), num_spares=1, slots_per_rank=3,
                       name="cold")
    with ElasticEPCluster(cfg) as c:
        yield c


def _live_spares(st: dict) -> list[str]:
    return [w for w in st["spares"] if w not in st["dead"]]


def test_sigkilled_idle_spare_is_replaced(tight):
    before = tight.status()
    (spare,) = before["spares"]
    sigkill_workers(tight, [spare])
    st = tight.wait_healthy(timeout_s=60)
    assert spare in st["dead"] and spare not in st["spares"]
    assert len(_live_spares(st)) == 1  # the pool is back to num_spares, with a new worker
    assert st["layout"] == before["layout"] and st["epoch"] == before["epoch"]  # no expert moved
    assert tight.verify(against_checkpoint=True).ok


def test_spare_and_rank_sigkilled_with_no_room_heal_through_a_cold_worker(tight):
    before = tight.status()
    (spare,) = _live_spares(before)
    victim = before["ranks"][2]
    sigkill_workers(tight, [spare, 2])
    st = tight.wait_healthy(timeout_s=90)
    assert sorted(st["ranks"]) == [0, 1, 2, 3] and st["ranks"][2] not in (victim, spare)
    rec = [h for h in st["history"] if h["reason"] == "recover" and h["replaced"]][-1]
    assert rec["replaced"]["2"].endswith("(cold)") and rec["dropped"] == []
    assert rec["bytes_p2p"] + rec["bytes_from_backup"] + rec["bytes_from_checkpoint"] > 0
    assert st["unserved"] == [] and st["lost"] == [] and st["last_error"] is None
    assert len(_live_spares(st)) == 1  # and the dead spare was replaced too
    ver = tight.verify(against_checkpoint=True)
    assert ver.ok and ver.slots_checked == 4 * 3 * 3, ver


def test_drain_moves_a_rank_off_and_releases_its_process(tight):
    import os
    import time

    import ray

    with pytest.raises(CapacityError, match=r"draining rank 1 would leave 3 ranks x 3 slots = 9 slots cannot hold 12"):
        tight.drain(1)
    (added,) = tight.grow(1).added
    pid = ray.get(tight.worker(added).ping.remote(), timeout=30).pid
    rep = tight.drain(added)
    st = tight.status()
    assert rep.dropped == (added,) and rep.safe_to_terminate_at is not None and len(rep.released) == 1
    assert sorted(st["ranks"]) == [0, 1, 2, 3] and rep.released[0] not in st["dead"] + st["spares"]
    assert rep.bytes_from_checkpoint == 0  # its experts moved to the others before it left
    deadline = time.monotonic() + 30
    while True:  # the released process is gone
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        assert time.monotonic() < deadline, f"released worker pid {pid} still runs"
        time.sleep(0.1)
    assert tight.verify(against_checkpoint=True).ok
