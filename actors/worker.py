"""ExpertWorker actor: one per EP rank (one GPU); holds its slots' stacked expert weights and runs its part of a plan."""

from __future__ import annotations

import os
import threading
import time
from typing import Optional

import numpy as np
import ray
import torch

from elastic_ep.config import ModelSpec
from elastic_ep.errors import CheckpointError, ExpertsLostError, StaleEpochError, TransferError
from elastic_ep.executor import ExpertWeights, StagedUpdate, commit, execute_rank_plan, warm_up
from elastic_ep.faults import WORKER_PHASES, FaultInjector
from elastic_ep.plan import RankPlan
from elastic_ep.status import CommittedView
from elastic_ep.checkpoint import CheckpointReader
from elastic_ep.replies import (Committed, Loaded, PreparedBackups, ServedLoad, SlotFingerprints, Staged,
                                WorkerPing)


class ExpertWorker:
    """Holds one rank's experts and executes its share of transfer plans.

    A spare worker (rank None) has its buffers allocated (and, on GPU, its CUDA
    context and communicators ready) so that it can take over a dead rank at once.
    Control calls (ping, status, arm_fault) run in their own concurrency group and
    stay responsive while a transfer runs.
    """

    def __init__(
        self,
        worker_id: str,
        spec: ModelSpec,
        slots_per_rank: int,
        device: str = "cpu",
        checkpoint: Optional[str] = None,
        preset="deepseek",
        staging_reserve: float = 0.0,
    ):
        from elastic_ep.transport import register_backends

        register_backends()
        self.worker_id = worker_id
        self.spec = spec
        self.spr = slots_per_rank
        self.device = torch.device("cuda", 0) if device == "cuda" else torch.device("cpu")
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.checkpoint = checkpoint
        self.preset = preset
        self._reader: Optional[CheckpointReader] = None
        self.rank: Optional[int] = None
        self.epoch = -1
        shape = (spec.num_layers, slots_per_rank)
        # Every slot holds its expert's whole bundle (weights, scales, biases) as one byte row.
        self.weights = ExpertWeights.zeros(spec.expert_format, spec.num_layers, slots_per_rank, self.device)
        warm_up(self.weights)  # no lazy kernel loading on a recovery's critical path
        self._staged: Optional[StagedUpdate] = None
        self._reserved = 0  # bytes of staging already taken into torch's allocator cache
        self._reserve_staging(staging_reserve)
        self._groups: dict[str, tuple[int, int]] = {}  # group name -> (world, group rank)
        self._slot_tokens = np.zeros(shape, dtype=np.float64)
        # Tokens served by slots before a commit or retire changed what they hold: [L, num_experts].
        self._expert_tokens = np.zeros((spec.num_layers, spec.num_experts), dtype=np.float64)
        self._serve_lock = threading.Lock()  # a serving call sees one epoch's weights: commit waits for it
        self.serve_method = "auto"  # expert GEMMs: grouped, loop or auto (elastic_ep.serving.compute)
        self._interleaved: Optional[bool] = None  # w13 rows alternate gate/up (see _w13_interleaved)
        self._view: Optional[CommittedView] = None  # the cluster's view at the last commit (committed_view)
        self._busy: Optional[str] = None
        self._lock = threading.Lock()
        self._prep_lock = threading.Lock()
        self._prepared: Optional[tuple[dict, object]] = None  # (host backups by key, their PinnedRegion)
        self.faults = FaultInjector(WORKER_PHASES)

    def _reserve_staging(self, fraction: float) -> None:
        """Allocate and free ``fraction`` of this rank's expert bytes on the GPU, once.

        torch keeps the freed block cached, so later staging buffers are carved from it
        instead of calling cudaMalloc on the critical path (tens of ms per GB).
        """
        want = int(fraction * self.weights.rows.numel())
        if self.device.type != "cuda" or want <= self._reserved:
            return
        block = torch.empty(want, dtype=torch.uint8, device=self.device)
        del block
        self._reserved = want

    # -- control (concurrency group "control") ----------------------------------------

    def ping(self) -> WorkerPing:
        ctx = ray.get_runtime_context()
        return WorkerPing(
            worker_id=self.worker_id, rank=self.rank, epoch=self.epoch, pid=os.getpid(), node_id=ctx.get_node_id(),
            gpus=tuple(str(g) for g in ctx.get_accelerator_ids().get("GPU", [])), busy=self._busy,
            groups=tuple(sorted(self._groups)),
            prepared_backups=0 if self._prepared is None else len(self._prepared[0]),
        )

    def watch(self) -> None:
        """Blocks for as long as this worker lives; the controller learns of a death when it raises."""
        threading.Event().wait()

    def arm_fault(self, phase: str, delay_s: float = 0.0) -> None:
        self.faults.arm(phase, delay_s)

    def abort(self, reason: str = "aborted by the controller") -> list[str]:
        """Abort every communicator this worker holds, so a running transfer fails at once.

        Runs beside a transfer (control group). Staging is discarded by the failed execute;
        live weights are untouched. Returns the groups aborted (re-form before the next plan).
        """
        from elastic_ep.transport import get_group

        aborted = []
        for name in list(self._groups):
            try:
                get_group(name).abort(reason)
                aborted.append(name)
            except Exception:  # noqa: BLE001 - a group already gone needs no abort
                pass
            self._groups.pop(name, None)
        return aborted

    def disarm_fault(self, phase: Optional[str] = None) -> list[str]:
        """Disarm ``phase`` (every phase if None) unless it already fired; returns what was still armed."""
        armed = self.faults.armed()
        self.faults.disarm(phase)
        return armed

    # -- loading -----------------------------------------------------------------------

    def _checkpoint_reader(self) -> CheckpointReader:
        if self.checkpoint is None:
            raise CheckpointError("no checkpoint configured for this cluster")
        if self._reader is None:
            self._reader = CheckpointReader(self.checkpoint, self.spec, self.preset)
        return self._reader

    def load(self, rank: int, experts: np.ndarray, epoch: int) -> Loaded:
        """Load a rank's slots from the checkpoint (start-up): experts [L, S]. Returns fingerprints."""
        self.faults.hit("load")
        experts = np.asarray(experts, dtype=np.int64)
        reader = self._checkpoint_reader()
        t0 = time.perf_counter()
        for layer in range(self.spec.num_layers):
            self.weights.rows[layer].copy_(reader.read_layer_slots(layer, experts[layer].tolist(),
                                                                    device=str(self.device)))
        self.weights.experts[:] = experts
        self.rank = int(rank)
        self.epoch = int(epoch)
        return Loaded(self.weights.fingerprints(), reader.bytes_read, time.perf_counter() - t0)

    def export_experts(self, keys: list[tuple[int, int]]) -> list:
        """Host copies of some experts this worker holds: [(layer, expert, row)].

        Each row is the expert's whole bundle as uint8 bytes, which Ray ships zero-copy.
        """
        out = []
        for layer, expert in keys:
            slots = np.nonzero(self.weights.experts[int(layer)] == int(expert))[0]
            if not len(slots):
                raise ValueError(f"worker {self.worker_id} does not hold expert {expert} of layer {layer}")
            s = int(slots[0])
            out.append((int(layer), int(expert), self.weights.rows[layer, s].cpu().numpy()))
        return out

    def prepare_backups(self, backup_refs: dict, timeout_s: float, reserve: float = 1.05) -> PreparedBackups:
        """Map host backups ahead of need (a hot spare), page-locked on a GPU, so a takeover copies at DMA speed.

        ``backup_refs``: {(layer, expert): ObjectRef}. Replaces what was prepared before.
        ``reserve``: GPU staging to keep cached, in rank sizes (a spare's takeover stages a whole rank).
        Runs in its own concurrency group, beside transfers; a fetch uses what is ready.
        """
        from actors.backup import from_host_array
        from elastic_ep.hostmem import PinnedRegion

        t0 = time.perf_counter()
        keys = list(backup_refs)
        values = ray.get([backup_refs[k] for k in keys], timeout=timeout_s) if keys else []
        # host tensors made once here, not at takeover time
        arrays = {tuple(int(x) for x in k): from_host_array(row) for k, row in zip(keys, values)}
        region, pin_error = None, None
        if self.device.type == "cuda" and arrays:
            try:
                region = PinnedRegion(list(arrays.values()))
            except OSError as exc:  # e.g. a locked-memory limit: still mapped, copied at pageable speed
                pin_error = str(exc)
            self._reserve_staging(reserve)
        with self._prep_lock:
            old = self._prepared
            self._prepared = (arrays, region)
        if old is not None and old[1] is not None:
            old[1].release()
        return PreparedBackups(experts=len(arrays), pinned_bytes=0 if region is None else region.nbytes,
                               pin_error=pin_error, seconds=time.perf_counter() - t0)

    # -- communicators -----------------------------------------------------------------

    def form_group(self, group_name: str, world: int, group_rank: int, host: str, port: int, timeout_s: float) -> float:
        """Join a membership epoch's collective group; returns seconds taken."""
        from elastic_ep.transport import form_group

        self.faults.hit("form_group")
        t0 = time.perf_counter()
        if group_name not in self._groups:
            form_group(group_name, world, group_rank, host, port, timeout_s, self.device.type)
            self._groups[group_name] = (world, group_rank)
        return time.perf_counter() - t0

    def leave_groups(self, keep: Optional[list[str]] = None) -> None:
        """Drop every group except ``keep`` (never blocks on a dead peer)."""
        from elastic_ep.transport import leave_group

        for name in list(self._groups):
            if keep and name in keep:
                continue
            self._groups.pop(name, None)
            leave_group(name)

    # -- executing a plan --------------------------------------------------------------

    def execute(
        self,
        epoch: int,
        part: RankPlan,
        group_name: Optional[str],
        group_rank: dict[int, int],
        timeout_s: float,
        backup_refs: Optional[dict] = None,
        max_message_bytes: int = 1 << 30,
    ) -> Staged:
        """Stage this rank's part of a plan; live weights stay untouched until commit()."""
        from elastic_ep.transport import CollectiveTransport

        with self._lock:
            self._busy = f"execute epoch {epoch}"
            try:
                self._staged = None
                stats = {"from_backup": 0, "from_checkpoint": 0}

                def fetch(keys):
                    return self._fetch(keys, backup_refs or {}, timeout_s, stats)

                def on_phase(name):
                    if name == "transfer":
                        if len(part.sends):
                            self.faults.hit("transfer_send")
                        if len(part.recvs):
                            self.faults.hit("transfer_recv")
                    else:
                        self.faults.hit(name)

                transport = None
                if len(part.sends) or len(part.recvs) or len(part.relay_sends) or len(part.relay_recvs):
                    if group_name not in self._groups:
                        raise TransferError(f"worker {self.worker_id} is not in group {group_name}")
                    transport = CollectiveTransport(group_name)
                t0 = time.perf_counter()
                staged = execute_rank_plan(
                    part,
                    self.weights,
                    epoch,
                    transport if transport is not None else _NoTransport(),
                    group_rank,
                    fetch,
                    timeout_s,
                    max_message_bytes=max_message_bytes,
                    on_phase=on_phase,
                )
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                staged.timings_s["execute"] = time.perf_counter() - t0
                t0 = time.perf_counter()
                fps = staged.fingerprints()
                staged.timings_s["fingerprint"] = time.perf_counter() - t0
                self._staged = staged
                self.faults.hit("staged")
                return Staged(
                    worker_id=self.worker_id, epoch=epoch, staged=tuple(fps), timings_s=dict(staged.timings_s),
                    bytes_sent=staged.bytes_sent, bytes_received=staged.bytes_received,
                    bytes_from_backup=stats["from_backup"], bytes_from_checkpoint=stats["from_checkpoint"],
                )
            finally:
                self._busy = None

    def _fetch(self, keys, backup_refs: dict, timeout_s: float, stats: dict) -> dict:
        """Experts from host backups (prepared ones first), else from the checkpoint.

        Backups come back as host tensors (page-locked where prepared on a GPU): the
        executor copies them straight into the staging buffer.
        """
        from actors.backup import from_host_array

        with self._prep_lock:
            prepared = self._prepared[0] if self._prepared is not None else {}
        arrays = {tuple(k): prepared[tuple(k)] for k in keys if tuple(k) in prepared}
        wanted = [tuple(k) for k in keys if tuple(k) not in arrays and tuple(k) in backup_refs]
        if wanted:
            try:
                values = ray.get([backup_refs[k] for k in wanted], timeout=timeout_s)
                arrays.update(zip(wanted, values))
            except (ray.exceptions.RayError, ray.exceptions.GetTimeoutError):
                pass  # a lost backup: those experts fall through to the checkpoint
        out = {}
        for k, row in arrays.items():
            if isinstance(row, np.ndarray):
                row = from_host_array(row)
            out[k] = row
            stats["from_backup"] += row.numel()
        rest = [tuple(k) for k in keys if tuple(k) not in out]
        if rest:
            out.update(self._read_checkpoint(rest, stats))
        return out

    def _read_checkpoint(self, keys: list[tuple[int, int]], stats: dict) -> dict:
        """Experts from the checkpoint; ExpertsLostError names exactly those it cannot give, and why."""
        try:
            reader = self._checkpoint_reader()
            before = reader.bytes_read
            out = reader.read_experts(keys, device=str(self.device))
            stats["from_checkpoint"] += reader.bytes_read - before
            return out
        except CheckpointError as exc:
            first = exc
        out, failed = {}, []
        if self._reader is not None:  # find which experts are unreadable (one bad shard spoils only its own)
            for key in keys:
                try:
                    out.update(self._reader.read_experts([key], device=str(self.device)))
                except CheckpointError:
                    failed.append(key)
        else:
            failed = list(keys)
        raise ExpertsLostError(
            f"worker {self.worker_id}: {len(failed)} experts have no live replica or backup and cannot be read "
            f"from the checkpoint, e.g. (layer, expert) {failed[:5]}: {first}",
            failed,
        )

    def commit(self, epoch: int, rank: int, view: Optional[CommittedView] = None) -> Committed:
        """Make the staged update live (atomic per rank: plain copies that cannot fail halfway but by death).

        view: the cluster's CommittedView at ``epoch``, kept so that serving clients can read the
        layout in force from any rank while the controller is restarting (``committed_view``).
        """
        with self._lock:
            staged = self._staged
            if staged is not None and staged.epoch != epoch:
                raise TransferError(f"worker {self.worker_id} has staging for epoch {staged.epoch}, not {epoch}")
            t0 = time.perf_counter()
            with self._serve_lock:  # serving calls see the old epoch's weights or the new one's, never a mix
                self._fold_slot_tokens()
                if staged is not None:
                    commit(self.weights, staged)
                self._staged = None
                self.rank = int(rank)
                self.epoch = int(epoch)
                if view is not None and view.epoch == self.epoch:
                    self._view = view
            return Committed(commit_s=time.perf_counter() - t0, slots=0 if staged is None else len(staged.slots))

    def discard(self, epoch: int) -> None:
        with self._lock:
            if self._staged is not None and self._staged.epoch <= epoch:
                self._staged = None

    def retire(self) -> None:
        """Stop serving a rank (shrink): keep the process as a spare with empty slots."""
        with self._lock, self._serve_lock:
            self._fold_slot_tokens()
            self.rank = None
            self.weights.experts[:] = -1

    # -- verification and load -----------------------------------------------------------

    def fingerprints(self) -> SlotFingerprints:
        return SlotFingerprints(self.rank, self.epoch, self.weights.experts.copy(), self.weights.fingerprints())

    def take_load(self) -> ServedLoad:
        """Token counts per slot since the last call, with the experts they went to.

        ``expert_tokens`` [num_layers, num_experts]: tokens counted before a commit changed
        the slots' experts, already folded per logical expert.
        """
        with self._serve_lock:
            out = ServedLoad(rank=self.rank, experts=self.weights.experts.copy(), tokens=self._slot_tokens.copy(),
                             expert_tokens=self._expert_tokens.copy())
            self._slot_tokens[:] = 0
            self._expert_tokens[:] = 0
        return out

    def _fold_slot_tokens(self) -> None:
        """Move per-slot counts into per-expert counts before the slots change hands (serve lock held)."""
        held = self.weights.experts >= 0
        layers = np.nonzero(held)[0]
        np.add.at(self._expert_tokens, (layers, self.weights.experts[held]), self._slot_tokens[held])
        self._slot_tokens[:] = 0

    # -- serving -------------------------------------------------------------------------

    def serve_layer(self, epoch: int, rank: int, layer: int, hidden: np.ndarray, rows: np.ndarray,
                    slots: np.ndarray, pair_weights: np.ndarray) -> np.ndarray:
        """This rank's share of one layer call, weighted and summed per token: [n, hidden] float32.

        hidden: [n, hidden] the rank's tokens as raw bits of the model dtype (each token once);
        rows: [m] token row of each (token, expert) pair; slots: [m] local slot of each pair;
        pair_weights: [m] float32 router weights. Counts each pair as a token its slot served.
        Raises StaleEpochError unless this worker holds ``rank`` at committed ``epoch``.
        """
        from elastic_ep.serving.bits import from_bits
        from elastic_ep.serving.compute import combine_rank
        from elastic_ep.serving.weights import weights_for_slots

        # Large arguments arrive in object-store memory, which backups page-lock (hostmem); CUDA copies from
        # there failed on H100 ('CUDA error: invalid argument'), so each is first copied into private memory.
        x = from_bits(np.array(hidden, copy=True), self.spec.dtype).to(self.device)
        rows_t = torch.from_numpy(np.array(rows, dtype=np.int64, copy=True)).to(self.device)
        slots_np = np.array(slots, dtype=np.int64, copy=True)
        slots_t = torch.from_numpy(slots_np).to(self.device)
        w_t = torch.from_numpy(np.array(pair_weights, dtype=np.float32, copy=True)).to(self.device)
        with self._serve_lock:
            if epoch != self.epoch or rank != self.rank:
                raise StaleEpochError(
                    f"worker {self.worker_id} holds rank {self.rank} at epoch {self.epoch}; the call was planned "
                    f"for rank {rank} at epoch {epoch}", self.epoch, int(epoch))
            weights, index = weights_for_slots(self.weights.rows[layer], self.weights.format, self.spec.dtype,
                                               slots_t, self._w13_interleaved())
            out = combine_rank(weights, x, rows_t, index, w_t, self.serve_method, self.spec.activation)
            self._slot_tokens[layer] += np.bincount(slots_np, minlength=self.spr)
            if self.device.type == "cuda":
                out = out.cpu()
        return out.numpy()

    def committed_view(self) -> Optional[CommittedView]:
        """The cluster's CommittedView at the epoch this rank serves, as its commit delivered it (None: not known)."""
        with self._serve_lock:
            view = self._view
            return view if view is not None and view.epoch == self.epoch else None

    def _w13_interleaved(self) -> bool:
        """Whether the held w13 rows alternate gate/up (a quantized gpt-oss checkpoint as read); found once."""
        from elastic_ep.checkpoint import resolve_layout
        from elastic_ep.serving.weights import held_interleaved

        if self._interleaved is None:
            if self.spec.quant == "none":  # unquantized rows are de-interleaved on read: no reader needed
                self._interleaved = False
            else:
                layout = (self._checkpoint_reader().preset if self.checkpoint is not None
                          else resolve_layout(self.preset))
                self._interleaved = held_interleaved(self.spec.quant, layout)
        return self._interleaved

    def set_serve_method(self, method: str) -> None:
        """Choose the expert GEMM path: grouped, loop or auto (benchmarks compare them)."""
        if method not in ("grouped", "loop", "auto"):
            raise ValueError(f"method must be 'grouped', 'loop' or 'auto', got {method!r}")
        self.serve_method = method

class _NoTransport:
    """A rank with no point-to-point work in a plan."""

    def add_send(self, tensor, peer):  # pragma: no cover - never called without transfers
        raise TransferError("no transport")

    add_recv = add_send

    def execute(self, timeout_s):
        return None

    def execute_rounds(self, rounds, timeout_s):
        if any(ops for ops in rounds):  # pragma: no cover - never called with transfers
            raise TransferError("no transport")


def worker_actor_class(device: str):
    """The ray.remote-wrapped worker class: one GPU each on CUDA, no CPU reservation on CPU."""
    opts = dict(concurrency_groups={"control": 4, "watch": 1, "data": 1, "prepare": 1, "serve": 4},
                max_task_retries=0)
    if device == "cuda":
        opts["num_gpus"] = 1
        opts["num_cpus"] = 1
    else:
        opts["num_cpus"] = 0
    cls = ray.remote(**opts)(ExpertWorker)
    return cls


# Which concurrency group each method runs in.
ExpertWorker.prepare_backups = ray.method(concurrency_group="prepare")(ExpertWorker.prepare_backups)
ExpertWorker.watch = ray.method(concurrency_group="watch")(ExpertWorker.watch)
for _name in ("serve_layer", "set_serve_method", "committed_view"):  # serving runs beside transfers (issue 17: never stop serving)
    setattr(ExpertWorker, _name, ray.method(concurrency_group="serve")(getattr(ExpertWorker, _name)))
for _name in ("ping", "arm_fault", "disarm_fault", "abort"):
    setattr(ExpertWorker, _name, ray.method(concurrency_group="control")(getattr(ExpertWorker, _name)))
for _name in ("load", "export_experts", "form_group", "leave_groups", "execute", "commit", "discard",
              "retire", "fingerprints", "take_load"):
    setattr(ExpertWorker, _name, ray.method(concurrency_group="data")(getattr(ExpertWorker, _name)))
