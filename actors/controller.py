"""Controller actor: owns layout, membership and epoch; watches workers; plans, orchestrates and commits moves."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import numpy as np
import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayError

from elastic_ep.balance import rebalance_experts
from elastic_ep.config import ClusterConfig, ModelSpec
from elastic_ep.decide import REQUESTS, ClusterView, Decision, Request, decide, layout_for
from elastic_ep.errors import (
    CapacityError,
    CheckpointError,
    ElasticEPError,
    ExpertsLostError,
    TransferError,
    UnknownRankError,
    VerificationError,
    WorkerStartupError,
)
from elastic_ep.faults import CONTROLLER_PHASES, FaultInjector
from elastic_ep.layout import ExpertLayout
from elastic_ep.plan import plan_transfers
from elastic_ep.report import RebalanceReport
from elastic_ep.workload import LoadWindow, check_counts, slot_counts_to_logical

log = logging.getLogger("elastic_ep.controller")

MAX_ATTEMPTS = 4  # re-plans after failures within one rebalance before giving up
# Ray 2.60 ignores a soft NodeAffinitySchedulingStrategy for an actor that requests no resources
# (measured on a 3-node local cluster: num_cpus=0 actors landed on other nodes, 0.01 CPU honoured
# it); pinned CPU actors therefore ask for this sliver of a CPU.
PIN_CPUS = 0.001
STATE_VERSION = 2  # controller_state.json: 2 adds pending_commit, backup store names, node pins


def _now() -> float:
    return time.perf_counter()


class Controller:
    """The brain of one elastic EP cluster.

    State (layout, epoch, membership, reference fingerprints) is written to
    ``state_dir`` after every commit and read back when the actor restarts, so a
    controller restart resumes where it left off; workers and backup stores are
    detached named actors that outlive it.

    Commit protocol (what makes a reconfiguration atomic across a controller crash):
    every participant stages and every staged slot is verified; then the new layout,
    epoch and membership are written to the state file with ``pending_commit`` set
    (the decision); then the workers commit. A controller that restarts before the
    decision finds the old layout and discards the staging (roll back); one that
    restarts after it finds the new layout and commits the staging (roll forward).
    Either way exactly one layout is in force and every slot of it verifies.
    """

    def __init__(self, cfg: ClusterConfig, state_dir: str, namespace_prefix: str):
        from elastic_ep.transport import StoreServer, register_backends

        register_backends()
        self.cfg = cfg
        self.spec: ModelSpec = cfg.model
        self.prefix = namespace_prefix
        self.state_path = Path(state_dir) / "controller_state.json"
        self.store = StoreServer()
        self.faults = FaultInjector(CONTROLLER_PHASES)
        self._lock = threading.RLock()  # serialises reconfigurations
        self._state_lock = threading.RLock()
        self.layout: Optional[ExpertLayout] = None
        self.epoch = 0
        self.generation = 0  # communicator generation (group name suffix)
        self.members: dict[int, str] = {}  # rank id -> worker id
        self.spares: list[str] = []
        self.preparing: dict = {}  # spare worker id -> ObjectRef of its prepare_backups call
        self.draining: set[int] = set()  # ranks a drain() is moving experts off
        self.released: set[str] = set()  # workers a shrink let go (not spares, not failures)
        self.dead: set[str] = set()
        self.handles: dict[str, ray.actor.ActorHandle] = {}
        self.gpu_share: dict[str, float] = {}  # worker id -> GPUs it was started with
        self._share_reused: set[str] = set()  # dead workers whose GPU share a new worker took
        self.groups: dict[str, list[str]] = {}  # group name -> worker ids in group-rank order
        self.device_of: dict[str, str] = {}  # worker id -> "node:gpus" (two members of one NCCL group never share a GPU)
        self.next_worker = 0
        self.ref_fp: Optional[np.ndarray] = None  # [L, E] fingerprint of each logical expert
        self.window = LoadWindow(self.spec.num_layers, self.spec.num_experts, cfg.load_window)
        self.backup_stores: list = []
        self.backup_names: list[str] = []  # actor name of each logical node's backup store
        self.next_store = 0  # backup stores started so far (names are never reused)
        self.backup_of: dict[tuple[int, int], int] = {}  # (layer, expert) -> store index
        self.node_ids: dict[int, str] = {}  # logical node -> the Ray node it is pinned to
        self.lost: list[tuple[int, int]] = []  # experts known to have no copy left anywhere
        self.last_error: Optional[str] = None  # why the last reconfiguration could not be done
        self.pending_commit: Optional[dict] = None  # {"epoch", "retired"} between decision and commit
        self._group_ok = True  # False once an attempt failed: the current groups may be broken
        self._blocked: Optional[frozenset] = None  # dead set for which recovery proved impossible
        self._replenish_due = False  # spares to restore (after a controller restart)
        self.history: list[dict] = []
        self.restarts = 0
        self._stop = threading.Event()
        self._monitor: Optional[threading.Thread] = None
        self._busy = threading.Event()  # set while a reconfiguration runs
        self._restarted: set[str] = set()
        self._death_time: Optional[float] = None
        self.death_times: dict[str, float] = {}  # worker id -> wall time its death was noticed
        if self.state_path.exists():
            self._resume()

    # ------------------------------------------------------------------------------------
    # start-up, persistence, resume
    # ------------------------------------------------------------------------------------

    def _worker_name(self, wid: str) -> str:
        return f"{self.prefix}-{wid}"

    def _new_worker(self, node_index: int):
        from actors.worker import worker_actor_class

        wid = f"w{self.next_worker}"
        self.next_worker += 1
        cls = worker_actor_class(self.cfg.device)
        opts = dict(name=self._worker_name(wid), lifetime="detached", max_restarts=self.cfg.max_restarts)
        if self.cfg.device == "cuda":
            opts["num_gpus"] = self._gpu_share_for(wid)
        strategy = self._node_strategy(node_index)
        if strategy is not None:
            opts["scheduling_strategy"] = strategy
            if self.cfg.device != "cuda":
                opts["num_cpus"] = PIN_CPUS
        handle = cls.options(**opts).remote(
            wid, self.spec, self.cfg.slots_per_rank, self.cfg.device, self.cfg.checkpoint, self.cfg.preset,
            self.cfg.staging_reserve,
        )
        self.handles[wid] = handle
        return wid

    def _gpu_share_for(self, wid: str) -> float:
        """GPUs for a new worker: its configured fraction at start; later, the share a dead
        worker left free (so a replacement spare lands where the dead one was), else one GPU."""
        fractions = self.cfg.gpu_fractions
        index = int(wid[1:])
        if fractions is not None and index < len(fractions):
            share = float(fractions[index])
        else:
            freed = [w for w in sorted(self.dead) if w in self.gpu_share and w not in self._share_reused]
            share = self.gpu_share[freed[0]] if freed else 1.0
            if freed:
                self._share_reused.add(freed[0])
        self.gpu_share[wid] = share
        return share

    def _ray_nodes(self) -> list[str]:
        return sorted(n["NodeID"] for n in ray.nodes() if n.get("Alive"))

    def _node_strategy(self, node_index: int):
        """Pin logical node i to one alive Ray node (soft) when the cluster has several.

        The first time, logical node i gets the i-th alive Ray node; the pin then stays,
        so when a Ray node dies only its own logical node moves (to an alive node no other
        logical node uses, if there is one) and the others keep their machines.
        """
        nodes = self._ray_nodes()
        if len(nodes) <= 1:
            return None
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        node = self.node_ids.get(node_index)
        if node not in nodes:
            used = {n for i, n in self.node_ids.items() if i != node_index and n in nodes}
            free = [n for n in nodes if n not in used]
            node = free[0] if free and node_index in self.node_ids else nodes[node_index % len(nodes)]
            self.node_ids[node_index] = node
        return NodeAffinitySchedulingStrategy(node, soft=True)

    def start(self) -> dict:
        """Start workers, spares and backup stores; load the first layout from the checkpoint."""
        with self._lock:
            if self.layout is not None:
                return self.status()
            t0 = _now()
            cfg = self.cfg
            self._check_checkpoint()
            per_node = cfg.num_ranks // cfg.num_nodes
            ranks = list(range(cfg.num_ranks))
            rank_nodes = {r: r // per_node for r in ranks}
            for r in ranks:
                self.members[r] = self._new_worker(rank_nodes[r])
            for k in range(cfg.num_spares):
                self.spares.append(self._new_worker(k % cfg.num_nodes))
            self._wait_started(list(self.members.values()) + self.spares)
            uniform = np.ones((self.spec.num_layers, self.spec.num_experts))
            self.layout = rebalance_experts(
                uniform, ranks, cfg.slots_per_rank, rank_nodes=[rank_nodes[r] for r in ranks],
                num_groups=self.spec.num_groups, policy="eplb",
            )
            t_load = _now()
            refs = {
                r: self.handles[wid].load.remote(r, self.layout.experts_of(r), self.epoch)
                for r, wid in self.members.items()
            }
            reports = self._get_all(refs, cfg.startup_timeout_s, "load")
            self._set_reference(reports)
            load_s = _now() - t_load
            t_b = _now()
            backup_bytes = self._make_backups() if cfg.keep_backups else 0
            backup_s = _now() - t_b
            t_g = _now()
            self._form_group()
            group_s = _now() - t_g
            self._prepare_spares()
            self._save()
            self._start_monitor()
            return {
                "start_s": _now() - t0,
                "load_s": load_s,
                "backup_s": backup_s,
                "backup_bytes": backup_bytes,
                "group_s": group_s,
                "checkpoint_bytes": int(sum(rep["bytes_read"] for rep in reports.values())),
            }

    def _check_checkpoint(self) -> None:
        """Fail before starting any worker if the checkpoint cannot give every expert.

        Reads only headers: the index and every shard it names (missing, truncated or
        corrupted files, names escaping the folder), and each expert tensor's presence,
        shape and dtype against the model spec. Raises CheckpointError naming the value.
        """
        from safetensors import safe_open

        from elastic_ep.storage import CheckpointReader

        if self.cfg.checkpoint is None:
            raise CheckpointError("ClusterConfig.checkpoint is None: the first weights are loaded from a checkpoint")
        spec = self.spec
        reader = CheckpointReader(self.cfg.checkpoint, spec, self.cfg.preset)
        reader.validate()  # every expert tensor is named by the index
        want_dtype = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}[spec.dtype]
        shapes = ((spec.intermediate, spec.hidden), (spec.intermediate, spec.hidden), (spec.hidden, spec.intermediate))
        by_file: dict[str, list] = {}
        for layer in range(spec.num_layers):
            for expert in range(spec.num_experts):
                for name, shape in zip(reader.preset.tensor_names(spec.first_layer + layer, expert), shapes):
                    by_file.setdefault(reader.weight_map[name], []).append((name, shape))
        for file, tensors in sorted(by_file.items()):
            try:
                with safe_open(str(reader.paths[file]), framework="pt", device="cpu") as f:
                    present = set(f.keys())
                    for name, shape in tensors:
                        if name not in present:
                            raise CheckpointError(f"tensor {name!r} is listed in the index but missing from {file!r}")
                        sl = f.get_slice(name)
                        got_shape, got_dtype = tuple(sl.get_shape()), sl.get_dtype()
                        if got_shape != shape:
                            raise CheckpointError(f"tensor {name!r} in {file!r} has shape {got_shape}, the model "
                                                  f"spec needs {shape}")
                        if got_dtype != want_dtype:
                            raise CheckpointError(f"tensor {name!r} in {file!r} has dtype {got_dtype}, the model "
                                                  f"spec needs {want_dtype} ({spec.dtype})")
            except CheckpointError:
                raise
            except Exception as exc:  # safetensors' own errors: truncated, corrupted header, unreadable
                raise CheckpointError(f"cannot read shard {file!r} in {str(reader.root)!r} (truncated or "
                                      f"corrupted?): {type(exc).__name__}: {exc}") from exc

    @property
    def rank_nodes(self) -> dict[int, int]:
        """rank -> logical node, from the committed layout alone."""
        if self.layout is None:
            return {}
        return dict(zip(self.layout.ranks, self.layout.rank_nodes))

    def _view(self) -> ClusterView:
        """What decide() needs to know, from this controller's state (a snapshot)."""
        cfg = self.cfg
        with self._state_lock:
            return ClusterView(
                members=dict(self.members), rank_nodes=self.rank_nodes, spares=tuple(self.spares),
                dead=frozenset(self.dead), num_experts=self.spec.num_experts, slots_per_rank=cfg.slots_per_rank,
                num_spares=cfg.num_spares, num_nodes=cfg.num_nodes,
                ranks_per_node=max(1, cfg.num_ranks // cfg.num_nodes), layout_ranks=tuple(self.layout.ranks),
                restarted=frozenset(self._restarted), draining=frozenset(self.draining),
            )

    def _start_worker(self, node: int) -> str:
        """Start one worker on logical ``node`` and wait for it; it is a spare until a commit makes it a member.

        A worker that does not start in time is killed (never left half-started) and
        WorkerStartupError is raised.
        """
        wid = self._new_worker(node)
        try:
            self._wait_started([wid])
        except WorkerStartupError:
            handle = self.handles.pop(wid, None)
            if handle is not None:
                try:
                    ray.kill(handle, no_restart=True)
                except RayError:
                    pass
            raise
        with self._state_lock:
            self.spares.append(wid)
        return wid

    def _wait_started(self, wids: list[str]) -> None:
        refs = {wid: self.handles[wid].ping.remote() for wid in wids}
        try:
            self._get_all(refs, self.cfg.startup_timeout_s, "start")
        except ElasticEPError as exc:
            raise WorkerStartupError(str(exc)) from exc

    def _set_reference(self, reports: dict) -> None:
        """Reference fingerprint per logical expert from the start-up loads; replicas must agree."""
        ref = np.zeros((self.spec.num_layers, self.spec.num_experts), dtype=np.int64)
        seen = np.zeros_like(ref, dtype=bool)
        for r, rep in reports.items():
            experts = self.layout.experts_of(r)
            fps = rep["fingerprints"]
            for layer, slot in np.ndindex(experts.shape):
                e = experts[layer, slot]
                if seen[layer, e] and ref[layer, e] != fps[layer, slot]:
                    raise VerificationError(
                        f"replicas of expert {e} in layer {layer} differ right after loading the checkpoint"
                    )
                ref[layer, e] = fps[layer, slot]
                seen[layer, e] = True
        self.ref_fp = ref

    def _save(self) -> None:
        """Persist everything needed to resume (atomic rename)."""
        state = {
            "cfg": {**asdict(self.cfg), "model": asdict(self.spec)},
            "layout": self.layout.to_dict() if self.layout is not None else None,
            "epoch": self.epoch,
            "generation": self.generation,
            "members": {str(r): w for r, w in self.members.items()},
            "spares": self.spares,
            "rank_nodes": {str(r): n for r, n in self.rank_nodes.items()},
            "dead": sorted(self.dead),
            "next_worker": self.next_worker,
            "gpu_share": self.gpu_share,
            "share_reused": sorted(self._share_reused),
            "ref_fp": self.ref_fp.tolist() if self.ref_fp is not None else None,
            "backup_of": [[l, e, s] for (l, e), s in self.backup_of.items()],
            "num_backup_stores": len(self.backup_stores),
            "backup_names": self.backup_names,
            "next_store": self.next_store,
            "node_ids": {str(i): n for i, n in self.node_ids.items()},
            "pending_commit": self.pending_commit,
            "version": STATE_VERSION,
            "lost": [list(k) for k in self.lost],
            "last_error": self.last_error,
            "history": self.history[-50:],
            "restarts": self.restarts,
        }
        self.state_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state))
        os.replace(tmp, self.state_path)

    def _resume(self) -> None:
        """Rebuild state after a controller restart; reattach to detached workers by name.

        Never raises for a dead worker or a failed group (an exception in ``__init__``
        would end the actor for good): what cannot be reattached is marked dead, and the
        monitor heals it. A decided reconfiguration is rolled forward, an undecided one back.
        """
        state = json.loads(self.state_path.read_text())
        self.layout = ExpertLayout.from_dict(state["layout"]) if state["layout"] else None
        self.epoch = int(state["epoch"])
        self.generation = int(state["generation"]) + 1  # the old store died with the old controller
        self.members = {int(r): w for r, w in state["members"].items()}
        self.spares = list(state["spares"])
        self.dead = set(state["dead"])
        self.next_worker = int(state["next_worker"])
        self.gpu_share = {w: float(g) for w, g in state.get("gpu_share", {}).items()}
        self._share_reused = set(state.get("share_reused", []))
        self.ref_fp = np.asarray(state["ref_fp"], dtype=np.int64) if state["ref_fp"] is not None else None
        self.backup_of = {(int(l), int(e)): int(s) for l, e, s in state["backup_of"]}
        self.node_ids = {int(i): n for i, n in state.get("node_ids", {}).items()}
        self.pending_commit = state.get("pending_commit")
        self.lost = [tuple(x) for x in state["lost"]]
        self.last_error = state.get("last_error")
        self.history = state["history"]
        self.restarts = int(state.get("restarts", 0)) + 1
        for wid in list(self.members.values()) + self.spares + list((self.pending_commit or {}).get("retired", [])):
            try:
                self.handles[wid] = ray.get_actor(self._worker_name(wid))
            except ValueError:
                self.dead.add(wid)
        names = state.get("backup_names") or [
            f"{self.prefix}-backup{i}" for i in range(int(state["num_backup_stores"]))
        ]
        self.next_store = int(state.get("next_store", len(names)))
        self.backup_names, self.backup_stores = list(names), []
        for name in names:
            try:
                self.backup_stores.append(ray.get_actor(name) if name else None)
            except ValueError:
                self.backup_stores.append(None)
        alive = {w: h for w, h in self.handles.items() if w not in self.dead}
        if self.pending_commit is not None:
            # The decision was written: the new layout is in force. Workers that staged it
            # commit now (a second commit of one epoch is a no-op); one that cannot is dead.
            epoch = int(self.pending_commit["epoch"])
            refs = {r: alive[w].commit.remote(epoch, r) for r, w in self.members.items() if w in alive}
            self._get_all(refs, self.cfg.call_timeout_s, "commit (resume)", tolerate_dead=True,
                          wids=dict(self.members))
            retired = [w for w in self.pending_commit.get("retired", []) if w in alive]
            done = self._get_all({w: alive[w].retire.remote() for w in retired}, self.cfg.call_timeout_s,
                                 "retire (resume)", tolerate_dead=True)
            self._settle_retired([w for w in retired if w in done and w not in self.spares],
                                 self.pending_commit.get("keep_spares"))
            self.pending_commit = None
        else:
            # A reconfiguration the old controller left undecided is dropped: live weights never changed.
            refs = {w: h.discard.remote(self.epoch + 1) for w, h in alive.items()}
            self._get_all(refs, self.cfg.call_timeout_s, "discard (resume)", tolerate_dead=True)
        self._replenish_due = len([w for w in self.spares if w not in self.dead]) < self.cfg.num_spares
        if self.layout is not None:
            try:
                self._form_group()
            except (ElasticEPError, RayError) as exc:
                log.warning("communicators not re-formed on resume: %s", exc)
                self._group_ok = False
            self._save()
            self._start_monitor()

    # ------------------------------------------------------------------------------------
    # watching
    # ------------------------------------------------------------------------------------

    def _start_monitor(self) -> None:
        if self._monitor is not None and self._monitor.is_alive():
            return
        self._monitor = threading.Thread(target=self._watch_loop, name="eep-monitor", daemon=True)
        self._monitor.start()

    def _watch_loop(self) -> None:
        """Hold a pending ``watch`` call on every worker; one raising means that worker died."""
        pending: dict = {}
        while not self._stop.is_set():
            with self._state_lock:
                wanted = [w for w in list(self.members.values()) + self.spares if w not in self.dead]
            for wid in wanted:
                if wid not in pending.values() and wid in self.handles:
                    pending[self.handles[wid].watch.remote()] = wid
            if not pending:
                self._stop.wait(0.2)
                continue
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=0.5)
            for ref in ready:
                wid = pending.pop(ref)
                try:
                    ray.get(ref, timeout=0)
                except RayError:
                    self._mark_dead(wid)
            if (self.cfg.auto_recover and not self._busy.is_set() and self._needs_recovery()
                    and not self._is_blocked()):
                self._busy.set()  # claimed here so that one death starts one recovery thread
                threading.Thread(target=self._auto_recover, daemon=True).start()

    def _is_blocked(self) -> bool:
        """True while recovery was proven impossible (CapacityError, ExpertsLostError) and no worker died since."""
        with self._state_lock:
            return self._blocked is not None and self._blocked == frozenset(self.dead)

    def _auto_recover(self) -> None:
        try:
            self.recover()  # clears _busy when done
        except Exception as exc:  # the next call or watch event retries
            log.warning("automatic recovery failed: %s", exc)
            self._busy.clear()
            self._stop.wait(1.0)

    def _settle_retired(self, retired: list[str], keep: Optional[list[str]] = None) -> None:
        """Retired workers in ``keep`` (the decision's) refill the spares; the rest are released.

        A released worker is killed so its GPU is free again; its death is not a failure.
        ``keep`` None (a state file of an older version): up to ``num_spares`` are kept.
        """
        if keep is None:
            live_spares = [w for w in self.spares if w not in self.dead]
            keep = retired[: max(0, self.cfg.num_spares - len(live_spares))]
        self.spares = self.spares + [w for w in retired if w in keep]
        for wid in [w for w in retired if w not in keep]:
            self.released.add(wid)
            handle = self.handles.pop(wid, None)
            if handle is not None:
                try:
                    ray.kill(handle, no_restart=True)
                except RayError:  # already gone
                    pass

    def _mark_dead(self, wid: str) -> None:
        with self._state_lock:
            if wid in self.released:  # let go on purpose by a shrink
                return
            if wid not in self.dead:
                log.warning("worker %s died", wid)
                self.dead.add(wid)
                self._death_time = self._death_time or time.time()
                self.death_times[wid] = time.time()

    def _needs_recovery(self) -> bool:
        with self._state_lock:
            return (
                any(w in self.dead for w in self.members.values())
                or any(w in self.dead for w in self.spares)
                or self._replenish_due
            )

    def _probe(self) -> set[str]:
        """Ping every worker (bounded) and return the dead.

        With ``max_restarts`` set, a dead member is waited for (up to the start-up
        timeout): Ray restarts it empty, and it takes its rank back as a fresh rank.
        """
        restartable = self.cfg.max_restarts != 0
        wids = [w for w in list(self.members.values()) + self.spares if w not in self.dead or restartable]
        refs = {w: self.handles[w].ping.remote() for w in wids}
        deadline = _now() + self.cfg.call_timeout_s
        for wid, ref in refs.items():
            info = None
            limit = deadline
            while info is None:
                try:
                    info = ray.get(ref, timeout=max(0.01, limit - _now()))
                except ray.exceptions.ActorUnavailableError:
                    if not restartable:
                        break
                    if limit == deadline:
                        limit = _now() + self.cfg.startup_timeout_s
                    time.sleep(0.1)
                    ref = self.handles[wid].ping.remote()
                except (RayError, GetTimeoutError):
                    break
            if info is None:
                self._mark_dead(wid)
                continue
            is_member = wid in self.members.values()
            if restartable and is_member and info["epoch"] < 0:
                # Restarted by Ray: same actor, state lost. It takes its rank back empty.
                with self._state_lock:
                    self.dead.discard(wid)
                self._restarted.add(wid)
        return set(self.dead)

    # ------------------------------------------------------------------------------------
    # public operations
    # ------------------------------------------------------------------------------------

    def status(self) -> dict:
        with self._state_lock:
            layout = self.layout
            return {
                "epoch": self.epoch,
                "generation": self.generation,
                "ranks": {r: w for r, w in sorted(self.members.items())},
                "spares": list(self.spares),
                "dead": sorted(self.dead),
                "lost": [tuple(k) for k in self.lost],
                "unserved": self._unserved(layout),
                "death_times": dict(self.death_times),
                "backed_up": len(self.backup_of),
                "spares_prepared": self._spares_prepared(),
                "members_prepared": self._spares_prepared(members=True),
                "node_ids": dict(self.node_ids),
                "last_error": self.last_error,
                "rank_nodes": dict(self.rank_nodes),
                "layout": layout.to_dict() if layout is not None else None,
                "restarts": self.restarts,
                "busy": self._busy.is_set(),
                "load_reports": len(self.window),
                "history": self.history[-10:],
            }

    def arm_controller_fault(self, phase: str, delay_s: float = 0.0) -> None:
        """Make this controller die when it next reaches ``phase`` of a reconfiguration."""
        self.faults.arm(phase, delay_s)

    def _spares_prepared(self, members: bool = False) -> dict:
        """Per live spare (or member): its prepare_backups result, "preparing", or the error it raised."""
        out = {}
        member_ids = set(self.members.values())
        for wid, ref in list(self.preparing.items()):
            if wid in self.dead or wid not in member_ids | set(self.spares):
                self.preparing.pop(wid, None)
                continue
            if (wid in member_ids) != members:
                continue
            if not ray.wait([ref], timeout=0)[0]:
                out[wid] = "preparing"
                continue
            try:
                out[wid] = ray.get(ref, timeout=1.0)
            except (RayError, GetTimeoutError) as exc:
                out[wid] = f"failed: {type(exc).__name__}: {str(exc)[:200]}"
        return out

    def _unserved(self, layout: Optional[ExpertLayout]) -> list[tuple[int, int]]:
        """(layer, expert) pairs with no replica on a live member right now."""
        if layout is None:
            return []
        live = np.array([r in self.members and self.members[r] not in self.dead for r in layout.ranks], dtype=bool)
        held = layout.rank_view()[:, live, :].reshape(layout.num_layers, -1)
        covered = np.zeros((layout.num_layers, layout.num_experts), dtype=bool)
        covered[np.repeat(np.arange(layout.num_layers), held.shape[1]), held.ravel()] = True
        return [(int(l), int(e)) for l, e in np.argwhere(~covered)]

    def arm_worker_fault(self, rank_or_wid, phase: str, delay_s: float = 0.0) -> str:
        """Arm a worker to die at ``phase``. ``idle`` with no delay kills it now; this returns once it is dead."""
        from elastic_ep.faults import WORKER_PHASES

        if phase not in WORKER_PHASES:
            raise ValueError(f"unknown fault phase {phase!r}; known: {list(WORKER_PHASES)}")
        wid = self._resolve(rank_or_wid)
        handle = self.handles[wid]
        now = phase == "idle" and delay_s <= 0
        gone = handle.watch.remote() if now else None  # fails once this incarnation is gone
        try:
            ray.get(handle.arm_fault.remote(phase, delay_s), timeout=self.cfg.call_timeout_s)
        except RayActorError:
            if not now:
                raise
        if now:
            ready, _ = ray.wait([gone], timeout=self.cfg.call_timeout_s)
            if not ready:
                raise TransferError(f"worker {wid} armed to die at once still lives after {self.cfg.call_timeout_s}s")
            self._mark_dead(wid)
        return wid

    def disarm_worker_faults(self, rank_or_wid=None) -> dict:
        """Disarm every fault still armed on one worker (or on all live ones); returns {worker id: phases}."""
        wids = [self._resolve(rank_or_wid)] if rank_or_wid is not None else [
            w for w in list(self.members.values()) + self.spares if w not in self.dead]
        refs = {w: self.handles[w].disarm_fault.remote() for w in wids if w in self.handles}
        return self._get_all(refs, self.cfg.call_timeout_s, "disarm", tolerate_dead=True)

    def _resolve(self, rank_or_wid) -> str:
        if isinstance(rank_or_wid, str):
            if rank_or_wid not in self.handles:
                raise UnknownRankError(f"no worker {rank_or_wid!r}; workers: {sorted(self.handles)}")
            return rank_or_wid
        if isinstance(rank_or_wid, bool) or not isinstance(rank_or_wid, (int, np.integer)):
            raise UnknownRankError(f"a rank is an int id (or a worker id str), got {rank_or_wid!r}")
        rank = int(rank_or_wid)
        if rank not in self.members:
            raise UnknownRankError(f"no rank {rank}; ranks: {sorted(self.members)}")
        return self.members[rank]

    def worker_handle(self, rank_or_wid):
        return self.handles[self._resolve(rank_or_wid)]

    def kill(self, rank_or_wid, no_restart: bool = True) -> str:
        """Kill a worker (chaos drills); returns its worker id."""
        wid = self._resolve(rank_or_wid)
        ray.kill(self.handles[wid], no_restart=no_restart)
        if no_restart:
            # ray.kill is asynchronous: return once the worker is gone and marked dead, so a
            # caller's next status() already shows the death (or the recovery it started).
            deadline = _now() + self.cfg.call_timeout_s
            while _now() < deadline:
                try:
                    ray.get(self.handles[wid].ping.remote(), timeout=max(0.01, deadline - _now()))
                    time.sleep(0.005)
                except (RayError, GetTimeoutError):
                    break
            self._mark_dead(wid)
        return wid

    def report_load(self, load) -> None:
        """A serving engine's per-expert token counts for one interval: [num_layers, num_experts]."""
        self.window.add(check_counts(load, (self.spec.num_layers, self.spec.num_experts), "load"))

    def record_slot_tokens(self, slot_counts) -> None:
        """Distribute per-slot token counts [L, num_slots] of the current layout to the workers."""
        counts = check_counts(slot_counts, (self.spec.num_layers, self.layout.num_slots), "slot_counts")
        spr = self.cfg.slots_per_rank
        refs = []
        for pos, r in enumerate(self.layout.ranks):
            wid = self.members.get(r)
            if wid is None or wid in self.dead:
                continue
            refs.append(self.handles[wid].record_tokens.remote(counts[:, pos * spr : (pos + 1) * spr]))
        self._get_all(dict(enumerate(refs)), self.cfg.call_timeout_s, "record_tokens", tolerate_dead=True)

    def collect_load(self) -> Optional[np.ndarray]:
        """Pull the workers' per-slot token counts into the sliding window; returns the window total."""
        refs = {r: self.handles[w].take_load.remote() for r, w in self.members.items() if w not in self.dead}
        got = self._get_all(refs, self.cfg.call_timeout_s, "take_load", tolerate_dead=True)
        total = np.zeros((self.spec.num_layers, self.spec.num_experts))
        any_tokens = False
        for rep in got.values():
            if rep["tokens"].sum() <= 0:
                continue
            any_tokens = True
            experts = rep["experts"]
            rows = np.repeat(np.arange(self.spec.num_layers), experts.shape[1])
            valid = experts.ravel() >= 0
            np.add.at(total, (rows[valid], experts.ravel()[valid]), rep["tokens"].ravel()[valid])
        if any_tokens:
            self.window.add(total)
        return self.window.total()

    def rebalance(self, load=None) -> dict:
        """Re-place experts by ``load`` [num_layers, num_experts] or the recorded window (healing dead ranks too).

        Reconfigurations run one at a time: a second call waits for the first to
        finish, then collects the load and plans from the layout the first committed.
        """
        if load is not None:
            load = check_counts(load, (self.spec.num_layers, self.spec.num_experts), "load")
        with self._lock:
            if load is None:
                self.collect_load()
            return self._reconfigure("rebalance", load=load)

    def recover(self) -> dict:
        """Replace or drop dead ranks (spares first, then shrink) and restore every slot."""
        return self._reconfigure("recover")

    def grow(self, num_ranks: int = 1) -> dict:
        if isinstance(num_ranks, bool) or not isinstance(num_ranks, (int, np.integer)) or num_ranks <= 0:
            raise ValueError(f"grow needs num_ranks >= 1, got {num_ranks!r}")
        return self._reconfigure("grow", add=num_ranks)

    def shrink(self, ranks: list[int]) -> dict:
        """Retire ``ranks``: their experts move to the rest; their workers refill the spares or are released."""
        if not ranks:
            raise ValueError("shrink needs at least one rank")
        for r in ranks:
            if isinstance(r, bool) or not isinstance(r, (int, np.integer)) or int(r) not in self.members:
                raise UnknownRankError(f"no rank {r!r}; ranks: {sorted(self.members)}")
        remove = sorted({int(r) for r in ranks})
        decide(self._view(), Request("shrink", ranks=tuple(remove)))  # refusals raise before anything moves
        return self._reconfigure("shrink", remove=remove)

    def drain(self, rank: int) -> dict:
        """Move a live rank's experts off it, commit, then release its worker.

        Returns the report; its ``safe_to_terminate_at`` (wall clock) says from when the
        released process (and its node, if nothing else runs there) may be terminated.
        Refused (CapacityError, with the numbers) for the last rank, a rank already
        draining, a dead rank, or when the other ranks cannot hold every expert.
        """
        if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or int(rank) not in self.members:
            raise UnknownRankError(f"no rank {rank!r}; ranks: {sorted(self.members)}")
        rank = int(rank)
        with self._state_lock:
            decide(self._view(), Request("drain", ranks=(rank,)))  # refusals raise before anything moves
            self.draining.add(rank)
        try:
            return self._reconfigure("drain", remove=[rank])
        finally:
            with self._state_lock:
                self.draining.discard(rank)

    def verify(self, against_checkpoint: bool = False) -> dict:
        """Fingerprint every live slot and compare with the reference (or a fresh read of the checkpoint)."""
        with self._lock:
            ref = self.ref_fp
            if against_checkpoint:
                ref = self._checkpoint_fingerprints()
            refs = {r: self.handles[w].fingerprints.remote() for r, w in self.members.items() if w not in self.dead}
            got = self._get_all(refs, self.cfg.call_timeout_s, "fingerprints", tolerate_dead=True)
            bad, checked = [], 0
            for r, rep in got.items():
                want = self.layout.experts_of(r)
                if not np.array_equal(rep["experts"], want):
                    diff = np.argwhere(rep["experts"] != want)[0]
                    bad.append({"rank": r, "layer": int(diff[0]), "slot": int(diff[1]), "why": "wrong expert"})
                fp = rep["fingerprints"]
                for layer, slot in np.ndindex(want.shape):
                    checked += 1
                    if fp[layer, slot] != ref[layer, want[layer, slot]]:
                        bad.append({"rank": r, "layer": layer, "slot": slot, "expert": int(want[layer, slot]),
                                    "why": "fingerprint mismatch"})
            missing = sorted(set(self.members) - set(got))
            return {"ok": not bad and not missing, "slots_checked": checked, "bad": bad[:20],
                    "num_bad": len(bad), "ranks_unreachable": missing, "epoch": self.epoch}

    def _checkpoint_fingerprints(self) -> np.ndarray:
        from elastic_ep.storage import CheckpointReader, fingerprint_stacked

        reader = CheckpointReader(self.cfg.checkpoint, self.spec, self.cfg.preset)
        out = np.zeros((self.spec.num_layers, self.spec.num_experts), dtype=np.int64)
        for layer in range(self.spec.num_layers):
            w13, w2 = reader.read_layer_slots(layer, list(range(self.spec.num_experts)))
            out[layer] = fingerprint_stacked(w13, w2)
        return out

    def shutdown(self) -> None:
        self._stop.set()
        for wid, h in list(self.handles.items()):
            try:
                ray.kill(h)
            except Exception:
                pass
        for s in self.backup_stores:
            if s is not None:
                try:
                    ray.kill(s)
                except Exception:
                    pass
        self.store.close()

    # ------------------------------------------------------------------------------------
    # backups and groups
    # ------------------------------------------------------------------------------------

    def _store_for(self, node: int):
        from actors.backup import BackupStore

        while len(self.backup_stores) <= node:
            self.backup_stores.append(None)
            self.backup_names.append("")
        if self.backup_stores[node] is None:  # first use, or its store died (with its node): a new one
            name = f"{self.prefix}-backup{node}-{self.next_store}"
            self.next_store += 1
            opts = dict(name=name, lifetime="detached", num_cpus=0)
            strategy = self._node_strategy(node)
            if strategy is not None:
                opts.update(scheduling_strategy=strategy, num_cpus=PIN_CPUS)
            self.backup_stores[node] = ray.remote(BackupStore).options(**opts).remote(node)
            self.backup_names[node] = name
        return self.backup_stores[node]

    def _drop_dead_stores(self) -> None:
        """Forget backup stores that do not answer (their objects died with them), and what they held."""
        refs = {s: h.ping.remote() for s, h in enumerate(self.backup_stores) if h is not None}
        got = self._get_all(refs, self.cfg.call_timeout_s, "backup ping", tolerate_dead=True)
        for s in set(refs) - set(got):
            self.backup_stores[s] = None
            for k in [k for k, v in self.backup_of.items() if v == s]:
                del self.backup_of[k]

    def _make_backups(self, keys: Optional[list[tuple[int, int]]] = None) -> int:
        """One host copy of each expert, on a logical node other than the one its source rank is on."""
        layout = self.layout
        num_nodes = max(1, self.cfg.num_nodes)
        want = keys if keys is not None else [
            (l, e) for l in range(self.spec.num_layers) for e in range(self.spec.num_experts)
        ]
        want = [k for k in want if k not in self.backup_of]
        by_pair: dict[tuple[str, int], list] = {}
        log2phy = layout.log2phy
        for layer, expert in want:
            slots = [p for p in log2phy[layer, expert] if p >= 0]
            holders = [layout.ranks[p // layout.slots_per_rank] for p in slots]
            holders = [r for r in holders if self.members.get(r) not in self.dead]
            if not holders:
                continue
            src = holders[0]
            node = (self.rank_nodes.get(src, 0) + 1) % num_nodes
            by_pair.setdefault((self.members[src], node), []).append((layer, expert))
        refs = {}
        for (wid, node), ks in by_pair.items():
            store = self._store_for(node)
            refs[(wid, node)] = store.ingest.remote(self.handles[wid], ks, self.cfg.call_timeout_s,
                                                    expert_bytes=self.spec.expert_bytes)
            for k in ks:
                self.backup_of[k] = node
        from actors.backup import INGEST_CHUNK_BYTES

        chunks = 1 + len(want) * self.spec.expert_bytes // INGEST_CHUNK_BYTES  # export calls per ingest, at most
        got = self._get_all(refs, self.cfg.call_timeout_s * (1 + chunks), "backup", tolerate_dead=True)
        for (wid, node), ks in by_pair.items():
            if (wid, node) not in got:
                for k in ks:
                    self.backup_of.pop(k, None)
        return int(sum(got.values()))

    def _backup_refs(self, keys: list[tuple[int, int]]) -> dict:
        by_store: dict[int, list] = {}
        for k in keys:
            s = self.backup_of.get(k)
            if s is not None and self.backup_stores[s] is not None:
                by_store.setdefault(s, []).append(k)
        out = {}
        for s, ks in by_store.items():
            try:
                out.update(ray.get(self.backup_stores[s].refs.remote(ks), timeout=self.cfg.call_timeout_s))
            except (RayError, GetTimeoutError):
                self.backup_stores[s] = None
                for k in list(self.backup_of):
                    if self.backup_of[k] == s:
                        del self.backup_of[k]
        return out

    def _device_key(self, wid: str) -> str:
        if wid not in self.device_of:
            info = ray.get(self.handles[wid].ping.remote(), timeout=self.cfg.call_timeout_s)
            gpus = ",".join(info.get("gpus") or [])
            self.device_of[wid] = f"{info['node_id']}:{gpus}" if gpus and self.cfg.device == "cuda" else wid
        return self.device_of[wid]

    def _group_sets(self) -> list[list[str]]:
        """Member sets for this generation's groups: no two members of a set share a GPU.

        The main set holds every rank (and spares on GPUs of their own); each spare that
        shares a GPU with a rank gets a set of its own: the main set minus that rank, plus
        the spare, so that when the rank dies the spare's communicators already exist.
        """
        live = lambda ws: [w for w in ws if w not in self.dead]  # noqa: E731
        members, spares = live(sorted(self.members.values())), live(self.spares)
        main, used = list(members), {self._device_key(w) for w in members}
        shared = []
        for s in spares:
            key = self._device_key(s)
            if key in used:
                shared.append(s)
            else:
                main.append(s)
                used.add(key)
        sets = [sorted(main)]
        for s in shared:
            key = self._device_key(s)
            sets.append(sorted([w for w in main if self._device_key(w) != key] + [s]))
        return sets

    def _form_group(self, exactly: Optional[list[str]] = None) -> float:
        """Fresh collective groups for this generation (see _group_sets), or one group of ``exactly`` these workers."""
        from elastic_ep.transport import group_name_for

        t0 = _now()
        self.generation += 1
        base = group_name_for(self.prefix, self.generation)
        sets = [sorted(exactly)] if exactly is not None else self._group_sets()
        host, port = self.store.address
        formed: dict[str, list[str]] = {}
        for k, wids in enumerate(sets):
            if len(wids) < 2 and exactly is None:
                continue
            name = f"{base}-{k}"
            refs = {
                w: self.handles[w].form_group.remote(name, len(wids), i, host, port, self.cfg.transfer_timeout_s)
                for i, w in enumerate(wids)
            }
            self._await_formation(name, refs, self.cfg.transfer_timeout_s + self.cfg.call_timeout_s)
            formed[name] = wids
        if exactly is None:
            keep = list(formed)
            for w in {w for ws in formed.values() for w in ws}:
                self.handles[w].leave_groups.remote(keep=keep)
            self.groups = formed
        else:
            self.groups.update(formed)
        return _now() - t0

    def _await_formation(self, name: str, refs: dict, timeout_s: float) -> None:
        """Wait for every member's ``form_group``; raise TransferError if any failed.

        At the first failure (typically a member that died before joining) the formation is
        abandoned in the store, so the members still waiting for it give up within ms
        instead of waiting out the transfer timeout; the caller then re-plans.
        """
        deadline = _now() + timeout_s
        pending = {ref: wid for wid, ref in refs.items()}
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=max(0.01, deadline - _now()))
            if not ready:
                break  # past the deadline: _get_all below names who
            wid = pending.pop(ready[0])
            try:
                ray.get(ready[0], timeout=max(0.01, deadline - _now()))
            except RayError as exc:
                self.store.abandon(name, f"worker {wid} failed to join: {type(exc).__name__}")
                break
        self._get_all(refs, max(0.01, deadline - _now()), f"form_group {name}")

    def _group_for(self, wids: set[str]) -> Optional[str]:
        """A formed group holding every worker in ``wids``, if any."""
        for name, members in self.groups.items():
            if wids <= set(members):
                return name
        return None

    # ------------------------------------------------------------------------------------
    # the reconfiguration loop
    # ------------------------------------------------------------------------------------

    def _reconfigure(self, reason: str, add: int = 0, remove: Optional[list[int]] = None,
                     load: Optional[np.ndarray] = None) -> dict:
        with self._lock:
            self._busy.set()
            try:
                return self._reconfigure_locked(reason, add, remove, load)
            finally:
                self._busy.clear()

    def _reconfigure_locked(self, reason: str, add: int, remove: Optional[list[int]],
                            load: Optional[np.ndarray] = None) -> dict:
        """Attempts until one commits. Transient failures (a death, a timeout) re-plan; typed ones end it.

        A typed failure (CapacityError, ExpertsLostError, CheckpointError, ...) cannot be
        fixed by trying again: the previous layout stays in force, the error is recorded
        in ``status()["last_error"]`` and raised, and automatic recovery pauses until
        another worker dies or a caller asks again.
        """
        t_start, started_at = _now(), time.time()
        death_time = self._death_time
        failures: list[str] = []
        for attempt in range(1, MAX_ATTEMPTS + 1):
            try:
                report = self._attempt(reason, add, remove or [], attempt, failures, load)
            except (TransferError, RayError, GetTimeoutError) as exc:
                failures.append(f"attempt {attempt}: {type(exc).__name__}: {exc}")
                log.warning("reconfiguration attempt %d failed: %s", attempt, exc)
                self._group_ok = False  # an exchange may have failed: its groups are broken
                self._discard_all()
                continue
            except ElasticEPError as exc:
                self._discard_all()
                with self._state_lock:
                    self.last_error = f"{reason}: {type(exc).__name__}: {exc}"
                    self._blocked = frozenset(self.dead)
                self._save()
                raise
            with self._state_lock:
                self.last_error = None
                self._blocked = None
                self._replenish_due = False
            report.failures = failures
            report.total_s = _now() - t_start
            if death_time is not None and reason == "recover" and report.since_death_s is None:
                report.since_death_s = time.time() - death_time
            self._death_time = None
            out = report.to_dict()
            out.update(started_at=started_at, finished_at=time.time(),
                       committed_at=getattr(report, "committed_at", None))
            self.history.append(out)
            self._save()
            return out
        with self._state_lock:
            self.last_error = f"{reason} failed after {MAX_ATTEMPTS} attempts: {failures[-1] if failures else ''}"
        raise TransferError(f"{reason} failed after {MAX_ATTEMPTS} attempts: " + "; ".join(failures))

    def _discard_all(self) -> None:
        refs = {w: self.handles[w].discard.remote(self.epoch + 1) for w in self.handles if w not in self.dead}
        self._get_all(refs, self.cfg.call_timeout_s, "discard", tolerate_dead=True)

    def _attempt(self, reason: str, add: int, remove: list[int], attempt: int, failures: list,
                 load_override: Optional[np.ndarray] = None) -> RebalanceReport:
        rep = RebalanceReport(reason=reason, epoch_from=self.epoch, attempt=attempt)
        cfg = self.cfg
        # Phase: detect
        t0 = _now()
        self._restarted = set()
        self._probe()
        rep.phases["detect"] = _now() - t0

        # Phase: decide membership
        t0 = _now()
        old = self.layout
        self._layout_before = old  # for the report's balance before/after
        kind = reason if reason in REQUESTS else "recover"
        request = Request(kind, add=add if kind == "grow" else 0, ranks=tuple(remove))
        decision = decide(self._view(), request)
        members = dict(decision.members)
        for rank, wid in decision.members.items():
            if wid in self._restarted:
                rep.replaced[rank] = f"{wid} (restarted)"
        rep.replaced.update(decision.replaced)
        for start in decision.starts:  # cold workers: started now, spares until the commit (never leaked)
            wid = self._start_worker(start.node)
            members[start.rank] = wid
            if start.rank in self.members:
                rep.replaced[start.rank] = f"{wid} (cold)"
        rep.dropped = list(decision.dropped)
        rep.added = list(decision.added)
        fresh, retired, spares = set(decision.fresh), list(decision.retired), list(decision.spares)
        # Ranks whose weights are intact can send, including ranks being retired by a shrink.
        holders = {r: w for r, w in self.members.items() if r in old.ranks and w not in self.dead}
        holders = {r: w for r, w in holders.items() if r not in fresh}
        survivors = set(holders)
        rep.phases["decide"] = _now() - t0

        # Phase: plan (pure)
        t0 = _now()
        load = load_override if load_override is not None else self.window.total()
        if load is None or load.sum() <= 0:
            load = np.ones((old.num_layers, old.num_experts))  # no statistics yet: balance replica counts
        new = layout_for(decision, old, load, cfg.slots_per_rank, survivors, num_groups=self.spec.num_groups,
                         policy=cfg.policy)
        plan = plan_transfers(old, new, sorted(survivors), expert_bytes=self.spec.expert_bytes, fresh_ranks=fresh,
                              stripe_fetches=self._striping)
        rep.phases["plan"] = _now() - t0
        rep.plan = plan.summary()
        self.faults.hit("planned")
        if plan.is_noop and not fresh and not retired and members == self.members:
            rep.epoch_to = self.epoch
            rep.noop = True
            self._refresh_balance(rep, new, load)
            if decision.spare_starts or any(w in self.dead for w in self.spares):
                t0 = _now()
                self._after_commit(rep, decision)  # a spare died (or a restart left too few): replace it
                rep.phases["replenish"] = _now() - t0
            return rep

        # Storage: which fetched experts still exist somewhere?
        fetch_keys = sorted({(int(l), int(e)) for l, e in np.concatenate([plan.fetches[:, :2], plan.relays[:, :2]])})
        backup_refs = self._backup_refs(fetch_keys) if fetch_keys else {}
        if fetch_keys and cfg.checkpoint is None:
            lost = [k for k in fetch_keys if k not in backup_refs]
            if lost:
                with self._state_lock:
                    self.lost = lost
                raise ExpertsLostError(
                    f"{len(lost)} experts have no copy left (no live replica, backup or checkpoint), "
                    f"e.g. (layer, expert) {lost[:5]}; the cluster keeps serving the previous layout",
                    lost,
                )

        # Phase: communicators (already formed for every live worker unless membership grew)
        t0 = _now()
        participants = {r: members.get(r, holders.get(r)) for r in plan.participants}
        movers = {int(r) for t in (plan.transfers, plan.relays) for r in t[:, 2].tolist() + t[:, 4].tolist()}
        need = {participants[r] for r in movers}
        group = self._group_for(need) if need and not self._restarted and self._group_ok else None
        if need and group is None:
            self._form_group()
            group = self._group_for(need)
            if group is None:  # e.g. a grown rank on a GPU a spare uses: a group of just these
                self._form_group(exactly=sorted(need))
                group = self._group_for(need)
            self._group_ok = True
        rep.phases["communicators"] = _now() - t0
        index = {w: i for i, w in enumerate(self.groups.get(group, []))}
        group_rank = {r: index[participants[r]] for r in movers}

        # Phase: transfer (P2P + storage) into staging on every participant
        t0 = _now()
        self.faults.hit("executing")
        epoch = self.epoch + 1
        refs = {}
        for r, wid in participants.items():
            part = plan.for_rank(r)
            keys = {(int(l), int(e)) for l, e in np.concatenate([part.fetches[:, :2], part.relay_sends[:, :2]])}
            refs[r] = self.handles[wid].execute.remote(
                epoch, part, group, group_rank, cfg.transfer_timeout_s,
                {k: backup_refs[k] for k in keys if k in backup_refs},
            )
        typed: list = []
        results = self._get_all(refs, cfg.transfer_timeout_s + cfg.call_timeout_s, "execute",
                                wids=participants, typed=typed)
        if typed:  # e.g. the checkpoint cannot give what no replica or backup holds: retrying cannot help
            lost = sorted({tuple(k) for _, exc in typed if isinstance(exc, ExpertsLostError) for k in exc.lost})
            if lost:
                with self._state_lock:
                    self.lost = lost
                raise ExpertsLostError(
                    f"{len(lost)} experts have no live replica or backup and cannot be read from the checkpoint, "
                    f"e.g. (layer, expert) {lost[:5]}; the previous layout stays in force. "
                    + "; ".join(f"rank {k}: {exc}" for k, exc in typed)[:2000],
                    lost,
                )
            raise typed[0][1]
        rep.phases["transfer"] = _now() - t0
        rep.worker_timings = {r: res["timings_s"] for r, res in results.items()}
        # point-to-point bytes of experts that survivors held (relayed reads count as storage)
        rep.bytes_p2p = int(sum(res["bytes_received"] for res in results.values())) - rep.plan["bytes_relayed"]
        rep.bytes_from_backup = int(sum(res["bytes_from_backup"] for res in results.values()))
        rep.bytes_from_checkpoint = int(sum(res["bytes_from_checkpoint"] for res in results.values()))

        # Phase: verify every staged slot against the reference fingerprint
        t0 = _now()
        bad = []
        for r, res in results.items():
            for layer, slot, expert, fp in res["staged"]:
                if new.experts_of(r)[layer, slot] != expert or self.ref_fp[layer, expert] != fp:
                    bad.append((r, layer, slot, expert))
        if bad:
            # A fetched copy that fails verification came from storage: trying again reads the same bytes.
            read = set(fetch_keys)
            from_storage = sorted({(layer, expert) for r, layer, slot, expert in bad
                                   if (layer, expert) in read
                                   and (layer, expert) not in backup_refs})
            if from_storage:
                with self._state_lock:
                    self.lost = from_storage
                raise ExpertsLostError(
                    f"the checkpoint's copies of {len(from_storage)} experts do not match their reference "
                    f"fingerprints (corrupted?), e.g. (layer, expert) {from_storage[:5]}, and no live replica or "
                    "backup holds them; the previous layout stays in force",
                    from_storage,
                )
            raise TransferError(f"{len(bad)} staged slots failed verification, e.g. (rank, layer, slot, expert) {bad[:5]}")
        rep.slots_verified = int(sum(len(res["staged"]) for res in results.values()))
        rep.phases["verify"] = _now() - t0
        self.faults.hit("verified")

        # Phase: commit (every participant staged and verified; now make it live everywhere)
        t0 = _now()
        self.faults.hit("committing")  # a controller death up to here rolls back
        prev = (self.layout, self.epoch, self.members, self.spares, self.lost)
        with self._state_lock:
            self.layout, self.epoch, self.members, self.spares, self.lost = new, epoch, members, spares, []
            self.pending_commit = {"epoch": epoch, "retired": retired, "keep_spares": list(decision.keep_as_spares)}
        try:
            self._save()  # the decision: from here on a restarted controller rolls forward
        except OSError:
            with self._state_lock:
                self.layout, self.epoch, self.members, self.spares, self.lost = prev
                self.pending_commit = None
            raise
        commit_refs = {r: self.handles[w].commit.remote(epoch, r) for r, w in members.items() if w not in self.dead}
        self.faults.hit("decided")  # commits are in flight and the controller dies: the restart finishes them
        done = self._get_all(commit_refs, cfg.call_timeout_s, "commit", tolerate_dead=True, wids=members)
        retire_refs = {w: self.handles[w].retire.remote() for w in retired}
        retired_ok = self._get_all(retire_refs, cfg.call_timeout_s, "retire", tolerate_dead=True)
        with self._state_lock:
            self._settle_retired([w for w in retired if w in retired_ok], list(decision.keep_as_spares))
        rep.released = [w for w in retired if w not in decision.keep_as_spares]
        if decision.drain is not None:
            rep.safe_to_terminate_at = time.time()  # the drained worker serves nothing and was let go
            self.pending_commit = None
        rep.phases["commit"] = _now() - t0
        rep.committed_at = time.time()
        if self._death_time is not None and rep.reason == "recover":
            rep.since_death_s = rep.committed_at - self._death_time  # noticed -> committed
        rep.epoch_to = epoch
        self._save()
        self.faults.hit("committed")
        if set(done) != set(commit_refs):
            rep.notes.append(f"ranks {sorted(set(commit_refs) - set(done))} died during commit; next recovery heals them")
        self._refresh_balance(rep, new, load)

        # After the critical path: replenish spares, re-form communicators, restore backups.
        t0 = _now()
        try:
            self._after_commit(rep, decision)
        except (ElasticEPError, RayError, GetTimeoutError) as exc:  # committed already: never retry the attempt
            rep.notes.append(f"after commit: {type(exc).__name__}: {exc}")
        rep.phases["replenish"] = _now() - t0
        return rep

    def _refresh_balance(self, rep: RebalanceReport, new: ExpertLayout, load: np.ndarray) -> None:
        before = self._layout_before if getattr(self, "_layout_before", None) is not None else self.layout
        for name, layout in (("before", before), ("after", new)):
            if layout is None:
                continue
            rl = layout.rank_loads(load)
            rep.balance[name] = float((rl.max(axis=1) / np.maximum(rl.mean(axis=1), 1e-12)).mean())

    def _after_commit(self, rep: RebalanceReport, decision: Decision) -> None:
        """Refill the spare pool to ``num_spares`` (always), re-form communicators, restore backups."""
        cfg = self.cfg
        dead_spares = [w for w in self.spares if w in self.dead]
        with self._state_lock:
            self.spares = [w for w in self.spares if w not in self.dead]
        nodes = list(decision.spare_starts)
        changed = bool(decision.changes_membership or dead_spares or nodes)
        while len(self.spares) < cfg.num_spares:
            node = nodes.pop(0) if nodes else len(self.spares) % cfg.num_nodes
            try:
                self._start_worker(node)
            except WorkerStartupError as exc:
                rep.notes.append(f"could not start a new spare: {exc}")
                break
        if changed:
            try:
                self._form_group()
                self._group_ok = True
            except (TransferError, RayError, GetTimeoutError) as exc:
                rep.notes.append(f"communicators not re-formed: {exc}")
        # Backups whose store died (e.g. with its node) are recreated from live replicas.
        if cfg.keep_backups and changed:
            self._drop_dead_stores()
        missing = [(l, e) for l in range(self.spec.num_layers) for e in range(self.spec.num_experts)
                   if (l, e) not in self.backup_of]
        if missing and cfg.keep_backups:
            try:
                self._make_backups(missing)
            except ElasticEPError as exc:
                rep.notes.append(f"backups not restored: {exc}")
        if changed or missing:
            self._prepare_spares()
        self._save()

    @property
    def _striping(self) -> bool:
        """Whether storage reads are shared with (and relayed by) live ranks on the destination's node."""
        return self.cfg.device == "cuda" if self.cfg.stripe_fetches is None else bool(self.cfg.stripe_fetches)

    def _prepare_spares(self) -> None:
        """Have each live spare map (and on GPUs page-lock) every host backup, in the background.

        With striped reads, members map every backup too (what they could read for a dead
        peer: all of them, since a rebalance changes what each holds), with no extra
        staging reserve. Page-locking is in place: no second host copy. Off the critical
        path: the calls are not awaited. A worker that needs a backup before it finishes
        reads it the slow way; ``status()`` shows progress.
        """
        if not (self.cfg.prepare_spares and self.cfg.keep_backups):
            return
        refs = self._backup_refs(sorted(self.backup_of))
        if not refs:
            return
        for wid in self.spares:
            if wid not in self.dead and wid in self.handles:
                self.preparing[wid] = self.handles[wid].prepare_backups.remote(refs, self.cfg.startup_timeout_s)
        if not self._striping:
            return
        for wid in self.members.values():
            if wid not in self.dead and wid in self.handles:
                self.preparing[wid] = self.handles[wid].prepare_backups.remote(refs, self.cfg.startup_timeout_s, 0.0)

    # ------------------------------------------------------------------------------------

    def _get_all(self, refs: dict, timeout_s: float, what: str, tolerate_dead: bool = False,
                 wids: Optional[dict] = None, typed: Optional[list] = None) -> dict:
        """ray.get a dict of refs with one deadline; returns {key: result} of those that answered.

        A dead actor is marked dead (``wids`` maps keys to worker ids; by default a str
        key is a worker id and an int key a rank). Failures raise TransferError unless
        ``tolerate_dead``. A typed error (an ElasticEPError other than TransferError) is
        appended as (key, error) to ``typed`` when given, else raised once every ref is done.
        """
        out = {}
        deadline = _now() + timeout_s
        errors, typed_errors = [], []
        for key, ref in refs.items():
            try:
                out[key] = ray.get(ref, timeout=max(0.01, deadline - _now()))
            except GetTimeoutError:
                errors.append(f"{key}: timed out after {timeout_s:.1f}s")
                ray.cancel(ref, force=False)
            except RayActorError:
                if wids is not None:
                    wid = wids.get(key)
                else:
                    wid = key if isinstance(key, str) else self.members.get(key) if isinstance(key, int) else None
                if wid is not None:
                    self._mark_dead(wid)
                errors.append(f"{key}: actor died")
            except RayError as exc:
                cause = getattr(exc, "cause", None) or exc
                if isinstance(cause, ElasticEPError) and not isinstance(cause, TransferError):
                    typed_errors.append((key, cause))
                    continue
                errors.append(f"{key}: {type(cause).__name__}: {str(cause)[:300]}")
        if typed is not None:
            typed.extend(typed_errors)
        elif typed_errors:
            raise typed_errors[0][1]
        if errors and not tolerate_dead:
            raise TransferError(f"{what} failed on " + "; ".join(errors))
        return out


def controller_actor_class():
    return ray.remote(num_cpus=0, max_concurrency=16, max_restarts=-1, max_task_retries=0)(Controller)
