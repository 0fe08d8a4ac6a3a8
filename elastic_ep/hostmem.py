"""Page-locking host buffers in place (cudaHostRegister) so host-to-GPU copies run at full speed.

Host backups live in the Ray object store and are read zero-copy as numpy arrays.
Copies from such pageable memory go through a driver bounce buffer; once the pages
are registered with CUDA they are copied by DMA directly, asynchronously. Objects
sit next to each other in the store's shared memory, so two arrays can share a
page: registration is done on the union of their page ranges (``page_ranges``),
since CUDA refuses to register a page twice.
"""

from __future__ import annotations

import mmap
from typing import Iterable, Sequence

PAGE = mmap.PAGESIZE

_REGISTER_PORTABLE = 1
_REGISTER_READ_ONLY = 8


def page_ranges(spans: Iterable[tuple[int, int]], page: int = PAGE) -> list[tuple[int, int]]:
    """Merge byte spans ``(address, nbytes)`` into disjoint page-aligned ``(start, nbytes)`` ranges.

    Spans that touch or share a page end up in one range; empty spans are dropped.
    The result is sorted by address.
    """
    if page <= 0 or page & (page - 1):
        raise ValueError(f"page size must be a power of two, got {page}")
    aligned = sorted(
        (addr - addr % page, -(-(addr + n) // page) * page) for addr, n in spans if n > 0
    )
    merged: list[list[int]] = []
    for start, end in aligned:
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(s, e - s) for s, e in merged]


class PinnedRegion:
    """The pages under a set of host arrays, registered with CUDA until ``release()``.

    Keep the arrays alive for as long as the region is: registering does not own
    memory. Arrays are anything with ``__array_interface__`` or ``data_ptr()``.
    """

    def __init__(self, arrays: Sequence):
        import torch

        self._cudart = torch.cuda.cudart()
        self.ranges: list[tuple[int, int]] = []
        self.nbytes = 0
        try:
            for start, n in page_ranges(_span(a) for a in arrays):
                self._register(start, n)
                self.ranges.append((start, n))
                self.nbytes += n
        except BaseException:
            self.release()
            raise

    @property
    def num_ranges(self) -> int:
        return len(self.ranges)

    def _register(self, start: int, n: int) -> None:
        err = int(self._cudart.cudaHostRegister(start, n, _REGISTER_PORTABLE))
        if err != 0:  # a read-only mapping needs the read-only flag (where the device supports it)
            err = int(self._cudart.cudaHostRegister(start, n, _REGISTER_PORTABLE | _REGISTER_READ_ONLY))
        if err != 0:
            raise OSError(f"cudaHostRegister of {n} bytes at {start:#x} failed with CUDA error {err}")

    def release(self) -> None:
        """Unregister every range (idempotent)."""
        while self.ranges:
            start, n = self.ranges.pop()
            self._cudart.cudaHostUnregister(start)
            self.nbytes -= n


def _span(a) -> tuple[int, int]:
    """(address, nbytes) of a numpy array or a torch tensor."""
    if hasattr(a, "data_ptr"):
        return int(a.data_ptr()), int(a.numel() * a.element_size())
    return int(a.__array_interface__["data"][0]), int(a.nbytes)
