"""ElasticEPCluster: the API users call. Starts Ray (embedded or remote), the controller, and drives it."""

from __future__ import annotations

import os
import tempfile
import time
import uuid
from pathlib import Path
from typing import Optional, Union

import numpy as np

from .config import ClusterConfig
from .errors import ConfigError, ElasticEPError
from .workload import SkewedRouter, logical_to_slot_counts


def _repo_root() -> str:
    return str(Path(__file__).resolve().parents[1])


class ElasticEPCluster:
    """One elastic expert-parallel cluster.

    >>> cluster = ElasticEPCluster(ClusterConfig(checkpoint="ckpt/"))
    >>> cluster.start()
    >>> cluster.run_workload(batches=8)
    >>> report = cluster.rebalance()
    >>> cluster.verify()["ok"]
    True
    >>> cluster.shutdown()
    """

    def __init__(self, config: ClusterConfig, ray_init_kwargs: Optional[dict] = None):
        if not isinstance(config, ClusterConfig):
            raise ConfigError(f"config must be a ClusterConfig, got {type(config).__name__}")
        self.config = config
        self._ray_kwargs = dict(ray_init_kwargs or {})
        self._controller = None
        self._started_ray = False
        self._router: Optional[SkewedRouter] = None
        self.state_dir = config.state_dir or tempfile.mkdtemp(prefix="eep-state-")
        self.prefix = f"{config.name}-{uuid.uuid4().hex[:6]}"
        self.last_start: Optional[dict] = None

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> dict:
        """Connect to Ray (embedded when no address is given), start the controller and workers."""
        import ray

        from actors.controller import controller_actor_class

        if not ray.is_initialized():
            env = {"PYTHONPATH": os.pathsep.join(filter(None, [_repo_root(), os.environ.get("PYTHONPATH")]))}
            for key in ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST", "NVSHMEM_DISABLE_NVLS"):
                if key in os.environ:
                    env[key] = os.environ[key]
            kwargs = dict(runtime_env={"env_vars": env}, log_to_driver=False, namespace="elastic-ep")
            if self.config.address is None:
                kwargs["address"] = "local"  # never join a stray cluster through RAY_ADDRESS
                kwargs.update(include_dashboard=False, configure_logging=False)
                kwargs.setdefault("num_cpus", max(2, os.cpu_count() or 2))
            else:
                kwargs["address"] = self.config.address
            kwargs.update(self._ray_kwargs)
            ray.init(**kwargs)
            self._started_ray = True
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        cls = controller_actor_class()
        # Next to the driver when it can be (soft: a restart after that node died goes elsewhere).
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
        self._controller = cls.options(name=f"{self.prefix}-controller", scheduling_strategy=here).remote(
            self.config, self.state_dir, self.prefix
        )
        try:
            self.last_start = self._call("start", timeout=self.config.startup_timeout_s * 3)
        except BaseException:
            self.shutdown()  # no detached worker outlives a failed start (a with-block never reaches __exit__)
            raise
        return self.last_start

    def shutdown(self) -> None:
        """Stop every actor of this cluster (and Ray, if this cluster started it)."""
        import ray

        if self._controller is not None:
            try:
                ray.get(self._controller.shutdown.remote(), timeout=self.config.call_timeout_s)
            except Exception:
                pass
            try:
                ray.kill(self._controller)
            except Exception:
                pass
            self._controller = None
        if self._started_ray and ray.is_initialized():
            ray.shutdown()
            self._started_ray = False

    def __enter__(self) -> "ElasticEPCluster":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    # -- calls -----------------------------------------------------------------------------

    def _call(self, method: str, *args, timeout: Optional[float] = None, **kwargs):
        """Call the controller with a bound; survive a controller restart by retrying once it is back."""
        import ray
        from ray.exceptions import ActorDiedError, ActorUnavailableError, RayTaskError

        if self._controller is None:
            raise ElasticEPError("the cluster is not started; call start() first")
        limit = timeout or (self.config.call_timeout_s + 2 * self.config.transfer_timeout_s)
        deadline = time.monotonic() + limit
        while True:
            ref = getattr(self._controller, method).remote(*args, **kwargs)
            try:
                return ray.get(ref, timeout=max(0.01, deadline - time.monotonic()))
            except RayTaskError as exc:
                cause = exc.cause if getattr(exc, "cause", None) is not None else exc
                raise cause from None
            except (ActorUnavailableError, ActorDiedError) as exc:
                if isinstance(exc, ActorDiedError) and "restart" not in str(exc).lower():
                    if time.monotonic() > deadline:
                        raise
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)  # the controller is restarting: it resumes from its saved state

    def status(self) -> dict:
        """A snapshot of the cluster as a dict; the keys and their meaning are documented on
        ``elastic_ep.status.ClusterStatus`` (epoch, ranks, spares, dead, lost, unserved, layout, history, ...)."""
        return self._call("status").to_dict()

    def rebalance(self, load=None) -> dict:
        """Re-place experts by the recorded load, or by ``load`` [num_layers, num_experts] when given.

        Returns a report of what moved and each phase's time. Calls from several threads
        run one after the other, never interleaved. If the controller dies mid-way the
        call is retried on the restarted controller, which first rolls the interrupted
        one back or forward (see actors/controller.py, "Commit protocol").
        """
        return self._call("rebalance", None if load is None else np.asarray(load))

    def recover(self) -> dict:
        """Heal dead ranks now (the controller also does this on its own when auto_recover is on)."""
        return self._call("recover")

    def grow(self, num_ranks: int = 1) -> dict:
        return self._call("grow", num_ranks)

    def shrink(self, ranks: Union[int, list[int]]) -> dict:
        return self._call("shrink", [ranks] if isinstance(ranks, int) else list(ranks))

    def drain(self, rank: int) -> dict:
        """Move a live rank's experts to the others, commit, then release its worker process.

        Returns the report; ``safe_to_terminate_at`` (wall clock) is when the released
        process (and its node, once nothing else of this cluster runs there) may be shut
        down. Refused with CapacityError (naming the numbers) for the last rank, a rank
        already draining, or when the other ranks cannot hold every expert.
        """
        return self._call("drain", rank)

    def verify(self, against_checkpoint: bool = False) -> dict:
        """Check every slot's weights against its logical expert's reference fingerprint."""
        return self._call("verify", against_checkpoint)

    def kill(self, rank: Union[int, str], allow_restart: bool = False) -> str:
        """Kill a rank's worker process (a chaos drill); returns the worker id.

        With ``allow_restart`` Ray restarts the actor (if ``max_restarts`` allows) and
        the controller refills it in place.
        """
        return self._call("kill", rank, not allow_restart)

    def arm_worker_fault(self, rank: Union[int, str], phase: str, delay_s: float = 0.0) -> str:
        """Make a worker die when it next reaches ``phase`` (see elastic_ep.faults)."""
        return self._call("arm_worker_fault", rank, phase, delay_s)

    def arm_controller_fault(self, phase: str, delay_s: float = 0.0) -> None:
        """Make the controller die when it next reaches ``phase`` of a reconfiguration (it restarts and resumes)."""
        self._call("arm_controller_fault", phase, delay_s)

    def disarm_faults(self, rank: Union[int, str, None] = None) -> dict:
        """Disarm faults still armed on one worker (or on every live one); returns {worker id: phases}."""
        return self._call("disarm_worker_faults", rank)

    def wait_healthy(self, timeout_s: float = 60.0) -> dict:
        """Wait until no member or spare is dead and no reconfiguration runs; returns the status.

        Raises TimeoutError after ``timeout_s`` naming the dead workers and the last
        reconfiguration error (``status()["last_error"]``: e.g. too few slots left, or
        experts lost; call ``recover()`` to get it raised as its typed error).
        """
        deadline = time.monotonic() + timeout_s
        stuck_since = None
        while True:
            st = self.status()
            dead = [w for w in list(st["ranks"].values()) + st["spares"] if w in st["dead"]]
            if not dead and not st["busy"]:
                return st
            stuck = dead and not st["busy"] and st.get("last_error")
            stuck_since = (stuck_since or time.monotonic()) if stuck else None
            if stuck and time.monotonic() - stuck_since > 2.0:
                # Recovery is paused on an error waiting cannot fix (too few slots, experts lost).
                raise TimeoutError(f"cluster cannot heal dead {dead}: {st['last_error']}")
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"cluster not healthy after {timeout_s}s: dead members/spares {dead}, busy {st['busy']}, "
                    f"last error {st.get('last_error')}"
                )
            time.sleep(0.05)  # polls the controller's state (no event to wait on across the actor boundary)

    # -- load statistics -------------------------------------------------------------------

    def report_load(self, load) -> None:
        """A serving engine's token counts per logical expert: [num_layers, num_experts]."""
        self._call("report_load", np.asarray(load))

    def run_workload(self, batches: int = 8, tokens_per_batch: int = 4096, seed: int = 0, zipf_s: float = 1.2,
                     drift: float = 0.15) -> np.ndarray:
        """Route synthetic skewed, drifting batches; workers count the tokens their slots get.

        Returns the logical load of these batches: [num_layers, num_experts].
        """
        from .layout import ExpertLayout

        spec = self.config.model
        if self._router is None:
            self._router = SkewedRouter(spec.num_layers, spec.num_experts, zipf_s=zipf_s, drift=drift, seed=seed)
        layout = ExpertLayout.from_dict(self.status()["layout"])
        total = np.zeros((spec.num_layers, spec.num_experts))
        for _ in range(batches):
            self._router.step()
            load = self._router.route(tokens_per_batch)
            total += load
        self._call("record_slot_tokens", logical_to_slot_counts(layout, total))
        return total

    # -- handles for tests and drills ------------------------------------------------------

    def worker(self, rank: Union[int, str]):
        """The actor handle of a rank's worker."""
        return self._call("worker_handle", rank)

    @property
    def controller(self):
        return self._controller
