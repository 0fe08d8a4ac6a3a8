"""An in-process WorkerGroup for driving the controller without Ray: workers hold real per-slot state.

Each FakeWorker holds what a real ExpertWorker holds, with a fingerprint standing for the
weights: live ``experts`` / ``fps`` [num_layers, slots_per_rank] and a staged update. It
executes its RankPlan for real: receives read the sending peer's live slots (a dead peer
fails the transfer), fetches and relayed reads read the checkpoint's fingerprints, copies
read live or staged slots as the real executor does. Killing a worker loses its state.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

from actors.worker_group import Call, WorkerGroup, collect, is_typed
from elastic_ep.errors import PeerDiedError, TransferError, WorkerStartupError
from elastic_ep.plan import DST_SLOT, EXPERT, LAYER, SRC, SRC_SLOT
from elastic_ep.replies import Committed, Loaded, ServedLoad, SlotFingerprints, Staged, WorkerPing


class WorkerDied(Exception):
    """A call reached a worker whose process is gone."""


class FakeWorker:
    def __init__(self, wid: str, world: "FakeWorld"):
        self.wid, self.world = wid, world
        L, S = world.spec.num_layers, world.slots_per_rank
        self.rank: Optional[int] = None
        self.epoch = -1
        self.experts = np.full((L, S), -1, dtype=np.int64)
        self.fps = np.zeros((L, S), dtype=np.int64)
        self.staged: Optional[tuple[int, np.ndarray, np.ndarray]] = None  # (epoch, experts, fps)
        self.alive = True

    def ping(self) -> WorkerPing:
        return WorkerPing(worker_id=self.wid, rank=self.rank, epoch=self.epoch)

    def load(self, rank: int, experts: np.ndarray, epoch: int) -> Loaded:
        self.rank, self.epoch = rank, epoch
        self.experts = np.array(experts, dtype=np.int64)
        self.fps = np.take_along_axis(self.world.ckpt_fp, self.experts, axis=1)
        return Loaded(self.fps.copy(), bytes_read=self.experts.size * self.world.spec.expert_bytes)

    def execute(self, epoch, part, group, group_rank, timeout_s, backup_refs) -> Staged:
        w = self.world
        experts, fps = self.experts.copy(), self.fps.copy()
        received = 0
        for t in part.recvs:
            peer = w.serving(int(t[SRC]))
            if peer is None:
                raise PeerDiedError(f"rank {int(t[SRC])} died before sending to {self.wid}")
            experts[t[LAYER], t[DST_SLOT]] = peer.experts[t[LAYER], t[SRC_SLOT]]
            fps[t[LAYER], t[DST_SLOT]] = peer.fps[t[LAYER], t[SRC_SLOT]]
            received += w.spec.expert_bytes
        reads = [(l, e, s) for l, e, _, s in part.fetches.tolist()]
        reads += [(t[LAYER], t[EXPERT], t[DST_SLOT]) for t in part.relay_recvs.tolist()]
        for layer, expert, slot in reads:
            experts[layer, slot], fps[layer, slot] = expert, w.ckpt_fp[layer, expert]
        for layer, _, src, dst, after in part.copies.tolist():
            experts[layer, dst] = (experts if after else self.experts)[layer, src]
            fps[layer, dst] = (fps if after else self.fps)[layer, src]
        self.staged = (epoch, experts, fps)
        changed = np.argwhere((experts != self.experts) | (fps != self.fps) | (self.epoch < 0))
        return Staged(worker_id=self.wid, epoch=epoch,
                      staged=tuple((int(l), int(s), int(experts[l, s]), int(fps[l, s])) for l, s in changed),
                      bytes_received=received, bytes_from_checkpoint=len(reads) * w.spec.expert_bytes)

    def commit(self, epoch: int, rank: int, view=None) -> Committed:
        self.view = view
        if self.staged is not None:
            if self.staged[0] != epoch:
                raise TransferError(f"{self.wid} has staging for epoch {self.staged[0]}, not {epoch}")
            _, self.experts, self.fps = self.staged
        self.staged, self.rank, self.epoch = None, int(rank), int(epoch)
        return Committed(commit_s=0.0, slots=0)

    def discard(self, epoch: int) -> None:
        if self.staged is not None and self.staged[0] <= epoch:
            self.staged = None

    def retire(self) -> None:
        self.rank = None
        self.experts[:] = -1

    def fingerprints(self) -> SlotFingerprints:
        return SlotFingerprints(self.rank, self.epoch, self.experts.copy(), self.fps.copy())

    def take_load(self) -> ServedLoad:
        return ServedLoad(rank=self.rank, experts=self.experts.copy(), tokens=np.zeros(self.experts.shape))


class FakeWorld:
    """The processes that outlive a controller: what Ray's detached actors are to the real one."""

    def __init__(self, spec, slots_per_rank: int, ckpt_fp: np.ndarray):
        self.spec, self.slots_per_rank, self.ckpt_fp = spec, slots_per_rank, ckpt_fp
        self.procs: dict[str, FakeWorker] = {}
        self.free: Optional[dict[str, float]] = None  # what "Ray" says is free (None: no limit), GPUs by share
        self.group: Optional["FakeWorkerGroup"] = None  # the group of the controller alive now

    def serving(self, rank: int) -> Optional[FakeWorker]:
        """The live worker whose committed slots are rank ``rank``'s."""
        for p in self.procs.values():
            if p.alive and p.rank == rank:
                return p
        return None

    def runtime(self, state: Optional[dict]):
        """What Controller(runtime=...) calls: a worker group over these processes (records from ``state``)."""
        records = WorkerGroup.records_from(state["workers"]) if state else None
        self.group = FakeWorkerGroup(self, records, int(state["next_worker"]) if state else 0)
        return self.group, FakeComms(self.group, int(state["generation"]) + 1 if state else 0), None


class FakeWorkerGroup(WorkerGroup):
    def __init__(self, world: FakeWorld, records=None, next_worker: int = 0):
        super().__init__(records, next_worker)
        self.world = world

    def _spawn(self, wid: str, node: int, gpu_share: float) -> None:
        self.world.procs[wid] = FakeWorker(wid, self.world)

    def wait_started(self, wids: list[str], timeout_s: float) -> None:
        gone = [w for w in wids if not self.world.procs[w].alive]
        if gone:
            raise WorkerStartupError(f"workers {gone} did not start")

    def call_all(self, calls: dict[Any, Call], timeout_s: float, what: str, tolerate_dead: bool = False,
                 typed: Optional[list] = None) -> dict:
        out, errors, typed_errors = {}, [], []
        for key, (wid, method, args) in calls.items():
            proc = self.world.procs.get(wid)
            if proc is None or not proc.alive:
                self.mark_dead(wid)
                errors.append(f"{key}: actor died")
                continue
            try:
                out[key] = getattr(proc, method)(*args)
            except Exception as exc:  # noqa: BLE001 - sorted as the Ray group sorts them
                if is_typed(exc):
                    typed_errors.append((key, exc))
                else:
                    errors.append(f"{key}: {type(exc).__name__}: {exc}")
        return collect(out, errors, typed_errors, typed, what, tolerate_dead)

    def free_resources(self):
        return None if self.world.free is None else (dict(self.world.free), False)

    def ask(self, gpu_share: float, pinned: bool) -> dict[str, float]:
        return {"GPU": gpu_share}

    def submit(self, wid: str, method: str, *args):
        return self.call_all({wid: (wid, method, args)}, 1.0, method, tolerate_dead=True).get(wid)

    def handle(self, wid: str):
        return self.world.procs[wid]

    def kill(self, wid: str, restart: bool = False) -> None:
        """The process dies (SIGKILL): its state is gone. Noticed by the next call or probe."""
        self.world.procs[wid].alive = False

    def ping(self, wid: str, timeout_s: float) -> Optional[WorkerPing]:
        proc = self.world.procs.get(wid)
        return proc.ping() if proc is not None and proc.alive else None

    def probe(self, wids: list[str], timeout_s: float, restart_wait_s: float = 0.0) -> set[str]:
        for wid in wids:
            if self.ping(wid, timeout_s) is None:
                self.mark_dead(wid)
        return set()

    def reattach(self, wids: list[str]) -> None:
        for wid in wids:
            if wid not in self.world.procs or not self.world.procs[wid].alive:
                self.mark_dead(wid)


class FakeComms:
    """Communicator generations over the fake workers (every live worker in one group)."""

    def __init__(self, workers: FakeWorkerGroup, generation: int = 0):
        self.workers, self.generation, self.ok = workers, generation, True
        self.groups: dict[str, list[str]] = {}

    def form(self, exactly=None) -> float:
        self.generation += 1
        w = self.workers
        wids = sorted(exactly) if exactly is not None else sorted(w.live(list(w.members.values()) + w.spares))
        self.groups = {f"g{self.generation}": wids}
        self.ok = True
        return 0.0

    def group_for(self, wids: set) -> Optional[str]:
        return next((n for n, m in self.groups.items() if wids <= set(m)), None)

    def close(self) -> None:
        pass
