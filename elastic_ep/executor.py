"""Executes one rank's part of a TransferPlan into staging buffers; live weights change only at commit.

Two phases, as in vLLM's EPLB: moves land in staging (``StagedUpdate``); ``commit``
copies staging into the live stacked weights. A failure before commit leaves the
live weights exactly as they were.

Point-to-point traffic is packed: all experts one rank sends to one peer in one
stage travel as a few large flat messages (at most ``max_message_bytes`` each),
which both sides cut identically from the same ordered plan. A message of n experts
is their n byte rows (every tensor of each expert's bundle: weights, scales, biases),
packed with one indexed gather and committed with one indexed copy; nothing here
knows a dtype, so no path can move a weight without its scales.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch

from .plan import DST, DST_SLOT, EXPERT, LAYER, SRC, SRC_SLOT, STAGE, RankPlan
from .errors import TransferError
from .checkpoint.bundle import empty_rows, tensor_view
from .checkpoint.fingerprints import fingerprint_rows, fingerprint_sums, fingerprints_from_sums
from .checkpoint.formats import ExpertFormat

# fetch(keys) -> {(layer, expert): byte row [row_bytes] uint8} from a backup or the checkpoint
FetchFn = Callable[[list[tuple[int, int]]], dict[tuple[int, int], torch.Tensor]]


@dataclass
class ExpertWeights:
    """One rank's live experts: each slot's bundle as one byte row (see ``checkpoint.formats``).

    rows: uint8 [num_layers, slots_per_rank, row_bytes]
    experts: [num_layers, slots_per_rank] logical expert in each slot (-1: empty).
    ``tensor(name)`` views one bundle tensor stacked per layer, ``[num_layers, slots_per_rank, *shape]``
    (e.g. ``w13 [L, S, 2I, H]``), sharing the rows' memory.
    """

    rows: torch.Tensor
    experts: np.ndarray
    format: ExpertFormat

    @classmethod
    def zeros(cls, fmt: ExpertFormat, num_layers: int, slots_per_rank: int, device) -> "ExpertWeights":
        shape = (num_layers, slots_per_rank)
        return cls(empty_rows(shape, fmt, device), np.full(shape, -1, dtype=np.int64), fmt)

    def tensor(self, name: str) -> torch.Tensor:
        return tensor_view(self.rows, self.format, name)

    @property
    def w13(self) -> torch.Tensor:
        """Gate and up weights ``[L, S, 2I, H]`` (unquantized formats; FP8 ones give the FP8 weights)."""
        return self.tensor("w13")

    @property
    def w2(self) -> torch.Tensor:
        """Down weights ``[L, S, H, I]``."""
        return self.tensor("w2")

    @property
    def row_bytes(self) -> int:
        return int(self.rows.shape[-1])

    def fingerprints(self) -> np.ndarray:
        """Fingerprint of every slot (all its tensors): [num_layers, slots_per_rank] int64."""
        num_layers, spr = self.experts.shape
        out = np.empty((num_layers, spr), dtype=np.int64)
        for layer in range(num_layers):
            out[layer] = fingerprint_rows(self.rows[layer])
        return out


@dataclass
class StagedBatch:
    """Experts that arrived together: data [n, row_bytes] byte rows, views of one message.

    meta: [n, 3] int64 (layer, slot, expert) of each row.
    """

    data: torch.Tensor
    meta: np.ndarray
    sums: Optional[torch.Tensor] = None  # fingerprint_sums(data), started as soon as the data is whole


@dataclass
class StagedUpdate:
    """New contents for some slots, not yet live. Keyed by (layer, slot).

    ``slots`` holds byte-row views (into ``batches`` where the slot arrived packed) or loose copies.
    """

    epoch: int
    slots: dict[tuple[int, int], tuple[torch.Tensor, int]] = field(default_factory=dict)
    batches: list[StagedBatch] = field(default_factory=list)
    row_bytes: int = 0
    timings_s: dict[str, float] = field(default_factory=dict)
    bytes_sent: int = 0
    bytes_received: int = 0
    bytes_fetched: int = 0

    @property
    def nbytes(self) -> int:
        """Bytes held until the commit: packed batches (received, relayed, read) and loose slots (copies)."""
        packed = {(layer, slot) for batch in self.batches for layer, slot, _ in batch.meta.tolist()}
        loose = sum(row.numel() * row.element_size() for key, (row, _) in self.slots.items() if key not in packed)
        return sum(batch.data.numel() * batch.data.element_size() for batch in self.batches) + loose

    def add_batch(self, flat: torch.Tensor, meta: np.ndarray, sums: Optional[torch.Tensor] = None) -> None:
        """Stage a packed message ``flat`` (1-D bytes); its rows become views in ``slots``. Starts fingerprinting."""
        data = flat.view(len(meta), self.row_bytes)
        if sums is None and len(meta):
            sums = fingerprint_sums(data)
        self.batches.append(StagedBatch(data, meta, sums))
        for i, (layer, slot, expert) in enumerate(meta.tolist()):
            self.slots[(layer, slot)] = (data[i], expert)

    def current_rows(self, done: set) -> list[list[int]]:
        """Per batch, the indices of its rows that are still what ``slots`` stages and not in ``done``.

        Adds those rows' (layer, slot) to ``done``: fingerprinting and commit both take each
        staged slot from exactly one place, its batch where it has one.
        """
        out = []
        for batch in self.batches:
            keep = []
            for i, (layer, slot, expert) in enumerate(batch.meta.tolist()):
                if self.slots.get((layer, slot), (None, None))[1] == expert and (layer, slot) not in done:
                    keep.append(i)
                    done.add((layer, slot))
            out.append(keep)
        return out

    def fingerprints(self) -> list[tuple[int, int, int, int]]:
        """(layer, slot, expert, fingerprint) for every staged slot, sorted; packed batches in one pass each."""
        out = []
        batched: set = set()
        for batch, keep in zip(self.batches, self.current_rows(batched)):
            if not keep:
                continue
            fps = fingerprints_from_sums(batch.sums if batch.sums is not None else fingerprint_sums(batch.data))
            meta = batch.meta.tolist()
            out += [(*meta[i], int(fps[i])) for i in keep]
        for (layer, slot), (row, expert) in self.slots.items():
            if (layer, slot) not in batched:
                out.append((layer, slot, expert, fingerprint_rows(row.unsqueeze(0))[0]))
        return sorted(out)


def _wide(*rows: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Row tensors ``[n, m]`` reinterpreted as one wider integer type (views), the widest all of them allow.

    Gathers and scatters of whole experts then run on up to 4x fewer, 8-byte elements,
    with 32-bit index arithmetic on stacks of billions of bf16 elements. Tensors that
    cannot all be viewed so (odd sizes, unaligned offsets) come back unchanged.
    """
    elem = rows[0].element_size()
    for dtype, size in ((torch.int64, 8), (torch.int32, 4)):
        if size > elem and all(
            r.element_size() == elem and r.stride(-1) == 1
            and (r.shape[-1] * elem) % size == 0 and (r.stride(0) * elem) % size == 0
            and (r.storage_offset() * elem) % size == 0
            for r in rows
        ):
            return tuple(r.view(dtype) for r in rows)
    return rows


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
    max_message_bytes: int = 1 << 30,
    on_phase: Optional[Callable[[str], None]] = None,
) -> StagedUpdate:
    """Run this rank's sends, receives, copies and fetches into a StagedUpdate.

    transport: a Transport (``execute_rounds``). group_rank maps rank ids to
    ranks of the transport's group. ``on_phase`` is called with each phase name as it
    starts (fault injection and progress reporting hook). Storage fetches run in a
    background thread (on their own CUDA stream) while the point-to-point exchange
    runs; their errors are raised after the exchange, so peers never wait on storage.
    Reads for another rank (``part.relay_sends``) start with them and are sent, and
    relays for this rank received, in a second round. ``timeout_s`` bounds it all.
    """
    live = weights.rows
    numel = weights.row_bytes
    staged = StagedUpdate(epoch=epoch, row_bytes=numel)
    per_message = max(1, max_message_bytes // numel)

    def phase(name: str) -> None:
        if on_phase is not None:
            on_phase(name)

    deadline = time.monotonic() + timeout_s  # one bound for the exchange, the relays and the reads

    def left() -> float:
        return max(deadline - time.monotonic(), 0.001)

    # Storage reads for experts no live rank holds, and reads this rank relays to another
    # in the second round, run in background threads during the exchange.
    t0 = time.perf_counter()
    phase("transfer")
    fetcher = relayer = None
    if len(part.fetches) or len(part.relay_sends):
        phase("fetch")
    if len(part.fetches):
        fetcher = _Fetcher(part.fetches, fetch, weights, staged.timings_s)
        fetcher.start()
    if len(part.relay_sends):
        rows = part.relay_sends
        relayer = _Fetcher(np.stack([rows[:, LAYER], rows[:, EXPERT], rows[:, SRC], rows[:, SRC_SLOT]], axis=1),
                           fetch, weights, {})
        relayer.start()

    # Point-to-point, packed per (stage, peer): one round per (stage, message index), so the
    # next round's sends are packed on the GPU while this round moves.
    recv_batches: list[tuple[torch.Tensor, np.ndarray]] = []
    clock = {"pack": 0.0, "alloc": 0.0}  # CPU seconds packing rounds, and allocating their buffers
    messages = _messages(part, per_message)
    sends = [rows for _, _, kind, _, rows in messages if kind == "send"]
    if sends:  # one upload of every send's row index
        sends = np.concatenate(sends)
        index = _row_index(weights, sends[:, LAYER], sends[:, SRC_SLOT])

    def buffer(n: int) -> torch.Tensor:
        t = time.perf_counter()
        out = torch.empty(n * numel, dtype=torch.uint8, device=live.device)
        clock["alloc"] += time.perf_counter() - t
        return out

    def rounds():
        at = 0
        for _, group in itertools.groupby(messages, key=lambda m: m[:2]):
            t = time.perf_counter()
            ops = []
            for _, _, kind, peer, rows in group:
                flat = buffer(len(rows))
                if kind == "send":
                    _pack(weights, index[at : at + len(rows)], flat)
                    at += len(rows)
                    staged.bytes_sent += flat.numel()
                else:
                    recv_batches.append((flat, rows[:, [LAYER, DST_SLOT, EXPERT]].astype(np.int64)))
                    staged.bytes_received += flat.numel()
                ops.append((kind, flat, group_rank[peer]))
            clock["pack"] += time.perf_counter() - t
            yield ops

    t1 = time.perf_counter()
    staged.timings_s["setup"] = t1 - t0  # reads started, messages cut, send rows uploaded
    if messages:
        transport.execute_rounds(rounds(), left())
    staged.timings_s["exchange"] = time.perf_counter() - t1  # packing included: it overlaps the wire
    staged.timings_s["transfer"] = time.perf_counter() - t0
    staged.timings_s.update(clock)
    for flat, rows in recv_batches:
        staged.add_batch(flat, rows)

    if len(part.relay_sends) or len(part.relay_recvs):
        _relay_round(part, relayer, staged, transport, group_rank, left, per_message, weights, phase)

    if fetcher is not None:
        flat, rows, sums = fetcher.join(left())
        staged.add_batch(flat, rows, sums)
        staged.bytes_fetched += flat.numel()

    # Copies within the rank (from live weights, or from a slot staged above).
    t0 = time.perf_counter()
    for layer, _, src_slot, dst_slot, after in part.copies:
        layer, src_slot, dst_slot = int(layer), int(src_slot), int(dst_slot)
        if after:
            row, expert = staged.slots[(layer, src_slot)]
        else:
            row, expert = live[layer, src_slot], int(weights.experts[layer, src_slot])
        staged.slots[(layer, dst_slot)] = (row.clone(), expert)
    staged.timings_s["copy"] = time.perf_counter() - t0
    return staged


def _relay_round(part: RankPlan, relayer: Optional["_Fetcher"], staged: StagedUpdate, transport, group_rank: dict,
                 left: Callable[[], float], per_message: int, weights: ExpertWeights, phase) -> None:
    """Second round: send what this rank read for others, receive what others read for it.

    Both sides cut the relays of a (sender, receiver) pair into the same messages; a
    message travels straight from the sender's read buffer.
    ``left()`` gives the seconds left of the whole transfer's bound.
    """
    t0 = time.perf_counter()
    phase("relay")
    like, numel = weights.rows, weights.row_bytes
    data = None
    if relayer is not None:
        flat, _, _ = relayer.join(left())
        data = flat.view(len(part.relay_sends), numel)
        staged.bytes_fetched += flat.numel()
    sends = part.relay_sends.copy()
    sends[:, SRC_SLOT] = np.arange(len(sends))  # position in the read buffer, which is in plan order
    rounds = RankPlan(part.rank, sends, part.relay_recvs, np.empty((0, 5), np.int64), np.empty((0, 4), np.int64), 0)
    received = []

    def ops_by_round():
        for _, group in itertools.groupby(_messages(rounds, per_message), key=lambda m: m[:2]):
            ops = []
            for _, _, kind, peer, rows in group:
                if kind == "send":
                    lo, hi = int(rows[0, SRC_SLOT]), int(rows[-1, SRC_SLOT]) + 1  # contiguous: one peer's run
                    ops.append(("send", data[lo:hi].reshape(-1), group_rank[peer]))
                    staged.bytes_sent += (hi - lo) * numel
                else:
                    flat = torch.empty(len(rows) * numel, dtype=torch.uint8, device=like.device)
                    ops.append(("recv", flat, group_rank[peer]))
                    received.append((flat, rows[:, [LAYER, DST_SLOT, EXPERT]].astype(np.int64)))
                    staged.bytes_received += flat.numel()
            yield ops

    transport.execute_rounds(ops_by_round(), left())
    for flat, rows in received:
        staged.add_batch(flat, rows)
    staged.timings_s["relay"] = time.perf_counter() - t0


def _row_index(weights: ExpertWeights, layers: np.ndarray, slots: np.ndarray) -> torch.Tensor:
    """Flat live-row index ``layers * slots_per_rank + slots`` ([n]) on the weights' device."""
    spr = weights.rows.shape[1]
    flat = np.asarray(layers, dtype=np.int64) * spr + np.asarray(slots, dtype=np.int64)
    return torch.as_tensor(flat, device=weights.rows.device)


def _pack(weights: ExpertWeights, index: torch.Tensor, flat: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Live experts at flat rows ``index`` ([n], see ``_row_index``) packed into one 1-D byte message:
    ``flat`` (``n * row_bytes`` bytes), or a new buffer."""
    num_layers, spr, numel = weights.rows.shape
    if flat is None:
        flat = torch.empty(len(index) * numel, dtype=torch.uint8, device=weights.rows.device)
    live, out = _wide(weights.rows.view(num_layers * spr, numel), flat.view(len(index), numel))
    torch.index_select(live, 0, index, out=out)
    return flat


_FETCH_CHUNK = 32  # experts copied per step of a fetch; the previous step is fingerprinted meanwhile


def _on(stream):
    """``torch.cuda.stream(stream)``, or nothing on the CPU."""
    return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()


class _Fetcher:
    """Background storage fetch into one packed batch, on its own CUDA stream where on a GPU."""

    def __init__(self, fetches: np.ndarray, fetch: FetchFn, weights: ExpertWeights, timings: dict):
        self.fetches, self.fetch, self.weights, self.timings = fetches, fetch, weights, timings
        live = weights.rows  # allocated here, on the caller's stream, which uses it after join()
        self.flat = torch.empty(len(fetches) * weights.row_bytes, dtype=torch.uint8, device=live.device)
        self.alloc_stream = torch.cuda.current_stream(live.device) if live.is_cuda else None
        self.data = self.flat.view(len(fetches), weights.row_bytes)
        self.rows = np.empty((len(fetches), 3), dtype=np.int64)
        self.sums: Optional[torch.Tensor] = None
        self.error: Optional[BaseException] = None
        self.thread = threading.Thread(target=self._run, name="eep-fetch", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def _run(self) -> None:
        t0 = time.perf_counter()
        try:
            if self.flat.is_cuda:
                torch.cuda.set_device(self.flat.device)
                copy, compute = torch.cuda.Stream(self.flat.device), torch.cuda.Stream(self.flat.device)
                copy.wait_stream(self.alloc_stream)  # the buffer came from the caller's stream
                first, last = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                first.record(copy)
                self._fill(copy, compute)
                last.record(copy)
                compute.synchronize()  # host sources must outlive their copies; sums are done
                last.synchronize()
                self.timings["fetch_dma"] = first.elapsed_time(last) / 1e3  # copy engine busy, start to end
            else:
                self._fill(None, None)
        except BaseException as exc:  # re-raised in join(), on the caller's thread
            self.error = exc
        self.timings["fetch"] = time.perf_counter() - t0

    def _fill(self, copy, compute) -> None:
        """Copy chunk by chunk on ``copy`` while ``compute`` fingerprints the chunks already in."""
        t0 = time.perf_counter()
        got = self.fetch(sorted({(layer, expert) for layer, expert, _, _ in self.fetches.tolist()}))
        self.timings["fetch_lookup"] = time.perf_counter() - t0
        todo = self.fetches.tolist()
        sums = []
        for lo in range(0, len(todo), _FETCH_CHUNK):
            hi = min(len(todo), lo + _FETCH_CHUNK)
            with _on(copy):
                for i in range(lo, hi):
                    layer, expert, _, slot = todo[i]
                    self.data[i].copy_(got[(layer, expert)].reshape(-1), non_blocking=True)
                    self.rows[i] = (layer, slot, expert)
            if compute is not None:
                compute.wait_stream(copy)
            with _on(compute):
                sums.append(fingerprint_sums(self.data[lo:hi]))
        with _on(compute):
            self.sums = torch.cat(sums) if sums else None
        if copy is not None:
            t0 = time.perf_counter()
            copy.synchronize()
            self.timings["fetch_copy_wait"] = time.perf_counter() - t0

    def join(self, timeout_s: float) -> tuple[torch.Tensor, np.ndarray, Optional[torch.Tensor]]:
        """The fetched batch (message, rows, fingerprint sums); raises the fetch's own error, or TransferError past ``timeout_s``."""
        self.thread.join(timeout_s)
        if self.thread.is_alive():
            raise TransferError(f"storage fetch of {len(self.fetches)} experts not done after {timeout_s:.1f} s")
        if self.error is not None:
            raise self.error
        return self.flat, self.rows, self.sums


def _messages(part: RankPlan, per_message: int) -> list[tuple[int, int, str, int, np.ndarray]]:
    """(stage, k, kind, peer, rows) messages, in round order.

    Each (stage, peer, direction) run of transfers is cut into messages of at most
    ``per_message`` experts; k numbers them within the run, and both ends of a pair cut the
    run identically. A round is one (stage, k): the k-th message to and from every peer of
    a stage. Within a round the lower rank of a pair lists its send first.
    """
    out = []
    for kind, table, peer_col in (("send", part.sends, DST), ("recv", part.recvs, SRC)):
        if not len(table):
            continue
        # plain Python grouping: np.unique(axis=0) costs tens of ms on its first call in a process
        stages, peers = table[:, STAGE], table[:, peer_col]
        for stage, peer in sorted(set(zip(stages.tolist(), peers.tolist()))):
            rows = table[(stages == stage) & (peers == peer)]
            first = (kind == "send") == (part.rank < peer)
            for k, (a, b) in enumerate(_split(len(rows), per_message)):
                out.append((int(stage), k, 0 if first else 1, int(peer), kind, rows[a:b]))
    out.sort(key=lambda m: m[:4])
    return [(stage, k, kind, peer, rows) for stage, k, _, peer, kind, rows in out]


def commit(weights: ExpertWeights, staged: StagedUpdate) -> None:
    """Copy staged slots into the live weights (the only place live weights change).

    Packed batches go in with one indexed copy each; loose slots one by one.
    """
    num_layers, spr, numel = weights.rows.shape
    live = weights.rows.view(num_layers * spr, numel)
    done: set = set()
    for batch, keep in zip(staged.batches, staged.current_rows(done)):
        if not keep:
            continue
        meta = batch.meta[keep]
        index = torch.as_tensor(meta[:, 0] * spr + meta[:, 1], device=live.device)
        part = batch.data if len(keep) == len(batch.meta) else \
            batch.data.index_select(0, torch.as_tensor(keep, device=batch.data.device))
        dst, src = _wide(live, part)
        dst.index_copy_(0, index, src)
        for layer, slot, expert in meta.tolist():
            weights.experts[layer, slot] = expert
    for (layer, slot), (row, expert) in staged.slots.items():
        if (layer, slot) in done:
            continue
        weights.rows[layer, slot].copy_(row)
        weights.experts[layer, slot] = expert
    if live.is_cuda:
        torch.cuda.synchronize(live.device)


class _Loopback:
    """A transport from a rank to itself: each round's k-th send lands in its k-th receive (warm-up only)."""

    def execute_rounds(self, rounds, timeout_s: float) -> None:
        for ops in rounds:
            sends = [tensor for kind, tensor, _ in ops if kind == "send"]
            recvs = [tensor for kind, tensor, _ in ops if kind == "recv"]
            for src, dst in zip(sends, recvs):
                dst.copy_(src)


def warm_up(weights: ExpertWeights) -> None:
    """Run a whole tiny transfer once, rank to itself, moving copies of slot (0, 0) back into it.

    Every step a real transfer takes runs once: packing (more than 16 rows, where torch
    switches gather kernels), receive buffers, a storage read and a relayed one, a copy,
    fingerprints and commit. CUDA loads kernels lazily, tens of ms on their first launch, and
    some numpy and Python paths cost as much on first use; a worker calls this at start so
    none of that lands on a recovery's critical path. The weights end as they were.
    """
    expert = int(weights.experts[0, 0])
    host = weights.rows[0, 0].cpu()
    row = np.array([[0, expert, 0, 0, 0, 0, 0]], dtype=np.int64)  # layer 0, slot 0 -> rank 0, slot 0
    relay = row.copy()
    relay[:, SRC_SLOT] = -1
    part = RankPlan(
        rank=0, sends=np.repeat(row, 17, axis=0), recvs=np.repeat(row, 17, axis=0),
        copies=np.array([[0, 0, 0, 0, 0]], dtype=np.int64), fetches=np.array([[0, expert, 0, 0]], dtype=np.int64),
        keeps=0, relay_sends=relay, relay_recvs=relay,
    )
    staged = execute_rank_plan(part, weights, -1, _Loopback(), {0: 0}, lambda keys: {k: host for k in keys}, 60.0)
    staged.fingerprints()
    commit(weights, staged)
