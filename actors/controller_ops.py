"""Controller operations beside reconfiguration: status views, verification, load statistics, drills."""

from __future__ import annotations

from typing import Optional

import numpy as np

from elastic_ep.errors import TransferError, UnknownRankError
from elastic_ep.faults import WORKER_PHASES
from elastic_ep.layout import ExpertLayout
from elastic_ep.status import BadSlot, ClusterStatus, CommittedView, VerifyResult
from elastic_ep.workload import check_counts


class ControllerOps:
    """Mixed into Controller: views of its state, what reads slots or load from the workers, drills.

    Uses the controller's ``workers`` (WorkerGroup), ``layout``, ``spec``, ``cfg``,
    ``window``, ``ref_fp``, ``faults`` and locks; decides nothing.
    """

    def status(self) -> ClusterStatus:
        """A snapshot of the cluster (see ClusterStatus for its fields)."""
        w = self.workers
        with self._state_lock:
            layout, members, spares = self.layout, w.members, w.spares
            prepared = self.backups.prepared(set(spares) | set(members.values())) if self.backups else {}
            return ClusterStatus(
                epoch=self.epoch, generation=self.comms.generation, ranks=dict(sorted(members.items())),
                spares=list(spares), dead=sorted(w.dead), lost=[tuple(k) for k in self.lost],
                unserved=self._unserved(layout), death_times=w.death_times(),
                backed_up=len(self.backups.backup_of) if self.backups else 0,
                spares_prepared={x: v for x, v in prepared.items() if x in spares},
                members_prepared={x: v for x, v in prepared.items() if x not in spares},
                node_ids=dict(getattr(getattr(w, "pins", None), "node_ids", {})), last_error=self.last_error,
                rank_nodes=self.rank_nodes, layout=layout.to_dict() if layout is not None else None,
                restarts=self.restarts, busy=self._busy.is_set(), load_reports=len(self.window),
                history=self.history[-10:], workers=w.to_list(),
                expert_format={t.name: [t.dtype, list(t.shape)] for t in self.spec.expert_format.tensors},
                shared_experts={"per_layer": self.spec.shared_experts, "managed": False},
            )

    def committed_view(self) -> CommittedView:
        """The layout in force now and the live worker of each rank (read-only; for serving engines)."""
        w = self.workers
        with self._state_lock:
            layout = self.layout
            live = {r: w.handle(x) for r, x in w.members.items() if not w.is_dead(x)}
            return CommittedView(epoch=self.epoch, phy2log=layout.phy2log.copy(), slots_per_rank=layout.slots_per_rank,
                                 workers=live, dead_ranks=tuple(sorted(r for r in w.members if r not in live)))

    def _unserved(self, layout: Optional[ExpertLayout]) -> list[tuple[int, int]]:
        """(layer, expert) pairs with no replica on a live member right now."""
        if layout is None:
            return []
        members = self.workers.members
        live = np.array([r in members and not self.workers.is_dead(members[r]) for r in layout.ranks], dtype=bool)
        held = layout.rank_view()[:, live, :].reshape(layout.num_layers, -1)
        covered = np.zeros((layout.num_layers, layout.num_experts), dtype=bool)
        covered[np.repeat(np.arange(layout.num_layers), held.shape[1]), held.ravel()] = True
        return [(int(l), int(e)) for l, e in np.argwhere(~covered)]

    def verify(self, against_checkpoint: bool = False) -> VerifyResult:
        """Fingerprint every live slot and compare with the reference (or a fresh read of the checkpoint)."""
        with self._lock:
            ref = self._checkpoint_fingerprints() if against_checkpoint else self.ref_fp
            w = self.workers
            calls = {r: (x, "fingerprints", ()) for r, x in w.members.items() if not w.is_dead(x)}
            got = w.call_all(calls, self.cfg.call_timeout_s, "fingerprints", tolerate_dead=True)
            bad, checked = [], 0
            for r, rep in got.items():
                want = self.layout.experts_of(r)
                if not np.array_equal(rep.experts, want):
                    diff = np.argwhere(rep.experts != want)[0]
                    bad.append(BadSlot(rank=r, layer=int(diff[0]), slot=int(diff[1]), why="wrong expert"))
                fp = rep.fingerprints
                for layer, slot in np.ndindex(want.shape):
                    checked += 1
                    if fp[layer, slot] != ref[layer, want[layer, slot]]:
                        bad.append(BadSlot(rank=r, layer=layer, slot=slot, why="fingerprint mismatch",
                                           expert=int(want[layer, slot])))
            missing = sorted(set(w.members) - set(got))
            return VerifyResult(ok=not bad and not missing, slots_checked=checked, bad=tuple(bad[:20]),
                                num_bad=len(bad), ranks_unreachable=tuple(missing), epoch=self.epoch)

    def _checkpoint_fingerprints(self) -> np.ndarray:
        from elastic_ep.checkpoint import CheckpointReader

        reader = CheckpointReader(self.cfg.checkpoint, self.spec, self.cfg.preset)

        def on_layer(done: int, total: int) -> None:
            self.progress["checkpoint"] = (done, total)

        return reader.fingerprints(on_layer)

    def report_load(self, load) -> None:
        """A serving engine's per-expert token counts for one interval: [num_layers, num_experts]."""
        self.window.add(check_counts(load, (self.spec.num_layers, self.spec.num_experts), "load"))

    def collect_load(self) -> Optional[np.ndarray]:
        """Pull the workers' per-slot token counts into the sliding window; returns the window total."""
        w = self.workers
        calls = {r: (x, "take_load", ()) for r, x in w.members.items() if not w.is_dead(x)}
        got = w.call_all(calls, self.cfg.call_timeout_s, "take_load", tolerate_dead=True)
        total = np.zeros((self.spec.num_layers, self.spec.num_experts))
        any_tokens = False
        for rep in got.values():
            if rep.tokens.sum() <= 0:
                continue
            any_tokens = True
            experts = rep.experts
            rows = np.repeat(np.arange(self.spec.num_layers), experts.shape[1])
            valid = experts.ravel() >= 0
            np.add.at(total, (rows[valid], experts.ravel()[valid]), rep.tokens.ravel()[valid])
        for rep in got.values():  # tokens served by slots before a commit changed what they hold
            carried = rep.expert_tokens
            if carried is not None and carried.sum() > 0:
                any_tokens = True
                total += carried
        if any_tokens:
            self.window.add(total)
        return self.window.total()

    def arm_controller_fault(self, phase: str, delay_s: float = 0.0) -> None:
        """Make this controller die when it next enters ``phase`` (a Step's value) of a reconfiguration."""
        self.faults.arm(phase, delay_s)

    def arm_worker_fault(self, rank_or_wid, phase: str, delay_s: float = 0.0) -> str:
        """Arm a worker to die at ``phase``. ``idle`` with no delay kills it now; this returns once it is dead."""
        if phase not in WORKER_PHASES:
            raise ValueError(f"unknown fault phase {phase!r}; known: {list(WORKER_PHASES)}")
        wid = self._resolve(rank_or_wid)
        now = phase == "idle" and delay_s <= 0
        w = self.workers
        gone = w.submit(wid, "watch") if now else None  # fails once this incarnation is gone
        w.call_all({wid: (wid, "arm_fault", (phase, delay_s))}, self.cfg.call_timeout_s, "arm_fault", tolerate_dead=now)
        if now:
            if not w.wait_gone(gone, self.cfg.call_timeout_s):
                raise TransferError(f"worker {wid} armed to die at once still lives after {self.cfg.call_timeout_s}s")
            w.mark_dead(wid)
        return wid

    def disarm_worker_faults(self, rank_or_wid=None) -> dict:
        """Disarm every fault still armed on one worker (or on all live ones); returns {worker id: phases}."""
        w = self.workers
        wids = [self._resolve(rank_or_wid)] if rank_or_wid is not None else w.live(list(w.members.values()) + w.spares)
        return w.call_all({x: (x, "disarm_fault", ()) for x in wids}, self.cfg.call_timeout_s, "disarm",
                          tolerate_dead=True)

    def _resolve(self, rank_or_wid) -> str:
        w = self.workers
        if isinstance(rank_or_wid, str):
            if rank_or_wid not in w.records:
                raise UnknownRankError(f"no worker {rank_or_wid!r}; workers: {sorted(w.records)}")
            return rank_or_wid
        if isinstance(rank_or_wid, bool) or not isinstance(rank_or_wid, (int, np.integer)):
            raise UnknownRankError(f"a rank is an int id (or a worker id str), got {rank_or_wid!r}")
        members = w.members
        if int(rank_or_wid) not in members:
            raise UnknownRankError(f"no rank {int(rank_or_wid)}; ranks: {sorted(members)}")
        return members[int(rank_or_wid)]

    def worker_handle(self, rank_or_wid):
        return self.workers.handle(self._resolve(rank_or_wid))

    def kill(self, rank_or_wid, no_restart: bool = True) -> str:
        """Kill a worker (chaos drills); returns its worker id once it is gone and marked dead."""
        wid = self._resolve(rank_or_wid)
        self.workers.kill(wid, restart=not no_restart)
        if no_restart:
            self.workers.mark_dead(wid)
        return wid
