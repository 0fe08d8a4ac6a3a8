"""Expert bundles in torch: typed views of byte rows, and rows built from a bundle's tensors."""

from __future__ import annotations

import torch

from .formats import ExpertFormat, TensorSpec

TORCH_DTYPES: dict[str, torch.dtype] = {
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float32": torch.float32,
    "float8_e4m3fn": torch.float8_e4m3fn,
    "uint8": torch.uint8,
    "int8": torch.int8,
    "int32": torch.int32,
    "int64": torch.int64,
}


def torch_dtype(dtype) -> torch.dtype:
    """The torch dtype of a dtype name, or of a ModelSpec's ``dtype``."""
    return TORCH_DTYPES[dtype if isinstance(dtype, str) else dtype.dtype]


def tensor_view(rows: torch.Tensor, fmt: ExpertFormat, name: str) -> torch.Tensor:
    """Bundle tensor ``name`` of every row: rows ``[..., row_bytes]`` uint8 -> ``[..., *shape]`` (a view)."""
    i = fmt.names.index(name)
    t, off = fmt.tensors[i], fmt.offsets[i]
    lead = rows.shape[:-1]
    part = rows[..., off: off + t.nbytes]
    return part.view(TORCH_DTYPES[t.dtype]).view(*lead, *t.shape)


def tensor_views(rows: torch.Tensor, fmt: ExpertFormat) -> dict[str, torch.Tensor]:
    """Every bundle tensor of ``rows`` (``[..., row_bytes]``), as typed views, in format order."""
    return {name: tensor_view(rows, fmt, name) for name in fmt.names}


def check_tensor(t: TensorSpec, value: torch.Tensor, what: str) -> None:
    """ValueError naming ``what`` when ``value`` is not of ``t``'s shape and dtype."""
    if tuple(value.shape) != t.shape or value.dtype != TORCH_DTYPES[t.dtype]:
        raise ValueError(f"{what}: bundle tensor {t.name!r} must be {t.dtype} {list(t.shape)}, "
                         f"got {value.dtype} {list(value.shape)}")


def to_row(tensors: dict[str, torch.Tensor], fmt: ExpertFormat, device=None) -> torch.Tensor:
    """One expert's byte row (``[row_bytes]`` uint8, zero padding) from its bundle tensors by name."""
    first = next(iter(tensors.values()))
    row = torch.zeros(fmt.row_bytes, dtype=torch.uint8, device=device if device is not None else first.device)
    for t in fmt.tensors:
        if t.name not in tensors:
            raise ValueError(f"bundle tensor {t.name!r} missing; the format has {list(fmt.names)}")
        check_tensor(t, tensors[t.name], "to_row")
        tensor_view(row, fmt, t.name).copy_(tensors[t.name])
    return row


def empty_rows(shape: tuple[int, ...], fmt: ExpertFormat, device) -> torch.Tensor:
    """Zeroed byte rows ``[*shape, row_bytes]`` uint8."""
    return torch.zeros(*shape, fmt.row_bytes, dtype=torch.uint8, device=device)
