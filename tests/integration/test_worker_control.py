"""A worker's control methods (ping, abort) answer while a transfer runs; abort ends it at once."""

import time

import numpy as np
import pytest
import ray

from actors.worker import worker_actor_class
from elastic_ep.layout import ExpertLayout
from elastic_ep.plan import plan_transfers
from elastic_ep.testing import SMALL
from elastic_ep.transport import StoreServer, register_backends

pytestmark = pytest.mark.timeout(120)


def test_abort_ends_a_transfer_and_ping_stays_responsive(ray_local, small_checkpoint):
    register_backends()
    cls = worker_actor_class("cpu")
    a, b = (cls.remote(f"ctl{i}", SMALL, 4, "cpu", small_checkpoint, "deepseek") for i in range(2))
    old = ExpertLayout.round_robin(SMALL.num_layers, SMALL.num_experts, [0, 1, 2], 4)
    ray.get([a.load.remote(0, old.experts_of(0), 0), b.load.remote(1, old.experts_of(1), 0)], timeout=60)
    store = StoreServer()
    host, port = store.address
    ray.get([a.form_group.remote("ctl-g", 2, 0, host, port, 20.0), b.form_group.remote("ctl-g", 2, 1, host, port, 20.0)],
            timeout=60)
    # Rank 0 must receive rank 2's experts from rank 1, but rank 1 never runs its part:
    # rank 0's receive would wait for the whole 20 s transfer timeout.
    new_phy = old.phy2log.copy()
    new_phy[:, 0:4] = old.phy2log[:, 8:12]
    new = ExpertLayout(new_phy % SMALL.num_experts, 4, SMALL.num_experts, (0, 1, 2), (0, 0, 0))
    holder_view = ExpertLayout(np.concatenate([old.phy2log[:, :4], old.phy2log[:, 8:12], old.phy2log[:, 4:8]], 1),
                               4, SMALL.num_experts, (0, 1, 2), (0, 0, 0))
    plan = plan_transfers(holder_view, new, [0, 1])
    part = plan.for_rank(0)
    assert len(part.recvs) > 0
    running = a.execute.remote(1, part, "ctl-g", {0: 0, 1: 1}, 20.0, {})
    time.sleep(0.5)
    t0 = time.monotonic()
    info = ray.get(a.ping.remote(), timeout=5)  # control group: answers mid-transfer
    assert info.busy is not None and time.monotonic() - t0 < 2.0
    assert ray.get(a.abort.remote(), timeout=5) == ["ctl-g"]
    with pytest.raises(ray.exceptions.RayTaskError) as err:
        ray.get(running, timeout=10)  # ends well before the 20 s transfer timeout
    assert "TransferError" in str(err.value) or "aborted" in str(err.value)
    assert time.monotonic() - t0 < 8.0
    # Live weights are untouched: still exactly what was loaded.
    fps = ray.get(a.fingerprints.remote(), timeout=30)
    assert np.array_equal(fps.experts, old.experts_of(0))
    for h in (a, b):
        ray.kill(h)
