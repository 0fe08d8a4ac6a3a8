"""Controller start-up and resume: the first layout loaded from the checkpoint, the state file, a restart's roll forward or back."""

from __future__ import annotations

import logging
import time
from dataclasses import asdict

import numpy as np

from elastic_ep.balance import rebalance_experts
from elastic_ep.errors import CapacityError, VerificationError
from elastic_ep.layout import ExpertLayout
from elastic_ep.report import resume_history
from elastic_ep.status import StartReport

from .persistence import check_checkpoint, save_state

log = logging.getLogger("elastic_ep.controller")


def _now() -> float:
    return time.perf_counter()


class ControllerLifecycle:
    """Mixed into Controller: start-up, ``save`` after every change, and ``_resume`` after a restart.

    The state file holds everything needed to resume (layout, epoch, worker records, reference
    fingerprints, backups, ``pending_commit``); see Controller's "Commit protocol" for why a
    restart rolls a decided reconfiguration forward and an undecided one back.
    """

    def start(self) -> StartReport:
        """Start workers, spares and backup stores; load the first layout from the checkpoint."""
        with self._lock:
            if self.layout is not None:
                return StartReport(resumed=True)
            t0 = _now()
            cfg, w = self.cfg, self.workers
            check_checkpoint(cfg)
            need = cfg.num_ranks + cfg.num_spares
            fit, why = w.room(need, cfg.gpu_fractions)
            if fit is not None and fit < need:  # refused at once, not after startup_timeout_s
                raise CapacityError(f"{cfg.num_ranks} ranks and {cfg.num_spares} spares need {need} workers but only "
                                    f"{fit} can be placed: {why}")
            per_node = cfg.num_ranks // cfg.num_nodes
            ranks = list(range(cfg.num_ranks))
            rank_nodes = {r: r // per_node for r in ranks}
            w.set_members({r: w.spawn(rank_nodes[r], cfg.gpu_fractions) for r in ranks})
            w.set_spares([w.spawn(k % cfg.num_nodes, cfg.gpu_fractions) for k in range(cfg.num_spares)])
            w.wait_started(list(w.members.values()) + w.spares, cfg.startup_timeout_s)
            uniform = np.ones((self.spec.num_layers, self.spec.num_experts))
            self.layout = rebalance_experts(
                uniform, ranks, cfg.slots_per_rank, rank_nodes=[rank_nodes[r] for r in ranks],
                num_groups=self.spec.num_groups, policy="eplb",
            )
            t_load = _now()
            calls = {r: (wid, "load", (r, self.layout.experts_of(r), self.epoch)) for r, wid in w.members.items()}
            reports = w.call_all(calls, cfg.startup_timeout_s, "load")
            self._set_reference(reports)
            load_s = _now() - t_load
            t_b = _now()
            backup_bytes = self.backups.make(self.layout, w.members, self.rank_nodes) if cfg.keep_backups else 0
            backup_s = _now() - t_b
            group_s = self.comms.form()
            self._prepare_spares()
            self.save()
            self._start_monitor()
            return StartReport(start_s=_now() - t0, load_s=load_s, backup_s=backup_s, backup_bytes=int(backup_bytes),
                               group_s=group_s, checkpoint_bytes=int(sum(rep.bytes_read for rep in reports.values())))

    def _set_reference(self, reports: dict) -> None:
        """Reference fingerprint per logical expert from the start-up loads; replicas must agree."""
        ref = np.zeros((self.spec.num_layers, self.spec.num_experts), dtype=np.int64)
        seen = np.zeros_like(ref, dtype=bool)
        for r, rep in reports.items():
            experts = self.layout.experts_of(r)
            fps = rep.fingerprints
            for layer, slot in np.ndindex(experts.shape):
                e = experts[layer, slot]
                if seen[layer, e] and ref[layer, e] != fps[layer, slot]:
                    raise VerificationError(
                        f"replicas of expert {e} in layer {layer} differ right after loading the checkpoint")
                ref[layer, e] = fps[layer, slot]
                seen[layer, e] = True
        self.ref_fp = ref

    def save(self) -> None:
        """Persist everything needed to resume (atomic rename)."""
        with self._state_lock:
            state = {
                "cfg": {**asdict(self.cfg), "model": asdict(self.spec)},
                "layout": self.layout.to_dict() if self.layout is not None else None,
                "epoch": self.epoch,
                "generation": self.comms.generation,
                "workers": self.workers.to_list(),
                "next_worker": self.workers.next_worker,
                "ref_fp": self.ref_fp.tolist() if self.ref_fp is not None else None,
                "backups": self.backups.to_dict() if self.backups is not None else None,
                "node_ids": {str(i): n for i, n in getattr(getattr(self.workers, "pins", None), "node_ids", {}).items()},
                "pending_commit": self.pending_commit,
                "lost": [list(k) for k in self.lost],
                "last_error": self.last_error,
                "history": self.history[-50:],
                "restarts": self.restarts,
            }
        save_state(self.state_path, state)
        self._record_membership()

    def _resume(self, state: dict) -> None:
        """Rebuild state after a controller restart; reattach to detached workers by name.

        Never raises for a dead worker or a failed group (an exception in ``__init__``
        would end the actor for good): what cannot be reattached is marked dead, and the
        monitor heals it. A decided reconfiguration is rolled forward, an undecided one back.
        """
        w, cfg = self.workers, self.cfg
        self.layout = ExpertLayout.from_dict(state["layout"]) if state["layout"] else None
        self.epoch = int(state["epoch"])
        self.ref_fp = np.asarray(state["ref_fp"], dtype=np.int64) if state["ref_fp"] is not None else None
        self.pending_commit = state.get("pending_commit")
        self.lost = [tuple(x) for x in state["lost"]]
        self.last_error = state.get("last_error")
        self.history = state["history"]
        self.restarts = int(state.get("restarts", 0)) + 1
        w.reattach([x for x, rec in w.records.items() if rec.state.value == "live"])
        if self.backups is not None and state.get("backups"):
            self.backups.restore(state["backups"])
        live = [x for x, rec in w.records.items() if rec.state.value == "live"]
        if self.pending_commit is not None:
            # The decision was written: the new layout is in force. Workers that staged it
            # commit now (a second commit of one epoch is a no-op); one that cannot is dead.
            epoch = int(self.pending_commit["epoch"])
            resume_history(self.history, self.pending_commit.get("report"), epoch)
            view = self.committed_view()
            calls = {r: (x, "commit", (epoch, r, view)) for r, x in w.members.items() if x in live}
            w.call_all(calls, cfg.call_timeout_s, "commit (resume)", tolerate_dead=True)
            retired = [x for x in self.pending_commit.get("retired", []) if x in live]
            done = w.call_all({x: (x, "retire", ()) for x in retired}, cfg.call_timeout_s, "retire (resume)",
                              tolerate_dead=True)
            self.settle_retired([x for x in retired if x in done and x not in w.spares],
                                self.pending_commit.get("keep_spares"))
            self.pending_commit = None
        else:
            resume_history(self.history, None, None)
            # A reconfiguration the old controller left undecided is dropped: live weights never changed.
            calls = {x: (x, "discard", (self.epoch + 1,)) for x in live}
            w.call_all(calls, cfg.call_timeout_s, "discard (resume)", tolerate_dead=True)
        self._replenish_due = len(w.live(w.spares)) < cfg.num_spares
        if self.layout is not None:
            try:
                self.comms.form()
            except Exception as exc:  # noqa: BLE001 - never raise in __init__; the next attempt re-forms
                log.warning("communicators not re-formed on resume: %s", exc)
                self.comms.ok = False
            self.save()
            self._start_monitor()
