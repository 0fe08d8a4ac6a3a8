"""Real checkpoints on a real local Ray: Mixtral and Qwen3-MoE saved by transformers, DeepSeek-V3 FP8 and gpt-oss
MXFP4 in their released layouts. The cluster starts from the folder alone, rebalances, survives a SIGKILL of a
worker process from outside, and every expert tensor (scales and biases included) verifies against the file."""

from __future__ import annotations

import os
import signal
import time

import pytest
import ray
import torch

from elastic_ep.checkpoint import write_checkpoint
from elastic_ep.cluster import ElasticEPCluster
from elastic_ep.config import ClusterConfig, ModelSpec

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.timeout(300)


def _transformers_folder(root, model_type: str, original: bool, **keys):
    torch.manual_seed(0)
    config = transformers.AutoConfig.for_model(
        model_type, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        vocab_size=64, head_dim=16, num_experts_per_tok=2, **keys)
    folder = root / f"{model_type}-{'original' if original else 'fused'}"
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(
        folder, max_shard_size="20KB", save_original_format=original)
    return folder


CHECKPOINTS = {
    "mixtral": lambda root: _transformers_folder(root, "mixtral", True, num_local_experts=6, intermediate_size=24),
    "qwen3_moe": lambda root: _transformers_folder(root, "qwen3_moe", False, num_experts=6, moe_intermediate_size=8,
                                                   intermediate_size=24),
    "deepseek_v3_fp8": lambda root: write_checkpoint(
        root / "v3", ModelSpec(num_layers=2, num_experts=6, hidden=64, intermediate=32, first_layer=1, quant="fp8",
                               block=(16, 16)), "deepseek", family="deepseek_v3"),
    "gpt_oss_mxfp4": lambda root: write_checkpoint(
        root / "oss", ModelSpec(num_layers=2, num_experts=6, hidden=64, intermediate=64, quant="mxfp4", bias=True),
        "gpt-oss", family="gpt_oss"),
}


def _worker_pid(cluster: ElasticEPCluster, worker_id: str) -> int:
    handle = ray.get_actor(f"{cluster.prefix}-{worker_id}", namespace=ray.get_runtime_context().namespace)
    return ray.get(handle.ping.remote(), timeout=30).pid


def _wait_noticed(cluster: ElasticEPCluster, victim: str, timeout_s: float = 60.0) -> None:
    """Until the controller has seen ``victim`` die (it watches every worker), or fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        st = cluster.status()
        if victim in st["dead"] or victim not in st["ranks"].values():
            return
        time.sleep(0.2)
    raise AssertionError(f"the controller did not notice {victim}'s death within {timeout_s}s")


@pytest.mark.parametrize("name", sorted(CHECKPOINTS))
def test_real_checkpoint_starts_rebalances_survives_sigkill_and_verifies(ray_local, tmp_path, name):
    folder = CHECKPOINTS[name](tmp_path)
    cfg = ClusterConfig(checkpoint=str(folder), num_ranks=2, slots_per_rank=4, num_spares=1, call_timeout_s=30.0,
                        transfer_timeout_s=15.0, startup_timeout_s=60.0, state_dir=str(tmp_path / "state"),
                        name=f"real-{name[:6]}")
    spec = cfg.model  # read from the folder: no ModelSpec given
    assert spec.num_experts == 6
    with ElasticEPCluster(cfg) as cluster:
        ver = cluster.verify(against_checkpoint=True)
        assert ver.ok and ver.slots_checked == 2 * 4 * spec.num_layers, ver
        assert cluster.last_start.checkpoint_bytes >= 2 * 4 * spec.num_layers * spec.expert_format.data_bytes

        cluster.run_workload(batches=6, seed=3, zipf_s=1.5)
        rep = cluster.rebalance()
        assert rep.bytes_p2p == rep.plan["transfers"] * spec.expert_bytes  # whole bundles moved
        assert cluster.verify(against_checkpoint=True).ok

        st = cluster.status()
        assert st["shared_experts"]["managed"] is False
        assert list(st["expert_format"]) == list(spec.expert_format.names)  # e.g. w13, w13_scale_inv, w2, ...
        victim = st["ranks"].get(1, st["ranks"].get("1"))
        os.kill(_worker_pid(cluster, victim), signal.SIGKILL)  # as the world kills: from outside, no warning
        _wait_noticed(cluster, victim)
        st = cluster.wait_healthy(timeout_s=120)
        assert st["ranks"].get(1, st["ranks"].get("1")) not in (None, victim)  # a spare took the rank over
        rec = next(h for h in reversed(st["history"]) if h["reason"] == "recover")
        moved = rec["bytes_p2p"] + rec["bytes_from_backup"] + rec["bytes_from_checkpoint"]
        assert moved == 4 * spec.num_layers * spec.expert_bytes  # the dead rank's slots, every tensor of each
        ver = cluster.verify(against_checkpoint=True)
        assert ver.ok, ver
