"""GPU path (NCCL): rebalance and recovery verified slot by slot; a kill mid-transfer is bounded and retried.

Skipped where fewer than two CUDA devices are visible (CI); run on the GPU hosts.
"""

import os
import tempfile
import time

import pytest
import torch

from elastic_ep.config import ClusterConfig, ModelSpec
from elastic_ep.storage import write_synthetic_checkpoint

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.timeout(600),
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs"),
]

SPEC = ModelSpec(num_layers=4, num_experts=16, hidden=512, intermediate=256)


@pytest.fixture(scope="module")
def ray_gpu():
    import ray

    env = {k: os.environ[k] for k in ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST",
                                      "NVSHMEM_DISABLE_NVLS", "PYTHONPATH") if k in os.environ}
    ray.init(include_dashboard=False, log_to_driver=False, namespace="eep-gpu-tests",
             runtime_env={"env_vars": env})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("gpuckpt")
    write_synthetic_checkpoint(path, SPEC, num_shards=2, device="cuda")
    return str(path)


def _config(checkpoint, **kw):
    base = dict(model=SPEC, checkpoint=checkpoint, num_ranks=2, slots_per_rank=10, num_spares=1, device="cuda",
                gpu_fractions=(1.0, 0.5, 0.5), transfer_timeout_s=10.0, call_timeout_s=60.0,
                startup_timeout_s=180.0, state_dir=tempfile.mkdtemp(prefix="eep-gpu-state-"))
    base.update(kw)
    return ClusterConfig(**base)


def test_nccl_rebalance_and_recovery_verified(ray_gpu, checkpoint):
    from elastic_ep.cluster import ElasticEPCluster

    with ElasticEPCluster(_config(checkpoint, name="gpu1")) as c:
        c.run_workload(batches=8, zipf_s=1.3)
        rep = c.rebalance()
        assert rep.bytes_p2p > 0 and rep.plan["fetches"] == 0
        assert c.verify(against_checkpoint=True).ok
        c.kill(1)
        st = c.wait_healthy(timeout_s=300)
        rec = next(h for h in reversed(st["history"]) if h["reason"] == "recover")
        assert rec["replaced"] and rec["bytes_from_checkpoint"] == 0
        ver = c.verify(against_checkpoint=True)
        assert ver.ok, ver


def test_kill_mid_transfer_is_bounded_and_retried(ray_gpu, checkpoint):
    from elastic_ep.cluster import ElasticEPCluster
    from elastic_ep.layout import ExpertLayout

    with ElasticEPCluster(_config(checkpoint, name="gpu2", auto_recover=False)) as c:
        c.run_workload(batches=8, zipf_s=1.3)
        before_epoch = c.status()["epoch"]
        c.arm_worker_fault(1, "transfer_recv", 0.0)  # rank 1 dies as the exchange starts
        t0 = time.monotonic()
        rep = c.rebalance()
        elapsed = time.monotonic() - t0
        assert rep.failures and rep.attempt > 1, rep  # the first attempt failed on the dead peer...
        assert elapsed < 10.0 * 3 + 60, elapsed  # ...within its bounded timeout, then re-planned
        assert 1 in rep.replaced or 1 in rep.dropped
        layout = ExpertLayout.from_dict(c.status()["layout"])
        layout.validate()
        ver = c.verify(against_checkpoint=True)  # survivors' weights intact, every slot as planned
        assert ver.ok, ver
        assert c.status()["epoch"] > before_epoch  # the retry committed a new layout


FP8 = ModelSpec(num_layers=2, num_experts=16, hidden=512, intermediate=256, first_layer=1, quant="fp8", block=(128, 128))


def test_nccl_fp8_bundles_move_with_their_scales(ray_gpu, tmp_path_factory):
    """FP8 block-scaled experts over NCCL: the cluster starts from the folder alone, and after a rebalance and a
    recovery every slot's weights and weight_scale_inv verify against the file."""
    import signal

    import ray

    from elastic_ep.checkpoint import write_checkpoint
    from elastic_ep.cluster import ElasticEPCluster

    folder = write_checkpoint(tmp_path_factory.mktemp("fp8"), FP8, "deepseek", family="deepseek_v3", device="cuda")
    cfg = _config(str(folder), model=None, name="gpu-fp8")
    assert cfg.model == FP8
    with ElasticEPCluster(cfg) as c:
        c.run_workload(batches=8, zipf_s=1.3)
        rep = c.rebalance()
        assert rep.bytes_p2p == rep.plan["transfers"] * FP8.expert_bytes > 0
        assert c.verify(against_checkpoint=True).ok
        victim = c.status()["ranks"].get(1, c.status()["ranks"].get("1"))
        handle = ray.get_actor(f"{c.prefix}-{victim}", namespace=ray.get_runtime_context().namespace)
        os.kill(ray.get(handle.ping.remote(), timeout=60).pid, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while victim in c.status()["ranks"].values() and victim not in c.status()["dead"]:
            assert time.monotonic() < deadline, f"{victim}'s death not noticed"
            time.sleep(0.2)
        st = c.wait_healthy(timeout_s=300)
        assert st["ranks"].get(1, st["ranks"].get("1")) != victim
        ver = c.verify(against_checkpoint=True)
        assert ver.ok, ver
