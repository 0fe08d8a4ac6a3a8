"""Expert formats: the ordered, named tensors of one expert (a bundle) and their place in one flat byte row; pure.

An expert is a bundle of tensors, each with a name, dtype and shape, e.g. FP8
block-scaled: ``w13 [2I, H] float8_e4m3fn``, ``w13_scale_inv [2I/b0, H/b1] float32``,
``w2 [H, I]``, ``w2_scale_inv [H/b0, I/b1]``. Workers, messages, backups and staging
hold a bundle as one byte row (``row_bytes``), each tensor at a 16-byte aligned
``offset`` with zero padding, so moving, packing and fingerprinting an expert never
care about dtypes and can never leave a scale behind its weights.

Formats (``ModelSpec.quant``):
  none   w13 [2I, H], w2 [H, I] in ``spec.dtype`` (gate rows, then up rows)
  fp8    + ``*_scale_inv`` float32 per (b0 x b1) block (DeepSeek-V3, Kimi-K2 as released)
  mxfp4  ``*_blocks`` uint8 [rows, cols/32, 16] + ``*_scales`` uint8 E8M0 [rows, cols/32] (gpt-oss)
  int4   compressed-tensors pack-quantized: ``*_packed`` int32 [rows, cols/8], ``*_scale`` [rows, cols/g],
         ``*_shape`` int64 (w13: [2, 2], gate's and up's; w2: [2])
Biases (``spec.bias``): ``w13_bias [2I]``, ``w2_bias [H]`` in ``spec.dtype``.
Quantized tensors are held as the checkpoint stores one expert (rows not reordered).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..errors import ConfigError

# dtype name -> (bytes per element, safetensors code)
DTYPES: dict[str, tuple[int, str]] = {
    "bfloat16": (2, "BF16"),
    "float16": (2, "F16"),
    "float32": (4, "F32"),
    "float8_e4m3fn": (1, "F8_E4M3"),
    "uint8": (1, "U8"),
    "int8": (1, "I8"),
    "int32": (4, "I32"),
    "int64": (8, "I64"),
}
FLOAT_DTYPES = ("bfloat16", "float16", "float32")
QUANT_METHODS = ("none", "fp8", "mxfp4", "int4")
ALIGN = 16  # bytes: every tensor of a row starts here, and rows are a multiple of it
MXFP4_BLOCK = 32  # values per E8M0 scale (OCP microscaling)


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of an expert bundle: ``proj`` is ``w13`` (gate+up) or ``w2`` (down); ``part`` its role."""

    name: str  # e.g. "w13_scale_inv"
    dtype: str  # key of DTYPES
    shape: tuple[int, ...]  # of one expert
    proj: str  # "w13" | "w2"
    part: str  # "weight" | "scale_inv" | "blocks" | "scales" | "packed" | "scale" | "shape" | "bias"

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPES[self.dtype][0]


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


@dataclass(frozen=True)
class ExpertFormat:
    """An expert bundle's tensors in order, with each one's byte offset in a row of ``row_bytes``."""

    tensors: tuple[TensorSpec, ...]

    @property
    def offsets(self) -> tuple[int, ...]:
        out, at = [], 0
        for t in self.tensors:
            out.append(at)
            at += _aligned(t.nbytes)
        return tuple(out)

    @property
    def row_bytes(self) -> int:
        """Bytes one expert occupies in a row, padding included (what moves)."""
        return sum(_aligned(t.nbytes) for t in self.tensors)

    @property
    def data_bytes(self) -> int:
        """Bytes of the tensors themselves (what a checkpoint stores)."""
        return sum(t.nbytes for t in self.tensors)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.tensors)

    def tensor(self, name: str) -> TensorSpec:
        for t in self.tensors:
            if t.name == name:
                return t
        raise KeyError(f"expert format has no tensor {name!r}; it has {list(self.names)}")


def _div(value: int, by: int, what: str) -> int:
    if by <= 0 or value % by:
        raise ConfigError(f"{what}: block size {by} does not divide {value}")
    return value // by


def expert_format(
    hidden: int,
    intermediate: int,
    dtype: str = "bfloat16",
    quant: str = "none",
    block: tuple[int, int] = (128, 128),
    group_size: int = 32,
    bias: bool = False,
) -> ExpertFormat:
    """The bundle of one expert of the given geometry (see the module docstring)."""
    h, i = hidden, intermediate
    ts: list[TensorSpec] = []
    if quant == "none":
        ts += [TensorSpec("w13", dtype, (2 * i, h), "w13", "weight"), TensorSpec("w2", dtype, (h, i), "w2", "weight")]
    elif quant == "fp8":
        b0, b1 = block
        for proj, rows, cols, half in (("w13", 2 * i, h, i), ("w2", h, i, h)):
            ts.append(TensorSpec(proj, "float8_e4m3fn", (rows, cols), proj, "weight"))
            srows = 2 * _div(half, b0, f"{proj} rows") if proj == "w13" else _div(rows, b0, f"{proj} rows")
            ts.append(TensorSpec(f"{proj}_scale_inv", "float32", (srows, _div(cols, b1, f"{proj} columns")),
                                 proj, "scale_inv"))
    elif quant == "mxfp4":
        for proj, rows, cols in (("w13", 2 * i, h), ("w2", h, i)):
            n = _div(cols, MXFP4_BLOCK, f"{proj} columns (MXFP4)")
            ts.append(TensorSpec(f"{proj}_blocks", "uint8", (rows, n, MXFP4_BLOCK // 2), proj, "blocks"))
            ts.append(TensorSpec(f"{proj}_scales", "uint8", (rows, n), proj, "scales"))
    elif quant == "int4":
        for proj, rows, cols in (("w13", 2 * i, h), ("w2", h, i)):
            ts.append(TensorSpec(f"{proj}_packed", "int32", (rows, _div(cols, 8, f"{proj} columns (int4 packs 8)")),
                                 proj, "packed"))
            ts.append(TensorSpec(f"{proj}_scale", dtype, (rows, _div(cols, group_size, f"{proj} columns (group)")),
                                 proj, "scale"))
            ts.append(TensorSpec(f"{proj}_shape", "int64", (2, 2) if proj == "w13" else (2,), proj, "shape"))
    else:
        raise ConfigError(f"unknown quantization {quant!r}; expected one of {list(QUANT_METHODS)}")
    if bias:
        ts += [TensorSpec("w13_bias", dtype, (2 * i,), "w13", "bias"), TensorSpec("w2_bias", dtype, (h,), "w2", "bias")]
    order = {"w13": 0, "w2": 1}
    return ExpertFormat(tuple(sorted(ts, key=lambda t: order[t.proj])))


def format_of(spec) -> ExpertFormat:
    """The ExpertFormat of a ModelSpec."""
    return expert_format(spec.hidden, spec.intermediate, spec.dtype, spec.quant, tuple(spec.block),
                         spec.group_size, spec.bias)


def dtype_code(dtype: str) -> Optional[str]:
    """safetensors dtype code of a dtype name."""
    return DTYPES[dtype][1] if dtype in DTYPES else None
