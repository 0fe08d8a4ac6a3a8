"""Expert compute on a CUDA device: the grouped-GEMM path and the per-slot loop against the fp32 oracle."""

import numpy as np
import pytest
import torch

from elastic_ep.serving.compute import combine_rank, expert_ffn, grouped_supported
from elastic_ep.serving.oracle import output_tolerance, reference_moe

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("method", ["grouped", "loop"])
def test_cuda_expert_compute_matches_the_oracle(method):
    dev = torch.device("cuda", 0)
    g = torch.Generator().manual_seed(0)
    w = {"w13": (torch.randn(16, 2 * 1408, 2048, generator=g) * 0.02).to(torch.bfloat16).to(dev),
         "w2": (torch.randn(16, 2048, 1408, generator=g) * 0.02).to(torch.bfloat16).to(dev)}
    if method == "grouped" and not grouped_supported(w):
        pytest.skip("torch grouped_mm not offered on this GPU")
    x = torch.randn(256, 2048, generator=g).to(torch.bfloat16)
    ids = np.stack([np.random.default_rng(t).choice(16, 6, replace=False) for t in range(256)])
    weights = np.random.default_rng(1).random((256, 6)).astype(np.float32)
    rows = torch.arange(256, device=dev).repeat_interleave(6)
    out = combine_rank(w, x.to(dev), rows, torch.from_numpy(ids.ravel()).to(dev),
                       torch.from_numpy(weights.ravel()).to(dev), method).to(torch.bfloat16).float().cpu()
    ref = reference_moe(w["w13"].cpu(), w["w2"].cpu(), x, ids, weights)
    assert float((out - ref).abs().max()) <= output_tolerance(ref, torch.bfloat16)
    assert expert_ffn(w, x[:0].to(dev), rows[:0], method).shape == (0, 2048)
