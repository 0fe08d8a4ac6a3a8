"""Served outputs equal the model's own sparse-MoE expert block on tiny real models saved by transformers
(Mixtral, Qwen3-MoE, DeepSeek-V3, gpt-oss in bf16 and with MXFP4 experts in the released layout), with the model's
own router decisions, before and after a rebalance."""

import numpy as np
import pytest
import torch

from elastic_ep.cluster import ElasticEPCluster
from elastic_ep.checkpoint.geometry import read_spec
from elastic_ep.config import ClusterConfig
from elastic_ep.serving.oracle import output_tolerance
from tests.hf_tiny import (FAMILIES, block_experts, block_route, hf_spec, load_moe_blocks, write_tiny_gpt_oss,
                           write_tiny_model)

pytestmark = pytest.mark.timeout(300)


def _served_vs_block(cluster, blocks16, blocks32, seed):
    """Tolerances (output_tolerance): 2 eps of bf16 against the block in fp32 on the same bf16 weights (MXFP4:
    transformers' own dequantization of the file), 4 eps against the block in bf16, which rounds as often again."""
    width = cluster.config.model.hidden
    for layer, (b16, b32) in enumerate(zip(blocks16, blocks32)):
        hidden = torch.randn(40, width, generator=torch.Generator().manual_seed(seed + layer)).to(torch.bfloat16)
        ids, weights = block_route(b16, hidden)  # the model's own router
        served = cluster.moe(layer, hidden, ids, weights).float()
        exact = block_experts(b32, hidden, ids, weights)  # the model's code in fp32 on the same bf16 weights
        own16 = block_experts(b16, hidden, ids, weights).float()
        assert float(exact.abs().max()) > 0.5
        assert float((served - exact).abs().max()) <= output_tolerance(exact, torch.bfloat16), (layer, "fp32 block")
        assert float((served - own16).abs().max()) <= output_tolerance(exact, torch.bfloat16, 4.0), (layer, "bf16")


@pytest.mark.parametrize("family", FAMILIES + ("gpt_oss", "gpt_oss_mxfp4"))
def test_served_outputs_equal_the_models_own_block(family, ray_local, tmp_path_factory):
    if family.startswith("gpt_oss"):  # its spec as the cluster reads it: clamped SwiGLU, biases, MXFP4
        mxfp4 = family.endswith("mxfp4")
        folder = write_tiny_gpt_oss(tmp_path_factory.mktemp(family), mxfp4=mxfp4)
        spec, preset = read_spec(folder)
        assert (spec.activation, spec.bias, spec.quant) == ("swigluoai", True, "mxfp4" if mxfp4 else "none")
    else:
        folder = write_tiny_model(family, tmp_path_factory.mktemp(family))
        spec, preset = hf_spec(family, folder)
    assert spec.num_experts == 8 and spec.dtype == "bfloat16"
    blocks16, blocks32 = load_moe_blocks(folder, torch.bfloat16), load_moe_blocks(folder, torch.float32)
    assert len(blocks16) == spec.num_layers
    cfg = ClusterConfig(model=spec, checkpoint=str(folder), preset=preset, num_ranks=3, slots_per_rank=4,
                        num_spares=0, call_timeout_s=30.0, transfer_timeout_s=10.0,
                        state_dir=str(tmp_path_factory.mktemp(family + "-state")))
    with ElasticEPCluster(cfg) as cluster:
        _served_vs_block(cluster, blocks16, blocks32, 0)
        load = np.ones((spec.num_layers, spec.num_experts))
        load[:, 3] = 50.0
        rep = cluster.rebalance(load)
        assert rep.epoch_to == 1
        _served_vs_block(cluster, blocks16, blocks32, 10)
