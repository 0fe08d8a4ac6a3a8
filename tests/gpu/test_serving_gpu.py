"""Expert compute on a CUDA device: the grouped-GEMM path and the per-slot loop against the fp32 oracle."""

import numpy as np
import pytest
import torch

from elastic_ep.serving.compute import combine_rank, expert_ffn, grouped_supported
from elastic_ep.serving.oracle import output_tolerance, reference_moe

pytestmark = pytest.mark.gpu


def _serve(w, x, num_experts, top_k, method, activation="silu"):
    """Random router decisions for ``x`` [T, H] (CPU), served through combine_rank on w's device:
    (ids [T, k], weights [T, k], output [T, H] rounded to bf16, on the CPU as fp32)."""
    dev = w["w13"].device
    ids = np.stack([np.random.default_rng(t).choice(num_experts, top_k, replace=False) for t in range(len(x))])
    weights = np.random.default_rng(1).random(ids.shape).astype(np.float32)
    rows = torch.arange(len(x), device=dev).repeat_interleave(top_k)
    out = combine_rank(w, x.to(dev), rows, torch.from_numpy(ids.ravel()).to(dev),
                       torch.from_numpy(weights.ravel()).to(dev), method, activation)
    return ids, weights, out.to(torch.bfloat16).float().cpu()


@pytest.mark.parametrize("method", ["grouped", "loop"])
def test_cuda_expert_compute_matches_the_oracle(method):
    dev = torch.device("cuda", 0)
    g = torch.Generator().manual_seed(0)
    w = {"w13": (torch.randn(16, 2 * 1408, 2048, generator=g) * 0.02).to(torch.bfloat16).to(dev),
         "w2": (torch.randn(16, 2048, 1408, generator=g) * 0.02).to(torch.bfloat16).to(dev)}
    if method == "grouped" and not grouped_supported(w):
        pytest.skip("torch grouped_mm not offered on this GPU")
    x = torch.randn(256, 2048, generator=g).to(torch.bfloat16)
    ids, weights, out = _serve(w, x, 16, 6, method)
    ref = reference_moe(w["w13"].cpu(), w["w2"].cpu(), x, ids, weights)
    assert float((out - ref).abs().max()) <= output_tolerance(ref, torch.bfloat16)
    assert expert_ffn(w, x[:0].to(dev), torch.zeros(0, dtype=torch.int64, device=dev), method).shape == (0, 2048)


@pytest.mark.parametrize("method", ["grouped", "loop"])
def test_cuda_gpt_oss_experts_from_mxfp4_rows_match_the_cpu_oracle(method):
    """gpt-oss geometry (hidden 2880, intermediate 2880) as MXFP4 byte rows with biases, interleaved as held:
    dequantized on the GPU bit-exactly as on the CPU, and the clamped SwiGLU within the bf16 tolerance."""
    from elastic_ep.config import ModelSpec
    from elastic_ep.serving.weights import layer_weights

    dev = torch.device("cuda", 0)
    spec = ModelSpec(num_layers=1, num_experts=8, hidden=2880, intermediate=2880, quant="mxfp4", bias=True)
    fmt = spec.expert_format
    g = torch.Generator().manual_seed(0)
    rows = torch.randint(0, 256, (8, fmt.row_bytes), dtype=torch.uint8, generator=g)
    for name in ("w13_scales", "w2_scales"):  # realistic E8M0 scales: 2^-9 .. 2^-5
        i = fmt.names.index(name)
        t, off = fmt.tensors[i], fmt.offsets[i]
        rows[:, off: off + t.nbytes] = torch.randint(118, 123, (8, t.nbytes), dtype=torch.uint8, generator=g)
    for name in ("w13_bias", "w2_bias"):
        i = fmt.names.index(name)
        t, off = fmt.tensors[i], fmt.offsets[i]
        bias = (torch.randn(8, t.numel, generator=g) * 0.1).to(torch.bfloat16)
        rows[:, off: off + t.nbytes] = bias.view(torch.uint8)
    cpu = layer_weights(rows, fmt, "bfloat16", interleaved=True)
    w = layer_weights(rows.to(dev), fmt, "bfloat16", interleaved=True)
    assert all(torch.equal(w[k].cpu().view(torch.int16), cpu[k].view(torch.int16)) for k in cpu)
    if method == "grouped" and not grouped_supported(w):
        pytest.skip("torch grouped_mm not offered on this GPU")
    x = torch.randn(256, 2880, generator=g).to(torch.bfloat16)
    ids, weights, out = _serve(w, x, 8, 4, method, "swigluoai")
    ref = reference_moe(cpu["w13"], cpu["w2"], x, ids, weights, cpu["w13_bias"], cpu["w2_bias"], "swigluoai")
    assert float((out - ref).abs().max()) <= output_tolerance(ref, torch.bfloat16)
