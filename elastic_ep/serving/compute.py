"""Expert compute on one rank: the gated expert FFN over its local slots' stacked weights, grouped by slot.

Weights come as a dict of named stacked tensors for one layer (today
``{"w13": [slots, 2I, H], "w2": [slots, H, I]}`` in the model dtype; dequantized
checkpoint bundles plug in as the same names). Activations are SiLU-gated:
``w2 @ (silu(gate) * up)`` with ``[gate; up] = w13 @ x``.

Precision: both GEMMs take model-dtype inputs and accumulate in fp32 (torch's bf16/fp16
kernels on CPU and CUDA do); the gate/up result is rounded to the model dtype, the
activation is computed in fp32 and rounded once, as fused-MoE kernels do. The weighted
sum over a token's pairs (``combine_rank``) is kept in fp32 and returned as fp32.

Two GEMM paths, the same arithmetic: ``torch.nn.functional.grouped_mm`` (one kernel per
projection over every slot; CPU, and CUDA sm80+ for bfloat16) and a per-slot loop.
"""

from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F

_GROUPED = hasattr(F, "grouped_mm")


def grouped_supported(weights: Mapping[str, torch.Tensor]) -> bool:
    """Whether the grouped-GEMM kernel takes these weights (torch has it, device/dtype/alignment fit)."""
    w13, w2 = weights["w13"], weights["w2"]
    if not _GROUPED or w13.shape[-1] % 8 or w2.shape[-1] % 8:
        return False
    if w13.device.type == "cpu":
        return True
    return (w13.device.type == "cuda" and w13.dtype == torch.bfloat16
            and torch.cuda.get_device_capability(w13.device) >= (8, 0))


def _gated(gate_up: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """silu(gate) * up in fp32, rounded once to ``dtype``: [m, 2I] -> [m, I]."""
    gate, up = gate_up.float().chunk(2, dim=-1)
    return (F.silu(gate) * up).to(dtype)


def expert_ffn(weights: Mapping[str, torch.Tensor], x: torch.Tensor, slots: torch.Tensor,
               method: str = "auto") -> torch.Tensor:
    """Each row of ``x`` through the expert in its local slot: [m, H] -> [m, H] in the model dtype.

    weights: {"w13": [S, 2I, H], "w2": [S, H, I]} of one layer; x: [m, H]; slots: [m] int64 in [0, S).
    method: "grouped", "loop" or "auto" (grouped where ``grouped_supported``).
    """
    w13, w2 = weights["w13"], weights["w2"]
    if method == "auto":
        method = "grouped" if grouped_supported(weights) else "loop"
    if method not in ("grouped", "loop"):
        raise ValueError(f"method must be 'grouped', 'loop' or 'auto', got {method!r}")
    out = torch.empty_like(x)
    if not len(x):
        return out
    order = torch.argsort(slots, stable=True)
    xs = x[order]
    counts = torch.bincount(slots, minlength=w13.shape[0])
    if method == "grouped":
        offs = torch.cumsum(counts, 0).to(torch.int32)
        act = _gated(F.grouped_mm(xs, w13.transpose(-2, -1), offs=offs), x.dtype)
        out[order] = F.grouped_mm(act, w2.transpose(-2, -1), offs=offs)
        return out
    ys = torch.empty_like(xs)
    start = 0
    for slot, n in enumerate(counts.tolist()):
        if n:
            act = _gated(xs[start:start + n] @ w13[slot].T, x.dtype)
            ys[start:start + n] = act @ w2[slot].T
            start += n
    out[order] = ys
    return out


def combine_rank(weights: Mapping[str, torch.Tensor], hidden: torch.Tensor, rows: torch.Tensor,
                 slots: torch.Tensor, pair_weights: torch.Tensor, method: str = "auto") -> torch.Tensor:
    """One rank's share of a layer call, weighted and summed per token: [n, H] fp32.

    hidden: [n, H] the rank's tokens (each once); rows: [m] token row of each pair;
    slots: [m] local slot of each pair; pair_weights: [m] router weight of each pair.
    """
    y = expert_ffn(weights, hidden[rows], slots, method)
    out = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
    out.index_add_(0, rows, y.float() * pair_weights.float()[:, None])
    return out
