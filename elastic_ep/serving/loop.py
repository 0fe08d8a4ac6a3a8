"""A serving loop: synthetic router decisions through a client, every layer, a sample checked against the oracle."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from ..storage import torch_dtype
from ..workload import SkewedRouter
from .oracle import CheckpointOracle, output_tolerance


@dataclass
class LoopReport:
    """What a serving loop did: batches x layers calls, tokens and pairs served, sampled outputs checked."""

    calls: int = 0
    tokens: int = 0  # tokens through one layer call, summed over calls
    pairs: int = 0  # (token, expert) pairs computed
    checked: int = 0  # calls checked against the oracle
    wrong: int = 0  # checked calls off the oracle by more than the dtype's tolerance
    latencies_s: list = field(default_factory=list)

    def percentile_ms(self, q: float) -> float:
        return 1e3 * float(np.percentile(self.latencies_s, q)) if self.latencies_s else float("nan")

    def add(self, other: "LoopReport") -> None:
        for name in ("calls", "tokens", "pairs", "checked", "wrong"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.latencies_s += other.latencies_s


def serve_loop(client, router: SkewedRouter, batches: int, tokens_per_batch: int,
               oracle: Optional[CheckpointOracle] = None, check_every: int = 4, seed: int = 0) -> LoopReport:
    """Serve ``batches`` batches through every MoE layer; check every ``check_every``-th call against ``oracle``."""
    import time

    spec = client.spec
    gen = torch.Generator().manual_seed(seed)
    rep = LoopReport()
    for _ in range(batches):
        router.step()
        ids, weights = router.decide(tokens_per_batch)
        hidden = torch.randn(tokens_per_batch, spec.hidden, generator=gen).to(torch_dtype(spec))
        for layer in range(spec.num_layers):
            t0 = time.perf_counter()
            out = client.moe(layer, hidden, ids[layer], weights[layer])
            rep.latencies_s.append(time.perf_counter() - t0)
            if oracle is not None and rep.calls % check_every == 0:
                ref = oracle(layer, hidden, ids[layer], weights[layer])
                rep.checked += 1
                rep.wrong += int(float((out.float() - ref).abs().max()) > output_tolerance(ref, out.dtype))
            rep.calls += 1
            rep.tokens += tokens_per_batch
            rep.pairs += ids[layer].size
    return rep
