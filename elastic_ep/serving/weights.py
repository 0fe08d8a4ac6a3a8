"""One layer's stacked expert weights for compute, from the byte rows workers hold: views, or dequantized per call.

Output: ``{"w13": [S, 2I, H], "w2": [S, H, I]}`` in the model dtype, gate rows then up rows,
plus ``"w13_bias": [S, 2I]`` and ``"w2_bias": [S, H]`` where the bundle has biases (gpt-oss).

- unquantized: typed views of the rows (no copy).
- FP8 block-scaled (DeepSeek-V3/R1): ``float(w_fp8) * scale_inv`` expanded over each block.
- MXFP4 (gpt-oss): each byte holds two E2M1 codes (low nibble first) of a 32-value block
  whose E8M0 scale byte ``s`` means ``2^(s - 127)``; value = code's E2M1 value * scale,
  computed in fp32 and rounded once, as transformers' ``convert_moe_packed_tensors`` does.
- INT4 pack-quantized (compressed-tensors): 8 signed int4 a little-endian int32 (value i at
  bits 4i..4i+3, stored as q + 8), symmetric; w = q * scale of its ``group_size`` columns.
  ``*_shape`` equals the format's shape (columns divide by 8, no padding) and is not read.

Quantized bundles keep the checkpoint's row order; a fused interleaved checkpoint (gpt-oss:
gate at even rows, up at odd) stays so (``Layout.source``), and ``interleaved=True`` reorders
its w13 rows and bias to gate then up before dequantizing. Dequantization is per call and
only for the slots the call uses (``weights_for_slots``; correctness first, scaled
low-precision GEMMs are left to engines).
"""

from __future__ import annotations

import torch

from ..checkpoint.bundle import TORCH_DTYPES, tensor_view
from ..checkpoint.formats import ExpertFormat
from ..errors import ServingInputError

# E2M1 code -> value (OCP microscaling FP4), as transformers' FP4_VALUES
_E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


_QUANT_PARTS = ("_scale_inv", "_blocks", "_packed")  # tensors of these names make a bundle dequantized per call


def quantized(fmt: ExpertFormat) -> bool:
    """Whether serving dequantizes this bundle (it has an FP8, MXFP4 or INT4 part) instead of viewing its rows."""
    return any(name.endswith(_QUANT_PARTS) for name in fmt.names)


def held_interleaved(quant: str, layout) -> bool:
    """Whether held w13 rows alternate gate/up: quantized bundles of a fused interleaved layout (the
    layout as the reader chose it, ``CheckpointReader.preset``); unquantized ones are de-interleaved on read."""
    return quant != "none" and bool(layout.interleaved) and not layout.per_expert


def _gate_then_up(x: torch.Tensor) -> torch.Tensor:
    """[S, 2I, ...] with gate at even rows, up at odd -> gate rows then up rows (a copy)."""
    return torch.cat([x[:, 0::2], x[:, 1::2]], dim=1)


def dequant_fp8(w: torch.Tensor, scale_inv: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """w: [S, R, C] float8; scale_inv: [S, R/b0, C/b1] float32 -> [S, R, C] of ``dtype``."""
    b0, b1 = w.shape[-2] // scale_inv.shape[-2], w.shape[-1] // scale_inv.shape[-1]
    scale = scale_inv.repeat_interleave(b0, dim=-2).repeat_interleave(b1, dim=-1)
    return (w.float() * scale).to(dtype)


def dequant_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """blocks: [S, R, C/32, 16] uint8; scales: [S, R, C/32] uint8 E8M0 -> [S, R, C] of ``dtype`` (one slot at a time)."""
    lut = torch.tensor(_E2M1, dtype=torch.float32, device=blocks.device)
    out = torch.empty(*blocks.shape[:-2], blocks.shape[-2] * blocks.shape[-1] * 2, dtype=dtype, device=blocks.device)
    for s in range(blocks.shape[0]):
        b = blocks[s].to(torch.int32)
        vals = torch.stack((lut[b & 0x0F], lut[b >> 4]), dim=-1).flatten(-2)  # [R, C/32, 32] fp32
        # 2^(s - 127) exactly as torch.ldexp makes it (s = 255: inf, as transformers gets)
        vals = torch.ldexp(vals, scales[s].to(torch.int32).unsqueeze(-1) - 127)
        out[s] = vals.flatten(-2).to(dtype)
    return out


def dequant_int4(packed: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """packed: [S, R, C/8] int32; scale: [S, R, C/g] -> [S, R, C] of ``dtype`` (w = q * scale, q in [-8, 7])."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=packed.device)
    out = torch.empty(*packed.shape[:-1], packed.shape[-1] * 8, dtype=dtype, device=packed.device)
    group = out.shape[-1] // scale.shape[-1]
    for s in range(packed.shape[0]):
        q = ((packed[s].unsqueeze(-1) >> shifts) & 0xF) - 8  # [R, C/8, 8]
        w = q.flatten(-2).float().view(q.shape[0], -1, group) * scale[s].float().unsqueeze(-1)
        out[s] = w.flatten(-2).to(dtype)
    return out


def layer_weights(rows: torch.Tensor, fmt: ExpertFormat, dtype: str, interleaved: bool = False
                  ) -> dict[str, torch.Tensor]:
    """Stacked weights (module docstring) in ``dtype`` from one layer's rows ``[S, row_bytes]`` uint8.

    interleaved: the held w13 rows alternate gate/up (``held_interleaved``).
    """
    names = set(fmt.names)
    out_dtype = TORCH_DTYPES[dtype]
    views = {name: tensor_view(rows, fmt, name) for name in fmt.names}
    if interleaved:
        if "w13_scale_inv" in names:
            raise ServingInputError("FP8 block-scaled experts with interleaved gate/up rows are not served")
        views.update({t.name: _gate_then_up(views[t.name]) for t in fmt.tensors
                      if t.proj == "w13" and t.part != "shape"})
    out = {f"{p}_bias": views[f"{p}_bias"] for p in ("w13", "w2") if f"{p}_bias" in names}
    for p in ("w13", "w2"):
        if p in names and f"{p}_scale_inv" not in names:
            out[p] = views[p]
        elif f"{p}_scale_inv" in names:
            out[p] = dequant_fp8(views[p], views[f"{p}_scale_inv"], out_dtype)
        elif f"{p}_blocks" in names:
            out[p] = dequant_mxfp4(views[f"{p}_blocks"], views[f"{p}_scales"], out_dtype)
        elif f"{p}_packed" in names:
            out[p] = dequant_int4(views[f"{p}_packed"], views[f"{p}_scale"], out_dtype)
        else:
            raise ServingInputError(f"serving bundles of tensors {sorted(names)} is not supported: no way to "
                                    f"make {p} from them")
    return out


def weights_for_slots(rows: torch.Tensor, fmt: ExpertFormat, dtype: str, slots: torch.Tensor,
                      interleaved: bool = False) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The weights one call needs, and each pair's index into them.

    rows: [S, row_bytes] uint8 of one layer; slots: [m] int64 local slot of each pair.
    Unquantized: every slot's views (free) and ``slots`` as given. Quantized: only the U slots
    used are dequantized (a decode call touches a few; a whole layer of DeepSeek-V3 experts
    in fp32 would be tens of GB) -> ({name: [U, ...]}, [m] int64 in [0, U)).
    """
    if not quantized(fmt):
        return layer_weights(rows, fmt, dtype, interleaved), slots
    used, index = torch.unique(slots, return_inverse=True)
    return layer_weights(rows[used], fmt, dtype, interleaved), index
