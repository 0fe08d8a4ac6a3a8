"""Serving quantized and gpt-oss bundles: MXFP4 and INT4 dequantization, gpt-oss's clamped SwiGLU with biases,
against transformers' own dequantization and expert block, and the project's writer and reader."""

import json

import numpy as np
import pytest
import torch

from elastic_ep.checkpoint import CheckpointReader, write_checkpoint
from elastic_ep.checkpoint.bundle import to_row
from elastic_ep.checkpoint.geometry import read_spec
from elastic_ep.config import ModelSpec
from elastic_ep.errors import ConfigError
from elastic_ep.serving.compute import activate, combine_rank, expert_ffn
from elastic_ep.serving.oracle import CheckpointOracle, output_tolerance, reference_moe
from elastic_ep.serving.weights import (dequant_int4, dequant_mxfp4, held_interleaved, layer_weights,
                                       weights_for_slots)
from tests.hf_tiny import block_experts, block_route, load_moe_blocks, write_tiny_gpt_oss

transformers = pytest.importorskip("transformers")
from transformers.integrations.mxfp4 import convert_moe_packed_tensors  # noqa: E402

MXFP4 = ModelSpec(num_layers=2, num_experts=4, hidden=64, intermediate=64, quant="mxfp4", bias=True)
INT4 = ModelSpec(num_layers=2, num_experts=4, hidden=64, intermediate=32, quant="int4", group_size=16)


def _bits(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous().view(torch.int16 if x.element_size() == 2 else torch.int32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_mxfp4_dequant_is_bit_exact_with_transformers_for_every_code_and_scale(dtype):
    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (3, 256, 4, 16), dtype=torch.uint8, generator=g)
    blocks[0, :, 0, :] = torch.arange(256, dtype=torch.uint8)[:, None]  # every byte
    scales = torch.randint(100, 150, (3, 256, 4), dtype=torch.uint8, generator=g)
    scales[1, :, 0] = torch.arange(256, dtype=torch.uint8)  # every E8M0 scale, 0 and 255 included
    ours = dequant_mxfp4(blocks, scales, dtype)
    theirs = convert_moe_packed_tensors(blocks, scales, dtype=dtype).transpose(1, 2)  # [S, H, R] -> [S, R, H]
    assert ours.shape == theirs.shape == (3, 256, 128)
    nan = torch.isnan(theirs)
    assert torch.equal(torch.isnan(ours), nan)
    assert torch.isinf(theirs).any()  # scale 255 (2^128) reached
    assert torch.equal(_bits(ours)[~nan], _bits(theirs)[~nan])


def test_mxfp4_bundle_from_the_writer_dequantizes_as_transformers_reads_the_file(tmp_path):
    """The gpt-oss MXFP4 folder in the released layout: layer_weights of the held rows (interleaved, as held) equals
    transformers' dequant of the file's fused blocks/scales, gate columns then up columns; biases likewise."""
    from safetensors import safe_open

    folder = write_checkpoint(tmp_path / "oss", MXFP4, "gpt-oss", family="gpt_oss")
    reader = CheckpointReader(folder, MXFP4, "gpt-oss")
    assert held_interleaved("mxfp4", reader.preset) and not held_interleaved("none", reader.preset)
    w = layer_weights(reader.read_layer_slots(1, [3, 0, 3]), reader.format, "bfloat16", True)
    experts = "model.layers.1.mlp.experts"
    files = {}
    for shard in folder.glob("*.safetensors"):
        with safe_open(str(shard), "pt") as f:
            files.update({k: f.get_tensor(k) for k in f.keys() if k.startswith(experts)})
    gate_up = convert_moe_packed_tensors(files[f"{experts}.gate_up_proj_blocks"], files[f"{experts}.gate_up_proj_scales"])
    down = convert_moe_packed_tensors(files[f"{experts}.down_proj_blocks"], files[f"{experts}.down_proj_scales"])
    for slot, e in enumerate([3, 0, 3]):  # transformers: gate_up_proj [E, H, 2I], gate = [..., ::2], up = [..., 1::2]
        want13 = torch.cat([gate_up[e][:, 0::2], gate_up[e][:, 1::2]], dim=1).T
        b13 = files[f"{experts}.gate_up_proj_bias"][e]
        assert torch.equal(_bits(w["w13"][slot]), _bits(want13))
        assert torch.equal(_bits(w["w2"][slot]), _bits(down[e].T))
        assert torch.equal(w["w13_bias"][slot], torch.cat([b13[0::2], b13[1::2]]))
        assert torch.equal(w["w2_bias"][slot], files[f"{experts}.down_proj_bias"][e])


def _pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int4 values [R, C] in [-8, 7] -> [R, C/8] int32, compressed-tensors' pack-quantized layout (value i at bits 4i)."""
    u = (q + 8).to(torch.int64).view(q.shape[0], -1, 8)
    packed = (u << torch.arange(0, 32, 4)).sum(-1)
    return torch.where(packed >= 2 ** 31, packed - 2 ** 32, packed).to(torch.int32)


def _quantize_int4(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric group quantization as compressed-tensors does it: scale = amax / 7.5, q = clamp(round(w / s))."""
    g = w.float().view(w.shape[0], -1, group)
    scale = (g.abs().amax(-1) / 7.5).to(torch.bfloat16)
    q = torch.clamp(torch.round(g / scale.float().unsqueeze(-1)), -8, 7).to(torch.int8).view(w.shape)
    return q, scale


def test_int4_dequant_inverts_pack_quantization():
    g = torch.Generator().manual_seed(1)
    w13, w2 = torch.randn(64, 64, generator=g), torch.randn(64, 32, generator=g)
    bundle, approx = {}, {}
    for p, w in (("w13", w13), ("w2", w2)):
        q, scale = _quantize_int4(w, 16)
        bundle.update({f"{p}_packed": _pack_int4(q), f"{p}_scale": scale})
        approx[p] = (q.float().view(w.shape[0], -1, 16) * scale.float().unsqueeze(-1)).view(w.shape)
        err = (approx[p] - w).abs().view(w.shape[0], -1, 16).amax(-1)
        # the quantization itself: half a step, plus amax / s > 7.5 by the bf16 rounding of s (clamped to 7)
        assert (err <= scale.float() * (0.5 + 7.5 * 2 ** -8)).all()
    bundle["w13_shape"], bundle["w2_shape"] = torch.tensor([[32, 64], [32, 64]]), torch.tensor([64, 32])
    rows = torch.stack([to_row(bundle, INT4.expert_format)] * 2)
    w = layer_weights(rows, INT4.expert_format, "float32")
    for p in ("w13", "w2"):  # dequant is the exact inverse of packing, up to the quantization
        assert torch.equal(w[p][1], approx[p])
    q = torch.arange(-8, 8).repeat(4, 2)  # every int4 value at every nibble position
    assert torch.equal(dequant_int4(_pack_int4(q)[None], torch.ones(1, 4, 2), torch.float32)[0], q.float())


def test_int4_bundle_from_the_writer_dequantizes_from_its_bits(tmp_path):
    folder = write_checkpoint(tmp_path / "int4", INT4, "qwen", num_shards=1)
    reader = CheckpointReader(folder, INT4, "qwen")
    got = reader.read_bundles([(1, 2)])[(1, 2)]
    w = layer_weights(reader.read_layer_slots(1, [2]), reader.format, "bfloat16")
    packed = got["w13_packed"].numpy().view(np.uint32)
    codes = ((packed[..., None] >> np.arange(0, 32, 4, dtype=np.uint32)) & 0xF).astype(np.int64) - 8
    want = codes.reshape(64, 64) * np.repeat(got["w13_scale"].float().numpy(), 16, axis=1)
    assert torch.equal(w["w13"][0], torch.from_numpy(want).to(torch.bfloat16))


@pytest.mark.parametrize("spec", [INT4, ModelSpec(num_layers=2, num_experts=4, hidden=256, intermediate=128,
                                                  quant="fp8", block=(128, 128)), ModelSpec(num_layers=2, num_experts=4)])
def test_a_call_dequantizes_only_the_slots_it_uses_and_computes_what_the_whole_layer_would(tmp_path, spec):
    folder = write_checkpoint(tmp_path / "ckpt", spec, "qwen", num_shards=1)
    reader = CheckpointReader(folder, spec, "qwen")
    rows = reader.read_layer_slots(1, [3, 0, 2, 1])
    slots = torch.tensor([2, 0, 2, 2, 0])
    part, index = weights_for_slots(rows, reader.format, spec.dtype, slots)
    quantized = spec.quant != "none"
    assert part["w13"].shape[0] == (2 if quantized else 4)  # slots 0 and 2 only, where dequantizing costs
    x = torch.randn(5, spec.hidden).to(torch.bfloat16)
    rows_t, pair_w = torch.tensor([0, 1, 2, 3, 4]), torch.rand(5)
    whole = combine_rank(layer_weights(rows, reader.format, spec.dtype), x, rows_t, slots, pair_w)
    assert torch.equal(combine_rank(part, x, rows_t, index, pair_w), whole)


def test_activation_is_chosen_by_the_spec_and_matches_gpt_oss_gate():
    assert ModelSpec().activation == "silu" and MXFP4.activation == "swigluoai"
    assert ModelSpec(bias=True, activation="silu").activation == "silu"
    with pytest.raises(ConfigError, match="activation must be one of"):
        ModelSpec(activation="gelu")
    cfg = transformers.GptOssConfig(hidden_size=16, intermediate_size=8, num_local_experts=2)
    experts = transformers.models.gpt_oss.modeling_gpt_oss.GptOssExperts(cfg)
    gate_up = torch.randn(50, 16) * 6  # many beyond the limit of 7
    interleaved = torch.stack(gate_up.chunk(2, dim=-1), dim=-1).flatten(-2)  # gate even, up odd
    assert torch.allclose(activate(gate_up, "swigluoai"), experts._apply_gate(interleaved), rtol=1e-6, atol=1e-6)
    assert (gate_up.abs() > 7).any()
    with pytest.raises(ValueError, match="activation must be one of"):
        activate(gate_up, "relu")


@pytest.mark.parametrize("method", ["grouped", "loop"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_biased_swigluoai_ffn_matches_the_fp32_reference(method, dtype):
    g = torch.Generator().manual_seed(2)
    w = {"w13": (torch.randn(5, 48, 32, generator=g) * 0.4).to(dtype), "w2": (torch.randn(5, 32, 24, generator=g) * 0.3).to(dtype),
         "w13_bias": (torch.randn(5, 48, generator=g)).to(dtype), "w2_bias": torch.randn(5, 32, generator=g).to(dtype)}
    x = torch.randn(60, 32, generator=g).to(dtype)
    slots = torch.tensor([4, 0, 4, 2] * 15)  # slots 1 and 3 empty
    ref = reference_moe(w["w13"], w["w2"], x, slots[:, None].numpy(), np.ones((60, 1), np.float32),
                        w["w13_bias"], w["w2_bias"], "swigluoai")
    y = expert_ffn(w, x, slots, method, "swigluoai")
    assert y.dtype == dtype
    # roundings of the served path: gate/up GEMM out, activation, down GEMM out, final output: 2 eps
    assert float((y.float() - ref).abs().max()) <= output_tolerance(ref, dtype)
    no_bias = reference_moe(w["w13"], w["w2"], x, slots[:, None].numpy(), np.ones((60, 1), np.float32),
                            activation="swigluoai")
    assert float((no_bias - ref).abs().max()) > 10 * output_tolerance(ref, dtype)  # the biases matter


@pytest.mark.parametrize("mxfp4", [False, True])
def test_tiny_gpt_oss_served_from_its_bundles_matches_its_own_expert_block(tmp_path, mxfp4):
    """gpt-oss saved by transformers (bf16, or its experts re-saved as MXFP4 in the released layout): read_spec
    selects swigluoai; rows read by the project's reader, in shuffled slots, through combine_rank, against the
    model's own GptOssExperts in fp32 on the same weights (MXFP4: as transformers itself dequantizes the file)."""
    folder = write_tiny_gpt_oss(tmp_path / "oss", mxfp4=mxfp4)
    spec, preset = read_spec(folder)
    assert (spec.activation, spec.bias, spec.quant, preset) == ("swigluoai", True, "mxfp4" if mxfp4 else "none",
                                                                "gpt-oss")
    reader = CheckpointReader(folder, spec, preset)
    oracle = CheckpointOracle(str(folder), spec, preset)
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(7))  # slot s holds expert perm[s]
    for layer, block in enumerate(load_moe_blocks(folder, torch.float32)):
        x = torch.randn(40, 64, generator=torch.Generator().manual_seed(layer)).to(torch.bfloat16)
        ids, scores = block_route(block, x)
        exact = block_experts(block, x, ids, scores)
        w = layer_weights(reader.read_layer_slots(layer, perm.tolist()), reader.format, spec.dtype,
                          held_interleaved(spec.quant, reader.preset))
        rows, slots = torch.arange(40).repeat_interleave(2), torch.argsort(perm)[torch.as_tensor(ids).ravel()]
        for method in ("grouped", "loop"):
            ours = combine_rank(w, x, rows, slots, torch.as_tensor(scores).ravel(), method, spec.activation)
            assert float((ours - exact).abs().max()) <= output_tolerance(exact, torch.bfloat16), method
        # the oracle: fp32 math on the same weights, so only the summation order differs
        assert float((oracle(layer, x, ids, scores) - exact).abs().max()) <= 1e-4 * float(exact.abs().max())
        assert float(exact.abs().max()) > 0.5  # outputs are not vanishing: the check has teeth
