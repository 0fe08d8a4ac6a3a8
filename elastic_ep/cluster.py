"""ElasticEPCluster: the API users call. Starts Ray (embedded or remote), the controller, and drives it."""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time
import uuid
from pathlib import Path
from typing import Optional, Union

import numpy as np

from .config import ClusterConfig
from .errors import ClusterNotFoundError, ConfigError, ElasticEPError
from .report import RebalanceReport
from .status import StartReport, VerifyResult
from .workload import SkewedRouter


NAMESPACE = "elastic-ep"  # Ray namespace of every controller, so other processes can attach by name
CONTROLLER_SUFFIX = "-controller"  # a controller's actor name: f"{cluster prefix}{CONTROLLER_SUFFIX}"
CONNECT_TIMEOUT_S = 5.0  # bound on reaching a Ray address before attaching


def _repo_root() -> str:
    return str(Path(__file__).resolve().parents[1])


def worker_runtime_env() -> dict:
    """Ray runtime_env so workers import elastic_ep and actors from this repository, keeping the
    caller's PYTHONPATH (GPU hosts install Ray there), the NCCL switches and CUDA_LAUNCH_BLOCKING (debugging)."""
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [_repo_root(), os.environ.get("PYTHONPATH")]))}
    for key in ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST", "NVSHMEM_DISABLE_NVLS", "CUDA_LAUNCH_BLOCKING"):
        if key in os.environ:
            env[key] = os.environ[key]
    return {"env_vars": env}


class ElasticEPCluster:
    """One elastic expert-parallel cluster.

    >>> cluster = ElasticEPCluster(ClusterConfig(checkpoint="ckpt/"))
    >>> cluster.start()
    >>> cluster.run_workload(batches=8)
    >>> report = cluster.rebalance()  # a RebalanceReport: report.phases, report.bytes_p2p, ...
    >>> cluster.verify().ok
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
        self._client = None  # the client behind moe() and run_workload()
        self.state_dir = config.state_dir or tempfile.mkdtemp(prefix="eep-state-")
        self.prefix = f"{config.name}-{uuid.uuid4().hex[:6]}"
        self.last_start: Optional[StartReport] = None
        self._attached = False  # True: reached through attach(); leaving detaches instead of stopping

    # -- lifecycle -------------------------------------------------------------------------

    def start(self, detached: bool = False, progress: Optional[bool] = None) -> StartReport:
        """Connect to Ray (embedded when no address is given), start the controller and workers.

        ``detached``: the controller outlives this process (``elastic-ep start``); stop it with
        ``ElasticEPCluster.attach(address, name).shutdown()``. Needs a Ray that outlives it too.
        ``progress``: bars for loading and backups (None: only on a terminal).
        """
        import ray

        from actors.controller import controller_actor_class

        if self._controller is not None:
            return self.last_start or StartReport(resumed=True)
        if not ray.is_initialized():
            kwargs = dict(runtime_env=worker_runtime_env(), log_to_driver=False, namespace=NAMESPACE)
            if self.config.address is None:
                kwargs["address"] = "local"  # never join a stray cluster through RAY_ADDRESS
                kwargs.update(include_dashboard=False, configure_logging=False)
                kwargs.setdefault("num_cpus", max(2, os.cpu_count() or 2))
            else:
                kwargs["address"] = self.config.address
            kwargs.update(self._ray_kwargs)
            ray.init(**kwargs)
            self._started_ray = True
        if detached:  # it outlives this process: another one of this name would be ambiguous to attach to
            _refuse_running(self.config.name)
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        cls = controller_actor_class()
        # Next to the driver when it can be (soft: a restart after that node died goes elsewhere).
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
        opts = dict(name=f"{self.prefix}{CONTROLLER_SUFFIX}", namespace=NAMESPACE, scheduling_strategy=here)
        if detached:
            opts["lifetime"] = "detached"
        self._controller = cls.options(**opts).remote(self.config, self.state_dir, self.prefix)
        try:
            self.last_start = self._call_with_bars("start", timeout=self.config.startup_timeout_s * 3, show=progress)
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

    def detach(self) -> None:
        """Let go of the cluster without stopping it (and disconnect from Ray if this object connected)."""
        import ray

        self._controller = None
        if self._started_ray and ray.is_initialized():
            ray.shutdown()
            self._started_ray = False

    def __enter__(self) -> "ElasticEPCluster":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._attached:
            self.detach()
        else:
            self.shutdown()

    # -- attaching to a running cluster ----------------------------------------------------

    @classmethod
    def attach(cls, address: Optional[str] = "auto", name: str = "elastic-ep") -> "ElasticEPCluster":
        """The cluster named ``name`` that another process started on the Ray at ``address``.

        ``address``: a Ray (GCS) address ``host:port``, or ``auto`` for the Ray of this machine
        (or ``RAY_ADDRESS``). ``name``: the ``ClusterConfig.name`` it was started with, or its
        full prefix (``<name>-<id>``, as ``status`` shows) when several share a name.
        Raises ClusterNotFoundError when no Ray answers or no such cluster runs there.
        Leaving a ``with`` block (or ``detach()``) lets go; ``shutdown()`` stops the cluster.
        """
        import ray

        started = False
        if not ray.is_initialized():
            _connect(address)
            started = True
        try:
            prefix = find_cluster(name)
            controller = ray.get_actor(prefix + CONTROLLER_SUFFIX, namespace=NAMESPACE)
            cfg, state_dir = ray.get(
                controller.__ray_call__.remote(lambda c: (c.cfg, str(c.state_path.parent))), timeout=30.0
            )
        except BaseException:
            if started:
                ray.shutdown()
            raise
        self = cls(dataclasses.replace(cfg, state_dir=state_dir))
        self.prefix = prefix
        self._controller, self._started_ray, self._attached = controller, started, True
        return self

    # -- calls -----------------------------------------------------------------------------

    def _reconfigure_bound_s(self) -> float:
        """How long one controller call may take by default: a call plus two transfers' worth."""
        return self.config.call_timeout_s + 2 * self.config.transfer_timeout_s

    def _call(self, method: str, *args, timeout: Optional[float] = None, **kwargs):
        """Call the controller with a bound; survive a controller restart by retrying once it is back."""
        import ray
        from ray.exceptions import ActorDiedError, ActorUnavailableError, RayTaskError

        if self._controller is None:
            raise ElasticEPError("the cluster is not started; call start() first")
        limit = timeout or self._reconfigure_bound_s()
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

    def _call_with_bars(self, method: str, *args, timeout: float, show: Optional[bool] = None):
        """A controller call that draws progress bars of its long steps (elastic_ep.progress) while it runs."""
        import ray
        from ray.exceptions import ActorDiedError, ActorUnavailableError, RayTaskError

        from .progress import wait_with_bars

        controller = self._controller
        try:
            return wait_with_bars(lambda: getattr(controller, method).remote(*args),
                                  lambda: ray.get(controller.__ray_call__.remote(lambda c: c.progress), timeout=5.0),
                                  timeout, show)
        except RayTaskError as exc:
            raise (exc.cause if getattr(exc, "cause", None) is not None else exc) from None
        except (ActorUnavailableError, ActorDiedError):
            return self._call(method, *args, timeout=timeout)  # a restarting controller: retried there

    def status(self) -> dict:
        """A snapshot of the cluster as a dict; the keys and their meaning are documented on
        ``elastic_ep.status.ClusterStatus`` (epoch, ranks, spares, dead, lost, unserved, layout, history, ...)."""
        return self._call("status").to_dict()

    def drain(self, rank: int) -> RebalanceReport:
        """Move a live rank's experts to the others, commit, then release its worker process.

        Returns the report; ``safe_to_terminate_at`` (wall clock) is when the released
        process (and its node, once nothing else of this cluster runs there) may be shut
        down. Refused with CapacityError (naming the numbers) for the last rank, a rank
        already draining, or when the other ranks cannot hold every expert.
        """
        return self._call("drain", rank)

    def rebalance(self, load=None, layers_per_step: Optional[int] = None) -> RebalanceReport:
        """Re-place experts by the recorded load, or by ``load`` [num_layers, num_experts] when given.

        layers_per_step: MoE layers migrated per commit (None: ``ClusterConfig.layers_per_step``;
        0: the whole model in one commit); the report's ``migration_steps``, ``commits`` and
        ``staging_peak_bytes`` say how it went.

        Returns a RebalanceReport of what moved and each phase's time (``to_dict()`` for JSON). Calls from several threads
        run one after the other, never interleaved. If the controller dies mid-way the
        call is retried on the restarted controller, which first rolls the interrupted
        one back or forward (see actors/controller.py, "Commit protocol").
        """
        lps = self.config.layers_per_step if layers_per_step is None else layers_per_step
        steps = -(-self.config.model.num_layers // lps) if isinstance(lps, int) and lps > 0 else 1
        limit = steps * self._reconfigure_bound_s()  # a bound per commit
        return self._call("rebalance", None if load is None else np.asarray(load), layers_per_step, timeout=limit)

    def recover(self) -> RebalanceReport:
        """Heal dead ranks now (the controller also does this on its own when auto_recover is on)."""
        return self._call("recover")

    def grow(self, num_ranks: int = 1) -> RebalanceReport:
        return self._call("grow", num_ranks)

    def shrink(self, ranks: Union[int, list[int]]) -> RebalanceReport:
        return self._call("shrink", [ranks] if isinstance(ranks, int) else list(ranks))

    def verify(self, against_checkpoint: bool = False, progress: Optional[bool] = None) -> VerifyResult:
        """Check every slot's weights against its logical expert's reference fingerprint."""
        if against_checkpoint:
            return self._call_with_bars("verify", True, timeout=self._reconfigure_bound_s(), show=progress)
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

    def served_load(self) -> Optional[np.ndarray]:
        """The load rebalance() will use: the workers' served-token counts, pulled into the window, [L, E].

        Each (token, expert) pair a slot served counts once for its logical expert; the
        window also holds ``report_load`` reports. None when nothing was counted yet.
        """
        return self._call("collect_load")

    def run_workload(self, batches: int = 8, tokens_per_batch: int = 4096, seed: int = 0, zipf_s: float = 1.2,
                     drift: float = 0.15) -> np.ndarray:
        """Serve synthetic skewed, drifting batches through the experts; workers count the tokens their slots serve.

        Each batch: the synthetic router's decisions for every MoE layer and random hidden
        states, one ``moe`` call per layer. Returns the logical load served: [num_layers, num_experts].
        """
        import torch

        from .storage import torch_dtype

        spec = self.config.model
        if self._router is None:
            self._router = SkewedRouter(spec.num_layers, spec.num_experts, zipf_s=zipf_s, drift=drift, seed=seed)
        gen = torch.Generator().manual_seed(seed)
        client = self._shared_client()
        total = np.zeros((spec.num_layers, spec.num_experts))
        for _ in range(batches):
            self._router.step()
            ids, weights = self._router.decide(tokens_per_batch)
            hidden = torch.randn(tokens_per_batch, spec.hidden, generator=gen).to(torch_dtype(spec))
            for layer in range(spec.num_layers):
                client.moe(layer, hidden, ids[layer], weights[layer])
                total[layer] += np.bincount(ids[layer].ravel(), minlength=spec.num_experts)
        return total

    # -- serving ---------------------------------------------------------------------------

    def client(self, view_max_age_s: float = 0.5, **options):
        """A long-lived serving handle (``MoEClient``) for serving loops; share it between threads or make several.

        options: MoEClient's (unavailable_timeout_s, degraded, log, retry_sleep_s); metrics go under this cluster's name.
        """
        from .serving.client import MoEClient

        options.setdefault("metrics_cluster", self.config.name)
        return MoEClient(lambda: self._call("committed_view"), self.config.model,
                         call_timeout_s=self.config.call_timeout_s, view_max_age_s=view_max_age_s, **options)

    def moe(self, layer: int, hidden_states, topk_ids, topk_weights):
        """One MoE layer's routed-experts output for given router decisions (see ``MoEClient.moe``).

        hidden_states: [num_tokens, hidden] of the model dtype; topk_ids / topk_weights:
        [num_tokens, top_k]. Returns [num_tokens, hidden] of the model dtype.
        """
        return self._shared_client().moe(layer, hidden_states, topk_ids, topk_weights)

    def _shared_client(self):
        if self._client is None:
            self._client = self.client()
        return self._client

    # -- handles for tests and drills ------------------------------------------------------

    def worker(self, rank: Union[int, str]):
        """The actor handle of a rank's worker."""
        return self._call("worker_handle", rank)

    @property
    def controller(self):
        return self._controller


def _connect(address: Optional[str]) -> None:
    """ray.init to an existing cluster, or ClusterNotFoundError naming the address and the fix."""
    import socket

    import ray

    address = address or "auto"
    if address.startswith(("http://", "https://")):
        raise ClusterNotFoundError(
            f"address {address!r} is a dashboard URL; attach needs the Ray (GCS) address, e.g. 127.0.0.1:6379, "
            "or 'auto'"
        )
    if address != "auto":
        host, _, port = address.rpartition(":")
        try:
            socket.create_connection((host or "127.0.0.1", int(port)), timeout=CONNECT_TIMEOUT_S).close()
        except (OSError, ValueError) as exc:
            raise ClusterNotFoundError(
                f"no Ray cluster answers at {address!r} ({type(exc).__name__}: {exc}); start one with "
                "`ray start --head` or pass the GCS address it printed (host:6379)"
            ) from None
    try:
        ray.init(address=address, namespace=NAMESPACE, log_to_driver=False, configure_logging=False)
    except ConnectionError as exc:
        hint = "" if os.environ.get("RAY_AUTH_MODE", "").lower() == "token" else (
            "; if it uses token authentication (Ray 2.60 turns it on where a token exists), "
            "export RAY_AUTH_MODE=token and try again")
        raise ClusterNotFoundError(f"no Ray cluster found at {address!r}: {exc}{hint}") from None
    except Exception as exc:
        if type(exc).__name__ == "AuthenticationError":
            raise ClusterNotFoundError(
                f"the Ray cluster at {address!r} refused the connection ({exc}); it uses token authentication: "
                "export RAY_AUTH_MODE=token (the token is read from ~/.ray/auth_token or RAY_AUTH_TOKEN)"
            ) from None
        raise


def _refuse_running(name: str) -> None:
    try:
        running = find_cluster(name)
    except ClusterNotFoundError:
        return
    raise ConfigError(f"a cluster named {name!r} already runs ({running}); attach to it "
                      f"(elastic-ep status --name {name}) or pick another name")


def find_cluster(name: str) -> str:
    """The prefix of the one running cluster called ``name`` (or whose prefix is ``name``)."""
    import ray

    prefixes = sorted(
        a["name"][: -len(CONTROLLER_SUFFIX)]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["namespace"] == NAMESPACE and a["name"].endswith(CONTROLLER_SUFFIX)
    )
    if name in prefixes:
        return name
    matches = [p for p in prefixes if p.rsplit("-", 1)[0] == name]
    if not matches:
        running = ", ".join(prefixes) or "none"
        raise ClusterNotFoundError(f"no elastic-ep cluster named {name!r} runs on this Ray (running: {running})")
    if len(matches) > 1:
        raise ClusterNotFoundError(
            f"{len(matches)} clusters are named {name!r}: {matches}; pass the full one, e.g. --name {matches[0]}"
        )
    return matches[0]
