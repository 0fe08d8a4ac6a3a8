"""Executes one rank's part of a TransferPlan into staging buffers; live weights change only at commit.

Two phases, as in vLLM's EPLB: moves land in staging (``StagedUpdate``); ``commit``
copies staging into the live stacked weights. A failure before commit leaves the
live weights exactly as they were.

Point-to-point traffic is packed: all experts one rank sends to one peer in one
stage travel as a few large flat messages (at most ``max_message_bytes`` each),
which both sides cut identically from the same ordered plan.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch

from .plan import DST, DST_SLOT, EXPERT, LAYER, SRC, SRC_SLOT, STAGE, RankPlan
from .storage import fingerprint_stacked

# fetch(keys) -> {(layer, expert): (w13, w2)} from a backup or the checkpoint
FetchFn = Callable[[list[tuple[int, int]]], dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]]]


@dataclass
class ExpertWeights:
    """One rank's live expert weights, stacked as a fused-MoE kernel wants them.

    w13: [num_layers, slots_per_rank, 2 * intermediate, hidden]
    w2: [num_layers, slots_per_rank, hidden, intermediate]
    experts: [num_layers, slots_per_rank] logical expert in each slot (-1: empty).
    """

    w13: torch.Tensor
    w2: torch.Tensor
    experts: np.ndarray

    @property
    def expert_numel(self) -> int:
        return int(self.w13[0, 0].numel() + self.w2[0, 0].numel())

    def fingerprints(self) -> np.ndarray:
        """Fingerprint of every slot: [num_layers, slots_per_rank] int64."""
        num_layers, spr = self.experts.shape
        out = np.empty((num_layers, spr), dtype=np.int64)
        for layer in range(num_layers):
            out[layer] = fingerprint_stacked(self.w13[layer], self.w2[layer])
        return out


@dataclass
class StagedUpdate:
    """New contents for some slots, not yet live. Keyed by (layer, slot)."""

    epoch: int
    slots: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor, int]] = field(default_factory=dict)
    timings_s: dict[str, float] = field(default_factory=dict)
    bytes_sent: int = 0
    bytes_received: int = 0
    bytes_fetched: int = 0

    def fingerprints(self) -> list[tuple[int, int, int, int]]:
        """(layer, slot, expert, fingerprint) for every staged slot."""
        out = []
        for (layer, slot), (w13, w2, expert) in sorted(self.slots.items()):
            fp = fingerprint_stacked(w13.unsqueeze(0), w2.unsqueeze(0))[0]
            out.append((layer, slot, expert, int(fp)))
        return out


def _split(n: int, per_message: int) -> list[tuple[int, int]]:
    return [(i, min(n, i + per_message)) for i in range(0, n, per_message)]


def execute_rank_plan(
    part: RankPlan,
    weights: ExpertWeights,
    epoch: int,
    transport,
    group_rank: dict[int, int],
    fetch: FetchFn,
    timeout_s: float,
    max_message_bytes: int = 256 << 20,
    on_phase: Optional[Callable[[str], None]] = None,
) -> StagedUpdate:
    """Run this rank's sends, receives, copies and fetches into a StagedUpdate.

    transport: a Transport (add_send/add_recv/execute). group_rank maps rank ids to
    ranks of the transport's group. ``on_phase`` is called with each phase name as it
    starts (fault injection and progress reporting hook).
    """
    staged = StagedUpdate(epoch=epoch)
    w13, w2 = weights.w13, weights.w2
    shape13, shape2 = tuple(w13.shape[2:]), tuple(w2.shape[2:])
    n13 = int(np.prod(shape13))
    numel = weights.expert_numel
    elem = w13.element_size()
    per_message = max(1, max_message_bytes // (numel * elem))

    def phase(name: str) -> None:
        if on_phase is not None:
            on_phase(name)

    # Phase 1: point-to-point, packed per (stage, peer), ordered deadlock-free.
    t0 = time.perf_counter()
    phase("transfer")
    recv_buffers: list[tuple[torch.Tensor, np.ndarray]] = []
    for kind, stage, peer, rows in _messages(part, per_message):
        if kind == "send":
            flat = torch.cat(
                [torch.cat([w13[l, s].reshape(-1), w2[l, s].reshape(-1)]) for l, s in rows[:, [LAYER, SRC_SLOT]]]
            )
            transport.add_send(flat, group_rank[peer])
            staged.bytes_sent += flat.numel() * elem
        else:
            flat = torch.empty(len(rows) * numel, dtype=w13.dtype, device=w13.device)
            transport.add_recv(flat, group_rank[peer])
            recv_buffers.append((flat, rows))
            staged.bytes_received += flat.numel() * elem
    transport.execute(timeout_s)
    for flat, rows in recv_buffers:
        for i, (layer, expert, slot) in enumerate(rows[:, [LAYER, EXPERT, DST_SLOT]]):
            chunk = flat[i * numel : (i + 1) * numel]
            staged.slots[(int(layer), int(slot))] = (
                chunk[:n13].view(shape13),
                chunk[n13:].view(shape2),
                int(expert),
            )
    staged.timings_s["transfer"] = time.perf_counter() - t0

    # Phase 2: storage fetches for experts no live rank holds.
    t0 = time.perf_counter()
    if len(part.fetches):
        phase("fetch")
        keys = sorted({(int(l), int(e)) for l, e, _, _ in part.fetches})
        got = fetch(keys)
        for layer, expert, _, slot in part.fetches:
            a, b = got[(int(layer), int(expert))]
            staged.slots[(int(layer), int(slot))] = (
                a.to(device=w13.device, dtype=w13.dtype),
                b.to(device=w2.device, dtype=w2.dtype),
                int(expert),
            )
            staged.bytes_fetched += numel * elem
    staged.timings_s["fetch"] = time.perf_counter() - t0

    # Phase 3: copies within the rank (from live weights, or from a slot staged above).
    t0 = time.perf_counter()
    for layer, _, src_slot, dst_slot, after in part.copies:
        layer, src_slot, dst_slot = int(layer), int(src_slot), int(dst_slot)
        if after:
            a, b, expert = staged.slots[(layer, src_slot)]
        else:
            a, b, expert = w13[layer, src_slot], w2[layer, src_slot], int(weights.experts[layer, src_slot])
        staged.slots[(layer, dst_slot)] = (a.clone(), b.clone(), expert)
    staged.timings_s["copy"] = time.perf_counter() - t0
    return staged


def _messages(part: RankPlan, per_message: int):
    """(kind, stage, peer, rows) messages in the plan's deadlock-free order.

    Within a stage the lower rank of a pair sends first; each (stage, peer, direction)
    run of transfers is cut into messages of at most ``per_message`` experts.
    """
    out = []
    for kind, table, peer_col in (("send", part.sends, DST), ("recv", part.recvs, SRC)):
        if not len(table):
            continue
        keys = np.stack([table[:, STAGE], table[:, peer_col]], axis=1)
        uniq = np.unique(keys, axis=0)
        for stage, peer in uniq:
            rows = table[(table[:, STAGE] == stage) & (table[:, peer_col] == peer)]
            first = (kind == "send") == (part.rank < peer)
            for a, b in _split(len(rows), per_message):
                out.append((int(stage), 0 if first else 1, a, kind, int(peer), rows[a:b]))
    out.sort(key=lambda m: m[:3])
    return [(kind, stage, peer, rows) for stage, _, _, kind, peer, rows in out]


def commit(weights: ExpertWeights, staged: StagedUpdate) -> None:
    """Copy staged slots into the live weights (the only place live weights change)."""
    for (layer, slot), (a, b, expert) in staged.slots.items():
        weights.w13[layer, slot].copy_(a)
        weights.w2[layer, slot].copy_(b)
        weights.experts[layer, slot] = expert
    if weights.w13.is_cuda:
        torch.cuda.synchronize(weights.w13.device)
