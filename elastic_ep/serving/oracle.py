"""The correctness oracle: a reference MoE layer in fp32 from every expert's weights, one expert at a time."""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from ..checkpoint import CheckpointReader
from ..config import ModelSpec
from .compute import activate
from .weights import held_interleaved, layer_weights


def reference_moe(w13: torch.Tensor, w2: torch.Tensor, hidden: torch.Tensor, topk_ids, topk_weights,
                  w13_bias: Optional[torch.Tensor] = None, w2_bias: Optional[torch.Tensor] = None,
                  activation: str = "silu") -> torch.Tensor:
    """sum_k w[t, k] * expert_{ids[t, k]}(hidden[t]) in fp32, from unrounded fp32 math: [T, H] fp32.

    w13: [E, 2I, H] and w2: [E, H, I] of every logical expert of one layer (any dtype), gate
    rows then up rows; biases w13_bias: [E, 2I], w2_bias: [E, H] where the model has them.
    """
    ids = torch.as_tensor(np.asarray(topk_ids), dtype=torch.int64)
    weights = torch.as_tensor(np.asarray(topk_weights), dtype=torch.float32)
    x = hidden.float()
    out = torch.zeros_like(x)
    for expert in torch.unique(ids).tolist():
        tok, k = torch.nonzero(ids == expert, as_tuple=True)
        h = x[tok] @ w13[expert].float().T + (0.0 if w13_bias is None else w13_bias[expert].float())
        y = activate(h, activation) @ w2[expert].float().T + (0.0 if w2_bias is None else w2_bias[expert].float())
        out.index_add_(0, tok, y * weights[tok, k, None])
    return out


class CheckpointOracle:
    """Reference MoE outputs for any layer of a checkpoint (experts read once per layer, then cached)."""

    def __init__(self, checkpoint: str, spec: ModelSpec, preset: str):
        self.spec = spec
        self._reader = CheckpointReader(checkpoint, spec, preset)
        self._layers: dict[int, dict[str, torch.Tensor]] = {}

    def experts(self, layer: int) -> dict[str, torch.Tensor]:
        """{"w13": [E, 2I, H], "w2": [E, H, I], biases where any} of every logical expert of ``layer``."""
        if layer not in self._layers:
            rows = self._reader.read_layer_slots(layer, list(range(self.spec.num_experts)))
            self._layers[layer] = layer_weights(rows, self._reader.format, self.spec.dtype,
                                                held_interleaved(self.spec.quant, self._reader.preset))
        return self._layers[layer]

    def __call__(self, layer: int, hidden: torch.Tensor, topk_ids, topk_weights) -> torch.Tensor:
        w = self.experts(layer)
        return reference_moe(w["w13"], w["w2"], hidden, topk_ids, topk_weights, w.get("w13_bias"),
                             w.get("w2_bias"), self.spec.activation)


def output_tolerance(reference: torch.Tensor, dtype: torch.dtype, factor: float = 2.0) -> float:
    """Largest acceptable |served - reference| for a batch: ``factor * eps(dtype) * max|reference|``.

    eps is torch's spacing at 1.0 (2^-7 for bfloat16, 2^-10 for float16, 2^-23 for float32).
    The served path rounds to the model dtype three times (the gate/up GEMM output, the
    activation, the final output), each within eps/2 relative; the rounded activation's
    error is carried through the down projection, whose outputs are at most
    max|reference|-sized. Three roundings give 1.5 eps; ``factor=2`` adds headroom for the
    fp32 accumulation order (measured on the tiny transformers models: 0.7-0.8 eps). A
    comparison with another bf16 implementation (the model's own bf16 block, which also
    rounds each expert's output and sums in bf16) needs the sum of both: ``factor=4``.
    """
    return factor * torch.finfo(dtype).eps * float(reference.abs().max().clamp_min(1e-30))
