"""RayWorkerGroup: the WorkerGroup of detached Ray actors, and the pins of logical nodes to Ray nodes."""

from __future__ import annotations

import logging
import time
from typing import Any, Optional

import ray
from ray.exceptions import ActorUnavailableError, GetTimeoutError, RayActorError, RayError

from elastic_ep.config import ClusterConfig
from elastic_ep.errors import ElasticEPError, WorkerStartupError
from elastic_ep.replies import WorkerPing

from .worker_group import Call, WorkerGroup, WorkerRecord, collect, is_typed

log = logging.getLogger("elastic_ep.workers")

# Ray 2.60 ignores a soft NodeAffinitySchedulingStrategy for an actor that requests no resources
# (measured on a 3-node local cluster: num_cpus=0 actors landed on other nodes, 0.01 CPU honoured
# it); pinned CPU actors therefore ask for this sliver of a CPU.
PIN_CPUS = 0.001


def _now() -> float:
    return time.perf_counter()


def _autoscaling() -> bool:
    """Whether an autoscaler published this Ray cluster's node types (it may start nodes on demand)."""
    try:
        from ray._private.state import state

        return state.get_cluster_config() is not None
    except Exception:  # noqa: BLE001 - no such record (or API) on this Ray: a fixed set of nodes
        return False


class NodePins:
    """Pins logical node i to one alive Ray node (soft) when the cluster has several.

    The first time, logical node i gets the i-th alive Ray node; the pin then stays, so
    when a Ray node dies only its own logical node moves (to an alive node no other
    logical node uses, if there is one) and the others keep their machines.
    """

    def __init__(self, node_ids: Optional[dict[int, str]] = None):
        self.node_ids: dict[int, str] = dict(node_ids or {})  # logical node -> Ray node id

    def strategy(self, node_index: int):
        nodes = sorted(n["NodeID"] for n in ray.nodes() if n.get("Alive"))
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

    def options(self, node_index: int, device: str) -> dict:
        """Scheduling options that pin an actor to ``node_index`` (none on a one-node cluster)."""
        strategy = self.strategy(node_index)
        if strategy is None:
            return {}
        return {"scheduling_strategy": strategy, **({} if device == "cuda" else {"num_cpus": PIN_CPUS})}


class RayWorkerGroup(WorkerGroup):
    """Workers as detached named Ray actors (they outlive a controller restart, which reattaches by name)."""

    def __init__(self, cfg: ClusterConfig, prefix: str, pins: NodePins,
                 records: Optional[list[WorkerRecord]] = None, next_worker: int = 0):
        super().__init__(records, next_worker)
        self.cfg = cfg
        self.prefix = prefix
        self.pins = pins
        self.handles: dict[str, Any] = {}
        self.progress: dict[str, tuple[int, int]] = {}  # call name -> (replies in, calls made): drivers draw bars

    def name_of(self, wid: str) -> str:
        return f"{self.prefix}-{wid}"

    def reattach(self, wids: list[str]) -> None:
        """After a controller restart: find each worker by name; one that is gone is marked dead."""
        for wid in wids:
            try:
                self.handles[wid] = ray.get_actor(self.name_of(wid))
            except ValueError:
                self.mark_dead(wid)

    def handle(self, wid: str):
        return self.handles[wid]

    def ask(self, gpu_share: float, pinned: bool) -> dict[str, float]:
        """What one worker asks Ray for: its GPU share and a CPU on GPUs; on CPUs nothing, or a sliver when pinned."""
        if self.cfg.device == "cuda":
            return {"GPU": float(gpu_share), "CPU": 1.0}
        return {"CPU": PIN_CPUS} if pinned else {}

    def _spawn(self, wid: str, node: int, gpu_share: float) -> None:
        from actors.worker import worker_actor_class

        cfg = self.cfg
        strategy = self.pins.strategy(node)
        ask = self.ask(gpu_share, strategy is not None)
        opts = dict(name=self.name_of(wid), lifetime="detached", max_restarts=cfg.max_restarts,
                    num_cpus=ask.get("CPU", 0.0))
        if "GPU" in ask:
            opts["num_gpus"] = ask["GPU"]
        if strategy is not None:
            opts["scheduling_strategy"] = strategy
        self.handles[wid] = worker_actor_class(cfg.device).options(**opts).remote(
            wid, cfg.model, cfg.slots_per_rank, cfg.device, cfg.checkpoint, cfg.preset, cfg.staging_reserve,
        )

    def free_resources(self) -> Optional[tuple[dict[str, float], bool]]:
        if _autoscaling():
            return None  # an autoscaler may add nodes: what is free now is no limit
        pinned = len([x for x in ray.nodes() if x.get("Alive")]) > 1
        return {k: float(v) for k, v in ray.available_resources().items() if k in ("GPU", "CPU")}, pinned

    def wait_started(self, wids: list[str], timeout_s: float) -> None:
        try:
            self.call_all({w: (w, "ping", ()) for w in wids}, timeout_s, "start")
        except ElasticEPError as exc:
            raise WorkerStartupError(str(exc)) from exc

    def submit(self, wid: str, method: str, *args):
        """One call without waiting (background work such as prepare_backups): its ObjectRef."""
        return getattr(self.handles[wid], method).remote(*args)

    def wait_gone(self, watch_ref, timeout_s: float) -> bool:
        """Whether a pending ``watch`` call ended (its worker died) within ``timeout_s``."""
        ready, _ = ray.wait([watch_ref], timeout=timeout_s)
        return bool(ready)

    def call_all(self, calls: dict[Any, Call], timeout_s: float, what: str, tolerate_dead: bool = False,
                 typed: Optional[list] = None) -> dict:
        refs = {k: (wid, getattr(self.handles[wid], m).remote(*args)) for k, (wid, m, args) in calls.items()}
        return self.wait_all(refs, timeout_s, what, tolerate_dead, typed)

    def wait_all(self, refs: dict, timeout_s: float, what: str, tolerate_dead: bool = False,
                 typed: Optional[list] = None) -> dict:
        """Wait for {key: (worker id or None, ObjectRef)} with one deadline (see ``call_all``)."""
        out, errors, typed_errors = {}, [], []
        deadline = _now() + timeout_s
        for key, (wid, ref) in refs.items():
            try:
                out[key] = ray.get(ref, timeout=max(0.01, deadline - _now()))
                self.progress[what] = (len(out), len(refs))
            except GetTimeoutError:
                errors.append(f"{key}: timed out after {timeout_s:.1f}s")
                ray.cancel(ref, force=False)
            except RayActorError:
                if wid is not None:
                    self.mark_dead(wid)
                errors.append(f"{key}: actor died")
            except RayError as exc:
                cause = getattr(exc, "cause", None) or exc
                if is_typed(cause):
                    typed_errors.append((key, cause))
                    continue
                errors.append(f"{key}: {type(cause).__name__}: {str(cause)[:300]}")
        return collect(out, errors, typed_errors, typed, what, tolerate_dead)

    def mark_dead(self, wid: str) -> bool:
        if super().mark_dead(wid):
            log.warning("worker %s died", wid)
            return True
        return False

    def ping(self, wid: str, timeout_s: float) -> Optional[WorkerPing]:
        try:
            return ray.get(self.handles[wid].ping.remote(), timeout=timeout_s)
        except (RayError, GetTimeoutError, KeyError):
            return None

    def probe(self, wids: list[str], timeout_s: float, restart_wait_s: float = 0.0) -> set[str]:
        refs = {w: self.handles[w].ping.remote() for w in wids if w in self.handles}
        deadline = _now() + timeout_s
        restarted = set()
        for wid, ref in refs.items():
            info, limit = None, deadline
            while info is None:
                try:
                    info = ray.get(ref, timeout=max(0.01, limit - _now()))
                except ActorUnavailableError:
                    if not restart_wait_s:
                        break
                    if limit == deadline:
                        limit = _now() + restart_wait_s
                    time.sleep(0.1)
                    ref = self.handles[wid].ping.remote()
                except (RayError, GetTimeoutError):
                    break
            if info is None:
                self.mark_dead(wid)
            elif restart_wait_s and self.records[wid].role == "member" and info.epoch < 0:
                self.mark_alive(wid)  # restarted by Ray: same actor, state lost
                restarted.add(wid)
        return restarted

    def kill(self, wid: str, restart: bool = False) -> None:
        handle = self.handles.get(wid)
        if handle is None:
            return
        try:
            ray.kill(handle, no_restart=not restart)
        except RayError:  # already gone
            return
        if restart:
            return
        # ray.kill is asynchronous: return once the worker is gone, so a caller's next look sees it dead.
        deadline = _now() + self.cfg.call_timeout_s
        while _now() < deadline:
            try:
                ray.get(handle.ping.remote(), timeout=max(0.01, deadline - _now()))
                time.sleep(0.005)
            except (RayError, GetTimeoutError):
                break

    def release(self, wid: str) -> None:
        super().release(wid)
        self.handles.pop(wid, None)

    def device_key(self, wid: str) -> str:
        """"node:gpus" of a worker on GPUs, else its id (cached in its record)."""
        rec = self.records[wid]
        if rec.device_key is None:
            info = ray.get(self.handles[wid].ping.remote(), timeout=self.cfg.call_timeout_s)
            gpus = ",".join(info.gpus)
            key = f"{info.node_id}:{gpus}" if gpus and self.cfg.device == "cuda" else wid
            self._update(wid, device_key=key)
        return self.records[wid].device_key

    def shutdown(self) -> None:
        for handle in list(self.handles.values()):
            try:
                ray.kill(handle)
            except Exception:  # noqa: BLE001 - already gone
                pass

