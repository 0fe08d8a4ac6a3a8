"""Fingerprints of expert bundles: exact, device-independent sums over each expert's whole byte row.

A row holds every tensor of an expert (weights, scales, biases), so a fingerprint
covers them all: any single changed bit of any tensor changes it.
"""

from __future__ import annotations

import torch

_FP_PRIME = 65521  # position weights (i % 65521) + 1, over the row read as int16
_FP_BLOCK = 1 << 25  # products materialised per step (128 MiB of int32)
_WEIGHTS: dict[str, torch.Tensor] = {}


def _position_weights(stop: int, device: torch.device) -> torch.Tensor:
    """``(i % 65521) + 1`` for i in [0, stop), int32, cached per device (grown on demand)."""
    key = str(device)
    have = _WEIGHTS.get(key)
    if have is None or have.numel() < stop:
        size = max(stop, 0 if have is None else 2 * have.numel())
        have = torch.arange(size, dtype=torch.int64, device=device).remainder_(_FP_PRIME).add_(1).to(torch.int32)
        _WEIGHTS[key] = have
    return have[:stop]


def weighted_bit_sums(bits: torch.Tensor) -> torch.Tensor:
    """Per row of int16 bits ``[n, m]``: sum of bits x ((column % 65521) + 1), int64 ``[n]``.

    Products are exact in int32 (|bits| <= 2**15, weight < 2**16); the int64 sum wraps
    (exact modulo 2**64, order-independent). Works in column blocks of ~_FP_BLOCK products.
    """
    n, m = bits.shape
    total = torch.zeros(n, dtype=torch.int64, device=bits.device)
    if n == 0 or m == 0:
        return total
    weights = _position_weights(m, bits.device)
    block = max(1, _FP_BLOCK // n)
    for start in range(0, m, block):
        stop = min(m, start + block)
        total += (bits[:, start:stop] * weights[start:stop]).sum(dim=1, dtype=torch.int64)
    return total


def _as_int16(rows: torch.Tensor) -> torch.Tensor:
    if rows.dim() != 2 or rows.dtype != torch.uint8 or rows.shape[1] % 2:
        raise ValueError(f"expected byte rows [n, row_bytes] uint8 with even row_bytes, got "
                         f"{rows.dtype} {list(rows.shape)}")
    return rows.detach().view(torch.int16)


def fingerprint_sums(rows: torch.Tensor) -> torch.Tensor:
    """Weighted sums of byte rows ``[n, row_bytes]`` (rows may be strided), int64 ``[n]``.

    Queued on the current stream without waiting, so it overlaps other copies;
    ``fingerprints_from_sums`` finishes it.
    """
    return weighted_bit_sums(_as_int16(rows))


def fingerprints_from_sums(sums: torch.Tensor) -> list[int]:
    """Fingerprints (signed 64-bit Python ints) from ``fingerprint_sums``' result (waits for it)."""
    return [int(v) for v in sums.tolist()]


def fingerprint_rows(rows: torch.Tensor) -> list[int]:
    """Fingerprint of each expert of byte rows ``[n, row_bytes]``."""
    return fingerprints_from_sums(fingerprint_sums(rows))


def fingerprint_row(row: torch.Tensor) -> int:
    """Fingerprint of one expert's byte row ``[row_bytes]``."""
    return fingerprint_rows(row.unsqueeze(0))[0]
