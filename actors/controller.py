"""Controller actor: owns the committed layout and epoch; runs reconfigurations through the Step state machine."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Optional

import numpy as np

from elastic_ep.config import ClusterConfig, ModelSpec
from elastic_ep import metrics
from elastic_ep.decide import ClusterView, Decision, Request, decide
from elastic_ep.errors import ElasticEPError, TransferError, UnknownRankError, WorkerStartupError
from elastic_ep.faults import CONTROLLER_PHASES, FaultInjector
from elastic_ep.layout import ExpertLayout
from elastic_ep.report import RebalanceReport, ReportDraft, put_entry
from elastic_ep.workload import LoadWindow, check_counts

from .controller_lifecycle import ControllerLifecycle
from .controller_ops import ControllerOps
from .persistence import load_state
from .reconfigure import Reconfiguration, request_for
from .worker_group import WorkerGroup

log = logging.getLogger("elastic_ep.controller")

MAX_ATTEMPTS = 4  # re-plans after failures within one rebalance before giving up


def _now() -> float:
    return time.perf_counter()


class Controller(ControllerLifecycle, ControllerOps):
    """The brain of one elastic EP cluster.

    State (layout, epoch, the worker records, reference fingerprints) is written to
    ``state_dir`` after every commit and read back when the actor restarts, so a
    controller restart resumes where it left off (start-up, saving and resuming:
    ControllerLifecycle); workers and backup stores are detached named actors that outlive it.

    Commit protocol (what makes a reconfiguration atomic across a controller crash):
    every participant stages and every staged slot is verified; then the new layout,
    epoch and membership are written to the state file with ``pending_commit`` set
    (Step.PERSIST, the decision); then the workers commit. A controller that restarts
    before the decision finds the old layout and discards the staging (roll back); one
    that restarts after it finds the new layout and commits the staging (roll forward).
    Either way exactly one layout is in force and every slot of it verifies.

    ``runtime(saved state or None)`` gives (worker group, communicator groups, backups);
    on Ray unless given: unit tests hand in an in-process worker group and drive
    ``Reconfiguration`` step by step. ``fire`` is what a controller fault does (os._exit).
    """

    def __init__(self, cfg: ClusterConfig, state_dir: str, namespace_prefix: str, runtime=None, fire=None):
        self.cfg = cfg
        self.spec: ModelSpec = cfg.model
        self.prefix = namespace_prefix
        self.state_path = Path(state_dir) / "controller_state.json"
        self.faults = FaultInjector(CONTROLLER_PHASES, fire)
        self._lock = threading.RLock()  # serialises reconfigurations
        self._state_lock = threading.RLock()
        self.layout: Optional[ExpertLayout] = None
        self.epoch = 0  # version of the committed layout
        self.ref_fp: Optional[np.ndarray] = None  # [L, E] fingerprint of each logical expert
        self.window = LoadWindow(self.spec.num_layers, self.spec.num_experts, cfg.load_window)
        self.lost: list[tuple[int, int]] = []  # experts known to have no copy left anywhere
        self.last_error: Optional[str] = None  # why the last reconfiguration could not be done
        self.pending_commit: Optional[dict] = None  # {"epoch", "retired", "keep_spares", "report"} between decision and commit
        self.draining: set[int] = set()  # ranks a drain() is moving experts off
        self._blocked: Optional[frozenset] = None  # dead set for which recovery proved impossible
        self._replenish_due = False  # spares to restore (after a controller restart)
        self.history: list[dict] = []
        self._open_entry: Optional[int] = None  # history index of the running reconfiguration once it committed
        self.progress: dict[str, tuple[int, int]] = {}  # long step -> (done, total), read by drivers for bars
        self.restarts = 0
        self._busy = threading.Event()  # set while a reconfiguration runs
        state = load_state(self.state_path)
        self.workers: WorkerGroup
        self.workers, self.comms, self.backups = (runtime or self._ray_runtime)(state)
        if isinstance(getattr(self.workers, "progress", None), dict):
            self.progress = self.workers.progress  # one dict: the group's call counts and the checkpoint read
        self.monitor = None
        if state is not None:
            self._resume(state)

    def _ray_runtime(self, state: Optional[dict]):
        from elastic_ep.transport import register_backends

        from .backups import Backups
        from .communicators import CommunicatorGroups
        from .ray_workers import NodePins, RayWorkerGroup

        register_backends()
        cfg = self.cfg
        pins = NodePins({int(i): n for i, n in (state or {}).get("node_ids", {}).items()})
        records = WorkerGroup.records_from(state["workers"]) if state else None
        workers = RayWorkerGroup(cfg, self.prefix, pins, records, int(state["next_worker"]) if state else 0)
        # The generation moves on after a restart: the old store died with the old controller.
        comms = CommunicatorGroups(workers, self.prefix, cfg.transfer_timeout_s, cfg.call_timeout_s,
                                   int(state["generation"]) + 1 if state else 0)
        return workers, comms, Backups(cfg, self.prefix, workers, pins)

    # -- views of the state --------------------------------------------------------------------

    @property
    def rank_nodes(self) -> dict[int, int]:
        """rank -> logical node, from the committed layout alone."""
        return {} if self.layout is None else dict(zip(self.layout.ranks, self.layout.rank_nodes))

    @property
    def striping(self) -> bool:
        """Whether storage reads are shared with (and relayed by) live ranks on the destination's node."""
        return self.cfg.device == "cuda" if self.cfg.stripe_fetches is None else bool(self.cfg.stripe_fetches)

    def view(self, restarted: frozenset = frozenset(), running: Optional[Request] = None) -> ClusterView:
        """What decide() needs to know, from this controller's state (a snapshot).

        ``running``: the request being carried out (a drain does not count itself as already draining).
        ``startable``: how many workers Ray has room for (WorkerGroup.room), so that decide()
        refuses a start that cannot be placed instead of waiting ``startup_timeout_s`` for it.
        """
        cfg, w = self.cfg, self.workers
        startable, note = w.room(len(w.members) + cfg.num_spares + (running.add if running is not None else 0),
                                 cfg.gpu_fractions)
        with self._state_lock:
            return ClusterView(
                members=w.members, rank_nodes=self.rank_nodes, spares=tuple(w.spares), dead=w.dead,
                num_experts=self.spec.num_experts, slots_per_rank=cfg.slots_per_rank, num_spares=cfg.num_spares,
                num_nodes=cfg.num_nodes, ranks_per_node=max(1, cfg.num_ranks // cfg.num_nodes),
                layout_ranks=tuple(self.layout.ranks), restarted=frozenset(restarted),
                draining=frozenset(self.draining - set(running.ranks if running is not None else ())),
                startable=startable, startable_note=note,
            )

    def start_worker(self, node: int) -> str:
        """Start one worker on logical ``node`` and wait for it; a spare until a commit makes it a member.

        One that does not start in time is killed (never left half-started) and
        WorkerStartupError is raised.
        """
        w = self.workers
        wid = w.spawn(node, self.cfg.gpu_fractions)
        try:
            w.wait_started([wid], self.cfg.startup_timeout_s)
        except WorkerStartupError:
            w.kill(wid, restart=True)
            w.forget(wid)
            raise
        with self._state_lock:
            w.set_spares(w.spares + [wid])
        return wid

    def _record_membership(self) -> None:
        w = self.workers
        metrics.record_membership(self.prefix, self.epoch, dict(w.members), w.spares, w.dead)

    def _mark_dead(self, wid: str) -> bool:
        """The health monitor's death callback: record it in the worker group, then in the metrics."""
        if self.workers.mark_dead(wid):
            self._record_membership()
            return True
        return False

    # -- watching ------------------------------------------------------------------------------

    def _start_monitor(self) -> None:
        if self.monitor is None:
            from .monitor import HealthMonitor

            self.monitor = HealthMonitor(self._watched, self._mark_dead, self._maybe_recover)
        self.monitor.start()

    def _watched(self) -> dict:
        w = self.workers
        with self._state_lock:
            wids = w.live(list(w.members.values()) + w.spares)
        return {x: w.handle(x) for x in wids if x in getattr(w, "handles", {})}

    def _maybe_recover(self) -> None:
        if self.cfg.auto_recover and not self._busy.is_set() and self._needs_recovery() and not self._is_blocked():
            self._busy.set()  # claimed here so that one death starts one recovery thread
            threading.Thread(target=self._auto_recover, daemon=True).start()

    def _is_blocked(self) -> bool:
        """True while recovery was proven impossible (CapacityError, ExpertsLostError) and no worker died since."""
        with self._state_lock:
            return self._blocked is not None and self._blocked == self.workers.dead

    def _auto_recover(self) -> None:
        try:
            self.recover()  # clears _busy when done
        except Exception as exc:  # noqa: BLE001 - the next call or watch event retries
            log.warning("automatic recovery failed: %s", exc)
            self._busy.clear()
            time.sleep(1.0)

    def _needs_recovery(self) -> bool:
        w = self.workers
        with self._state_lock:
            return any(w.is_dead(x) for x in list(w.members.values()) + w.spares) or self._replenish_due

    # -- what the steps call back ------------------------------------------------------------------

    def install(self, layout: ExpertLayout, epoch: int, members: dict, spares: list, pending: dict) -> None:
        """Step.PERSIST: the new layout, epoch and membership, written with ``pending_commit`` (the decision)."""
        w = self.workers
        with self._state_lock:
            prev = (self.layout, self.epoch, w.members, w.spares, self.lost)
            self.layout, self.epoch, self.lost, self.pending_commit = layout, epoch, [], pending
            w.set_members(members)
            w.set_spares(spares)
        try:
            self.save()
        except OSError:
            with self._state_lock:
                self.layout, self.epoch, _, _, self.lost = prev
                w.set_members(prev[2])
                w.set_spares(prev[3])
                self.pending_commit = None
            raise

    def record_commit(self, draft: ReportDraft) -> None:
        """Step.COMMIT: the report so far goes on record with the commit's save.

        A controller that dies after a commit but before the reconfiguration returns (while
        replenishing spares, say) thus leaves the change in ``history``; ``_finish`` puts the
        whole report in its place.
        """
        with self._state_lock:
            self._open_entry = put_entry(self.history, self._open_entry, draft.freeze().to_dict())

    def settle_retired(self, retired: list[str], keep: Optional[list[str]] = None) -> None:
        """Retired workers in ``keep`` (the decision's) refill the spares; the rest are released (killed).

        ``keep`` None (a state file of an older version): up to ``num_spares`` are kept.
        """
        w = self.workers
        with self._state_lock:
            if keep is None:
                keep = retired[: max(0, self.cfg.num_spares - len(w.live(w.spares)))]
            w.set_spares(w.spares + [x for x in retired if x in keep])
            self.pending_commit = None
        for wid in retired:
            if wid not in keep:
                w.release(wid)

    def set_lost(self, lost: list) -> None:
        with self._state_lock:
            self.lost = list(lost)

    def backup_refs(self, keys: list) -> dict:
        return self.backups.refs(keys) if self.backups is not None else {}

    def refresh_balance(self, rep: ReportDraft, old: ExpertLayout, new: ExpertLayout, load: np.ndarray) -> None:
        """The report's balance (mean over layers of max/mean rank load) before and after."""
        for name, layout in (("before", old), ("after", new)):
            rl = layout.rank_loads(load)
            rep.balance[name] = float((rl.max(axis=1) / np.maximum(rl.mean(axis=1), 1e-12)).mean())

    def after_commit(self, rep: ReportDraft, decision: Decision) -> None:
        """Step.REPLENISH: refill the spare pool to ``num_spares`` (always), re-form communicators, restore backups."""
        cfg, w = self.cfg, self.workers
        with self._state_lock:
            dead_spares = w.forget_dead_spares()
        nodes = list(decision.spare_starts)
        changed = bool(decision.changes_membership or dead_spares or nodes)
        while len(w.spares) < cfg.num_spares:
            node = nodes.pop(0) if nodes else len(w.spares) % cfg.num_nodes
            try:
                self.start_worker(node)
            except WorkerStartupError as exc:
                rep.notes.append(f"could not start a new spare: {exc}")
                break
        if changed:
            try:
                self.comms.form()
            except Exception as exc:  # noqa: BLE001 - a failed formation is re-tried by the next plan
                self.comms.ok = False
                rep.notes.append(f"communicators not re-formed: {exc}")
        missing = []
        if cfg.keep_backups and self.backups is not None:
            if changed:
                self.backups.drop_dead_stores()  # backups whose store died (with its node) are made again
            missing = self.backups.missing()
            if missing:
                try:
                    self.backups.make(self.layout, w.members, self.rank_nodes, missing)
                except ElasticEPError as exc:
                    rep.notes.append(f"backups not restored: {exc}")
        if changed or missing:
            self._prepare_spares()
        self.save()

    def _prepare_spares(self) -> None:
        if self.backups is not None:
            self.backups.prepare(self.workers.spares, list(self.workers.members.values()), self.striping)

    # -- the reconfiguration loop ------------------------------------------------------------------

    def reconfigure(self, reason: str, add: int = 0, remove: Optional[list[int]] = None,
                    load: Optional[np.ndarray] = None, layers_per_step: Optional[int] = None) -> RebalanceReport:
        """Attempts until one commits. Transient failures (a death, a timeout) re-plan; typed ones end it.

        A typed failure (CapacityError, ExpertsLostError, CheckpointError, ...) cannot be
        fixed by trying again: the previous layout stays in force, the error is recorded
        in ``status().last_error`` and raised, and automatic recovery pauses until
        another worker dies or a caller asks again.
        """
        from ray.exceptions import GetTimeoutError, RayError

        with self._lock:
            self._busy.set()
            try:
                t_start, started_at = _now(), time.time()
                death_time = self.workers.first_death
                failures: list[str] = []
                request = request_for(reason, add, remove)
                for attempt in range(1, MAX_ATTEMPTS + 1):
                    try:
                        report = Reconfiguration(self, request, attempt, load, layers_per_step).run()
                    except (TransferError, RayError, GetTimeoutError) as exc:
                        failures.append(f"attempt {attempt}: {type(exc).__name__}: {exc}")
                        log.warning("reconfiguration attempt %d failed: %s", attempt, exc)
                        self.comms.ok = False  # an exchange may have failed: its groups are broken
                        self.discard_all()
                        continue
                    except ElasticEPError as exc:
                        self.discard_all()
                        with self._state_lock:
                            self.last_error = f"{reason}: {type(exc).__name__}: {exc}"
                            self._blocked = self.workers.dead
                        self.save()
                        metrics.record_failure(self.prefix, reason, exc, _now() - t_start)
                        raise
                    return self._finish(report, failures, t_start, started_at, death_time)
                with self._state_lock:
                    self.last_error = (f"{reason} failed after {MAX_ATTEMPTS} attempts: "
                                       f"{failures[-1] if failures else ''}")
                metrics.record_failure(self.prefix, reason, "TransferError", _now() - t_start)
                raise TransferError(f"{reason} failed after {MAX_ATTEMPTS} attempts: " + "; ".join(failures))
            finally:
                self._open_entry = None
                self._busy.clear()

    def _finish(self, draft: ReportDraft, failures: list, t_start: float, started_at: float,
                death_time: Optional[float]) -> RebalanceReport:
        with self._state_lock:
            self.last_error = None
            self._blocked = None
            self._replenish_due = False
        draft.failures = failures
        draft.total_s = _now() - t_start
        if death_time is not None and draft.reason == "recover" and draft.since_death_s is None:
            draft.since_death_s = time.time() - death_time
        draft.started_at, draft.finished_at = started_at, time.time()
        self.workers.first_death = None
        report = draft.freeze()
        with self._state_lock:
            put_entry(self.history, self._open_entry, report.to_dict())  # reconfigure() clears _open_entry
        self.save()
        metrics.record_reconfiguration(self.prefix, report)
        return report

    def discard_all(self) -> None:
        w = self.workers
        calls = {x: (x, "discard", (self.epoch + 1,)) for x, rec in w.records.items() if rec.state.value == "live"}
        w.call_all(calls, self.cfg.call_timeout_s, "discard", tolerate_dead=True)

    # -- public operations -------------------------------------------------------------------------

    def rebalance(self, load=None, layers_per_step: Optional[int] = None) -> RebalanceReport:
        """Re-place experts by ``load`` [num_layers, num_experts] or the recorded window (healing dead ranks too).

        Reconfigurations run one at a time: a second call waits for the first to
        finish, then collects the load and plans from the layout the first committed.
        layers_per_step: MoE layers migrated per commit (None: the config's; 0: all at once).
        """
        if layers_per_step is not None and (isinstance(layers_per_step, bool) or
                                            not isinstance(layers_per_step, (int, np.integer)) or layers_per_step < 0):
            raise ValueError(f"layers_per_step must be an int >= 0, got {layers_per_step!r}")
        if load is not None:
            load = check_counts(load, (self.spec.num_layers, self.spec.num_experts), "load")
        with self._lock:
            if load is None:
                self.collect_load()
            return self.reconfigure("rebalance", load=load, layers_per_step=layers_per_step)

    def recover(self) -> RebalanceReport:
        """Heal dead ranks and spares now (see elastic_ep.decide for who takes what)."""
        return self.reconfigure("recover")

    def grow(self, num_ranks: int = 1) -> RebalanceReport:
        if isinstance(num_ranks, bool) or not isinstance(num_ranks, (int, np.integer)) or num_ranks <= 0:
            raise ValueError(f"grow needs num_ranks >= 1, got {num_ranks!r}")
        return self.reconfigure("grow", add=int(num_ranks))

    def _check_ranks(self, ranks) -> list[int]:
        members = self.workers.members
        for r in ranks:
            if isinstance(r, bool) or not isinstance(r, (int, np.integer)) or int(r) not in members:
                raise UnknownRankError(f"no rank {r!r}; ranks: {sorted(members)}")
        return sorted({int(r) for r in ranks})

    def shrink(self, ranks: list[int]) -> RebalanceReport:
        """Retire ``ranks``: their experts move to the rest; their workers refill the spares or are released."""
        if not ranks:
            raise ValueError("shrink needs at least one rank")
        remove = self._check_ranks(ranks)
        decide(self.view(), Request("shrink", ranks=tuple(remove)))  # refusals raise before anything moves
        return self.reconfigure("shrink", remove=remove)

    def drain(self, rank: int) -> RebalanceReport:
        """Move a live rank's experts off it, commit, then release its worker.

        Returns the report; its ``safe_to_terminate_at`` (wall clock) says from when the
        released process (and its node, if nothing else runs there) may be terminated.
        Refused (CapacityError, with the numbers) for the last rank, a rank already
        draining, a dead rank, or when the other ranks cannot hold every expert.
        """
        (rank,) = self._check_ranks([rank])
        with self._state_lock:
            decide(self.view(), Request("drain", ranks=(rank,)))  # refusals raise before anything moves
            self.draining.add(rank)
        try:
            return self.reconfigure("drain", remove=[rank])
        finally:
            with self._state_lock:
                self.draining.discard(rank)

    def shutdown(self) -> None:
        if self.monitor is not None:
            self.monitor.stop()
        self.workers.shutdown()
        if self.backups is not None:
            self.backups.shutdown()
        self.comms.close()


def controller_actor_class():
    """The Controller as a Ray actor class; a sliver of a CPU makes Ray keep its soft node affinity."""
    import ray

    from .ray_workers import PIN_CPUS

    return ray.remote(num_cpus=PIN_CPUS, max_concurrency=16, max_restarts=-1, max_task_retries=0)(Controller)
