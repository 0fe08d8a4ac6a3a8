"""Hidden states as raw bits for Ray calls: numpy has no bfloat16, so tokens travel as int16/int32 views."""

from __future__ import annotations

import warnings

import numpy as np
import torch

from ..checkpoint.bundle import TORCH_DTYPES

_BITS = {2: torch.int16, 4: torch.int32}


def to_bits(t: torch.Tensor) -> np.ndarray:
    """A CPU tensor's raw bits as a numpy array of the same shape (int16 for 2-byte floats, int32 for fp32)."""
    return t.contiguous().view(_BITS[t.element_size()]).numpy()


def from_bits(a: np.ndarray, dtype: str) -> torch.Tensor:
    """Inverse of ``to_bits``, zero-copy (memory from the object store stays read-only: copy before writing)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # non-writable buffers from the object store are fine to read
        return torch.from_numpy(a).view(TORCH_DTYPES[dtype])
