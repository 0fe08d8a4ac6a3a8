"""Expert compute on one rank: the gated expert FFN over its local slots' stacked weights, grouped by slot.

Weights come as a dict of named stacked tensors for one layer
(``{"w13": [slots, 2I, H], "w2": [slots, H, I]}`` in the model dtype, gate rows then up
rows, plus ``w13_bias [slots, 2I]`` / ``w2_bias [slots, H]`` where the model has them;
``weights.layer_weights`` makes them from any bundle). ``y = w2 @ act([gate; up]) + b2``
with ``[gate; up] = w13 @ x + b13``; ``act`` is ``ModelSpec.activation`` (``activate``):
SiLU-gated, or gpt-oss's clamped SwiGLU.

Precision: both GEMMs take model-dtype inputs and accumulate in fp32 (torch's bf16/fp16
kernels on CPU and CUDA do); the gate/up result is rounded to the model dtype, the bias
added and the activation computed in fp32 and rounded once, as fused-MoE kernels do; the
down projection's output is rounded to the model dtype and its bias added in fp32. The
weighted sum over a token's pairs (``combine_rank``) is kept in fp32 and returned as fp32.

Two GEMM paths, the same arithmetic: ``torch.nn.functional.grouped_mm`` (one kernel per
projection over every slot; CPU, and CUDA sm80+ for bfloat16) and a per-slot loop.
"""

from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F

from ..config import ACTIVATIONS

_GROUPED = hasattr(F, "grouped_mm")
SWIGLU_ALPHA = 1.702  # gpt-oss (transformers' GptOssConfig.swiglu_alpha)
SWIGLU_LIMIT = 7.0  # gpt-oss (GptOssConfig.swiglu_limit; 7.0 in every released config)


def grouped_supported(weights: Mapping[str, torch.Tensor]) -> bool:
    """Whether the grouped-GEMM kernel takes these weights (torch has it, device/dtype/alignment fit)."""
    w13, w2 = weights["w13"], weights["w2"]
    if not _GROUPED or w13.shape[-1] % 8 or w2.shape[-1] % 8:
        return False
    if w13.device.type == "cpu":
        return True
    return (w13.device.type == "cuda" and w13.dtype == torch.bfloat16
            and torch.cuda.get_device_capability(w13.device) >= (8, 0))


def activate(gate_up: torch.Tensor, activation: str = "silu") -> torch.Tensor:
    """The expert activation in fp32: [m, 2I] (gate columns, then up) -> [m, I] fp32.

    silu: ``silu(gate) * up``. swigluoai (gpt-oss, as transformers' GptOssExperts):
    ``gate = min(gate, limit)``, ``up = clamp(up, -limit, limit)``, ``(up + 1) * gate * sigmoid(alpha * gate)``.
    """
    gate, up = gate_up.float().chunk(2, dim=-1)
    if activation == "silu":
        return F.silu(gate) * up
    if activation == "swigluoai":
        gate, up = gate.clamp(max=SWIGLU_LIMIT), up.clamp(-SWIGLU_LIMIT, SWIGLU_LIMIT)
        return (up + 1) * (gate * torch.sigmoid(gate * SWIGLU_ALPHA))
    raise ValueError(f"activation must be one of {list(ACTIVATIONS)}, got {activation!r}")


def _plus(y: torch.Tensor, bias) -> torch.Tensor:
    """y (model dtype) in fp32, plus a bias row (broadcast) or per-row biases in fp32 where given."""
    return y.float() if bias is None else y.float() + bias.float()


def _expert_outputs(weights: Mapping[str, torch.Tensor], x: torch.Tensor, slots: torch.Tensor,
                    method: str, activation: str) -> torch.Tensor:
    """Each row of ``x`` through the expert in its local slot: [m, H] fp32 (see ``expert_ffn``)."""
    w13, w2 = weights["w13"], weights["w2"]
    b13, b2 = weights.get("w13_bias"), weights.get("w2_bias")
    if method == "auto":
        method = "grouped" if grouped_supported(weights) else "loop"
    if method not in ("grouped", "loop"):
        raise ValueError(f"method must be 'grouped', 'loop' or 'auto', got {method!r}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {list(ACTIVATIONS)}, got {activation!r}")
    out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    if not len(x):
        return out
    order = torch.argsort(slots, stable=True)
    xs, ss = x[order], slots[order]
    counts = torch.bincount(slots, minlength=w13.shape[0])
    if method == "grouped":
        offs = torch.cumsum(counts, 0).to(torch.int32)
        h = _plus(F.grouped_mm(xs, w13.transpose(-2, -1), offs=offs), None if b13 is None else b13[ss])
        act = activate(h, activation).to(x.dtype)
        y = F.grouped_mm(act, w2.transpose(-2, -1), offs=offs)
        out[order] = _plus(y, None if b2 is None else b2[ss])
        return out
    ys = torch.empty(xs.shape, dtype=torch.float32, device=x.device)
    start = 0
    for slot, n in enumerate(counts.tolist()):
        if n:
            h = _plus(xs[start:start + n] @ w13[slot].T, None if b13 is None else b13[slot])
            act = activate(h, activation).to(x.dtype)
            ys[start:start + n] = _plus(act @ w2[slot].T, None if b2 is None else b2[slot])
            start += n
    out[order] = ys
    return out


def expert_ffn(weights: Mapping[str, torch.Tensor], x: torch.Tensor, slots: torch.Tensor,
               method: str = "auto", activation: str = "silu") -> torch.Tensor:
    """Each row of ``x`` through the expert in its local slot: [m, H] -> [m, H] in the model dtype.

    weights: {"w13": [S, 2I, H], "w2": [S, H, I]} of one layer, optionally "w13_bias": [S, 2I]
    and "w2_bias": [S, H]; x: [m, H]; slots: [m] int64 in [0, S).
    method: "grouped", "loop" or "auto" (grouped where ``grouped_supported``).
    activation: "silu" or "swigluoai" (``activate``; ``ModelSpec.activation``).
    """
    return _expert_outputs(weights, x, slots, method, activation).to(x.dtype)


def combine_rank(weights: Mapping[str, torch.Tensor], hidden: torch.Tensor, rows: torch.Tensor,
                 slots: torch.Tensor, pair_weights: torch.Tensor, method: str = "auto",
                 activation: str = "silu") -> torch.Tensor:
    """One rank's share of a layer call, weighted and summed per token: [n, H] fp32.

    hidden: [n, H] the rank's tokens (each once); rows: [m] token row of each pair;
    slots: [m] local slot of each pair; pair_weights: [m] router weight of each pair.
    """
    y = _expert_outputs(weights, hidden[rows], slots, method, activation)
    out = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
    out.index_add_(0, rows, y * pair_weights.float()[:, None])
    return out
