"""Expert compute on one rank: grouped and per-slot paths against the fp32 oracle and transformers' own expert blocks."""

import numpy as np
import pytest
import torch

from elastic_ep.serving.compute import combine_rank, expert_ffn, grouped_supported
from elastic_ep.serving.oracle import output_tolerance, reference_moe
from tests.hf_tiny import FAMILIES, block_experts, block_route, load_moe_blocks, write_tiny_model


def _weights(num_slots, hidden, inter, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"w13": (torch.randn(num_slots, 2 * inter, hidden, generator=g) * 0.2).to(dtype),
            "w2": (torch.randn(num_slots, hidden, inter, generator=g) * 0.2).to(dtype)}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("method", ["grouped", "loop"])
def test_expert_ffn_matches_the_oracle_with_empty_and_shuffled_slots(dtype, method):
    w = _weights(6, 32, 24, dtype)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(50, 32, generator=g).to(dtype)
    slots = torch.tensor([4, 0, 4, 2] * 12 + [0, 4])  # slots 1, 3 and 5 get nothing
    y = expert_ffn(w, x, slots, method)
    assert y.dtype == dtype and y.shape == x.shape
    ref = reference_moe(w["w13"], w["w2"], x, slots[:, None].numpy(), np.ones((50, 1), np.float32))
    err = float((y.float() - ref).abs().max())
    assert err <= output_tolerance(ref, dtype), (err, output_tolerance(ref, dtype))


def test_grouped_and_loop_agree_and_no_tokens_is_fine():
    w = _weights(4, 64, 32, torch.bfloat16)
    x = torch.randn(33, 64).to(torch.bfloat16)
    slots = torch.randint(0, 4, (33,))
    assert grouped_supported(w)
    a, b = expert_ffn(w, x, slots, "grouped"), expert_ffn(w, x, slots, "loop")
    assert float((a.float() - b.float()).abs().max()) <= output_tolerance(b.float(), torch.bfloat16, 1.0)
    assert expert_ffn(w, x[:0], slots[:0]).shape == (0, 64)
    with pytest.raises(ValueError, match="method must be"):
        expert_ffn(w, x, slots, "fast")


def test_combine_rank_weights_and_sums_each_tokens_pairs():
    w = _weights(5, 16, 8, torch.float32)
    x = torch.randn(7, 16)
    ids = np.array([[0, 3], [1, 4], [2, 0], [3, 1], [4, 2], [0, 1], [2, 3]])
    weights = np.random.default_rng(0).random(ids.shape).astype(np.float32)
    rows = torch.arange(7).repeat_interleave(2)
    out = combine_rank(w, x, rows, torch.as_tensor(ids).ravel(), torch.as_tensor(weights).ravel())
    ref = reference_moe(w["w13"], w["w2"], x, ids, weights)
    assert out.dtype == torch.float32
    assert float((out - ref).abs().max()) <= output_tolerance(ref, torch.float32)


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    return {f: write_tiny_model(f, tmp_path_factory.mktemp(f)) for f in FAMILIES}


@pytest.mark.parametrize("family", FAMILIES)
def test_matches_the_models_own_expert_block(family, tiny_models):
    """Stacked bf16 weights of a rank holding every expert in shuffled slots vs the model's own block."""
    blocks16 = load_moe_blocks(tiny_models[family], torch.bfloat16)
    blocks32 = load_moe_blocks(tiny_models[family], torch.float32)
    for layer, (b16, b32) in enumerate(zip(blocks16, blocks32)):
        x = torch.randn(40, 32, generator=torch.Generator().manual_seed(layer)).to(torch.bfloat16)
        ids, weights = block_route(b16, x)  # the model's own router decisions
        perm = torch.randperm(8, generator=torch.Generator().manual_seed(7))  # slot s holds expert perm[s]
        stacked = {"w13": b16.experts.gate_up_proj.data[perm], "w2": b16.experts.down_proj.data[perm]}
        slot_of = torch.argsort(perm)
        rows = torch.arange(40).repeat_interleave(ids.shape[1])
        ours = combine_rank(stacked, x, rows, slot_of[torch.as_tensor(ids).ravel()],
                            torch.as_tensor(weights).ravel()).to(torch.bfloat16).float()
        exact = block_experts(b32, x, ids, weights)  # the model's own code in fp32 on the same bf16 weights
        own16 = block_experts(b16, x, ids, weights).float()
        assert float((ours - exact).abs().max()) <= output_tolerance(exact, torch.bfloat16)
        assert float((ours - own16).abs().max()) <= output_tolerance(exact, torch.bfloat16, 4.0)
        assert float(exact.abs().max()) > 0.5  # outputs are not vanishing: the check has teeth
