"""Load statistics: a sliding window of per-expert token counts, and a synthetic router (skewed, drifting decisions)."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Optional

import numpy as np

from .errors import LoadStatsError
from .layout import ExpertLayout


def check_counts(counts: np.ndarray, shape: tuple[int, ...], what: str) -> np.ndarray:
    """Validate token counts (finite, non-negative, right shape) and return them as float64."""
    arr = np.asarray(counts)
    if arr.shape != tuple(shape):
        raise LoadStatsError(f"{what} must have shape {list(shape)}, got {list(arr.shape)}")
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise LoadStatsError(f"{what} must be numeric, got dtype {arr.dtype}")
    arr = arr.astype(np.float64)
    bad = ~np.isfinite(arr)
    if bad.any():
        idx = tuple(int(x) for x in np.argwhere(bad)[0])
        raise LoadStatsError(f"{what}{list(idx)} = {arr[idx]} is not finite")
    if (arr < 0).any():
        idx = tuple(int(x) for x in np.argwhere(arr < 0)[0])
        raise LoadStatsError(f"{what}{list(idx)} = {arr[idx]} is negative")
    return arr


def slot_counts_to_logical(layout: ExpertLayout, slot_counts: np.ndarray) -> np.ndarray:
    """Fold per-slot token counts [L, num_slots] into per-expert counts [L, num_experts]."""
    out = np.zeros((layout.num_layers, layout.num_experts))
    rows = np.repeat(np.arange(layout.num_layers), layout.num_slots)
    np.add.at(out, (rows, layout.phy2log.ravel()), slot_counts.ravel())
    return out


class LoadWindow:
    """The last ``size`` load reports, summed on demand: [num_layers, num_experts]."""

    def __init__(self, num_layers: int, num_experts: int, size: int):
        self.shape = (num_layers, num_experts)
        self._window: deque[np.ndarray] = deque(maxlen=size)

    def add(self, load: np.ndarray) -> None:
        self._window.append(check_counts(load, self.shape, "load"))

    def total(self) -> Optional[np.ndarray]:
        if not self._window:
            return None
        return np.sum(self._window, axis=0)

    def __len__(self) -> int:
        return len(self._window)


@dataclass
class SkewedRouter:
    """A synthetic router: Zipf-like expert popularity per layer that drifts between batches.

    Each layer ranks its experts by a random permutation; expert at popularity rank k
    gets weight ``1 / (k + 1) ** zipf_s``. Every batch multiplies the weights by
    lognormal noise (``drift``) and, with probability ``swap_prob``, swaps two experts'
    popularity, so hot experts change over time as in real traffic.
    """

    num_layers: int
    num_experts: int
    zipf_s: float = 1.0
    drift: float = 0.15
    swap_prob: float = 0.3
    top_k: int = 6
    seed: int = 0

    def __post_init__(self) -> None:
        self._rng = np.random.default_rng(self.seed)
        base = 1.0 / np.arange(1, self.num_experts + 1) ** self.zipf_s
        self.weights = np.stack([self._rng.permutation(base) for _ in range(self.num_layers)])

    def step(self) -> None:
        """Drift the popularity once."""
        self.weights *= np.exp(self._rng.normal(0.0, self.drift, self.weights.shape))
        for layer in range(self.num_layers):
            if self._rng.random() < self.swap_prob:
                a, b = self._rng.choice(self.num_experts, size=2, replace=False)
                self.weights[layer, [a, b]] = self.weights[layer, [b, a]]

    def decide(self, num_tokens: int) -> tuple[np.ndarray, np.ndarray]:
        """Router decisions for one batch, as a model's router gives them.

        Returns (topk_ids [num_layers, num_tokens, k] int64, topk_weights [num_layers, num_tokens, k]
        float32) with ``k = min(top_k, num_experts)``: each token picks k distinct experts, drawn
        by popularity (Gumbel top-k), weighted by a softmax over its picks' scores.
        """
        k = min(self.top_k, self.num_experts)
        scores = np.log(self.weights)[:, None, :] + self._rng.gumbel(size=(self.num_layers, num_tokens, self.num_experts))
        ids = np.argpartition(-scores, k - 1, axis=2)[:, :, :k]
        picked = np.take_along_axis(scores, ids, axis=2)
        weights = np.exp(picked - picked.max(axis=2, keepdims=True))
        weights /= weights.sum(axis=2, keepdims=True)
        return ids.astype(np.int64), weights.astype(np.float32)
