"""One layer's stacked expert weights for compute, from the byte rows workers hold: views, or FP8 dequantized.

Bundles in the model dtype are served from typed views of the rows (no copy). FP8
block-scaled bundles (DeepSeek-V3/R1) are dequantized on the rank, per call:
``w = float(w_fp8) * scale_inv`` expanded over each ``block`` of rows and columns, then
rounded to the model dtype (correctness first; scaled FP8 GEMMs are left to engines).
MXFP4 and INT4 bundles are held, moved and verified, but not served.
"""

from __future__ import annotations

import torch

from ..checkpoint.bundle import TORCH_DTYPES, tensor_view
from ..checkpoint.formats import ExpertFormat
from ..errors import ServingInputError


def _dequant_fp8(w: torch.Tensor, scale_inv: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """w: [S, R, C] float8; scale_inv: [S, R/b0, C/b1] float32 -> [S, R, C] of ``dtype``."""
    b0, b1 = w.shape[-2] // scale_inv.shape[-2], w.shape[-1] // scale_inv.shape[-1]
    scale = scale_inv.repeat_interleave(b0, dim=-2).repeat_interleave(b1, dim=-1)
    return (w.float() * scale).to(dtype)


def layer_weights(rows: torch.Tensor, fmt: ExpertFormat, dtype: str) -> dict[str, torch.Tensor]:
    """``{"w13": [S, 2I, H], "w2": [S, H, I]}`` in ``dtype`` from one layer's rows ``[S, row_bytes]`` uint8."""
    names = set(fmt.names)
    if {"w13", "w2"} <= names and "w13_scale_inv" not in names:
        return {"w13": tensor_view(rows, fmt, "w13"), "w2": tensor_view(rows, fmt, "w2")}
    if {"w13_scale_inv", "w2_scale_inv"} <= names:
        out = TORCH_DTYPES[dtype]
        return {p: _dequant_fp8(tensor_view(rows, fmt, p), tensor_view(rows, fmt, f"{p}_scale_inv"), out)
                for p in ("w13", "w2")}
    raise ServingInputError(f"serving bundles of tensors {sorted(names)} is not supported: only unquantized "
                            "and FP8 block-scaled experts are served (MXFP4/INT4 are held, moved and verified)")
