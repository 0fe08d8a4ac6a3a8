"""Small helpers for tests and drills: a tiny model spec and a cluster config around a checkpoint."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Optional

from .config import ClusterConfig, ModelSpec

SMALL = ModelSpec(num_layers=3, num_experts=12, hidden=32, intermediate=16)


def small_config(checkpoint, tmp_path, **overrides) -> ClusterConfig:
    """4 ranks x 4 slots + 1 spare over ``SMALL``, with short timeouts and state under ``tmp_path``."""
    base = dict(
        model=SMALL,
        checkpoint=str(checkpoint),
        num_ranks=4,
        slots_per_rank=4,
        num_spares=1,
        call_timeout_s=30.0,
        transfer_timeout_s=10.0,
        startup_timeout_s=60.0,
        state_dir=str(Path(tmp_path) / "state"),
    )
    base.update(overrides)
    return ClusterConfig(**base)


def start_local_ray(namespace: str, prefix: str = "eepr", num_cpus: int = 4) -> None:
    """ray.init of a local Ray for tests: no dashboard, temp dir under /tmp (short socket paths), this repo on the
    workers' path."""
    import ray

    root = str(Path(__file__).resolve().parents[1])
    ray.init(
        num_cpus=num_cpus,
        include_dashboard=False,
        namespace=namespace,
        _temp_dir=tempfile.mkdtemp(prefix=prefix, dir="/tmp"),
        log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}},
    )


def kill_named_actors(timeout_s: float = 20.0) -> list[str]:
    """Kill every named actor of the connected Ray, in all namespaces; returns their names.

    Waits (up to ``timeout_s``) until the names are released: ray.kill frees them asynchronously.
    """
    import time

    import ray

    left = ray.util.list_named_actors(all_namespaces=True)
    for a in left:
        try:
            ray.kill(ray.get_actor(a["name"], namespace=a["namespace"]))
        except ValueError:  # gone meanwhile
            pass
    deadline = time.monotonic() + timeout_s
    while ray.util.list_named_actors(all_namespaces=True) and time.monotonic() < deadline:
        time.sleep(0.1)
    return [a["name"] for a in left]


def sigkill_workers(cluster, ranks_or_wids, timeout_s: float = 30.0) -> list[str]:
    """SIGKILL worker processes from outside, as the world kills them; returns their worker ids.

    Looks every pid up first (so the kills land together), then waits until the controller
    has noticed each death (``status()["dead"]``), so a following ``wait_healthy`` waits
    for the recovery instead of returning before it began.
    """
    import signal
    import time

    import ray

    targets = []
    for who in ranks_or_wids:
        info = ray.get(cluster.worker(who).ping.remote(), timeout=timeout_s)
        targets.append((info.worker_id, info.pid))
    for _, pid in targets:
        os.kill(pid, signal.SIGKILL)
    wids = [w for w, _ in targets]
    deadline = time.monotonic() + timeout_s
    while not set(wids) <= set(cluster.status()["dead"]):
        if time.monotonic() > deadline:
            raise TimeoutError(f"workers {wids} were SIGKILLed but not noticed dead within {timeout_s}s")
        time.sleep(0.02)
    return wids


@contextlib.contextmanager
def ray_node_cluster(num_nodes: int, namespace: str, system_config: Optional[dict] = None, cpus_per_node: int = 2):
    """A ``ray.cluster_utils.Cluster`` of ``num_nodes`` nodes on this machine (a head and workers), the
    driver connected to it; node i has the custom resource ``eep_node{i}``. Yields (ray, cluster, worker nodes)."""
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    tmp = tempfile.mkdtemp(prefix="eepn", dir="/tmp")
    # Cluster() records the head's address in Ray's default temp folder whatever temp_dir
    # says, and fails on a machine where no Ray session has created that folder yet.
    os.makedirs(os.path.join(tempfile.gettempdir(), "ray"), exist_ok=True)
    cluster = Cluster(initialize_head=True, head_node_args=dict(
        num_cpus=cpus_per_node, resources={"eep_node0": 1}, include_dashboard=False, temp_dir=tmp,
        _system_config=system_config or {}))
    workers = [cluster.add_node(num_cpus=cpus_per_node, resources={f"eep_node{i}": 1}) for i in range(1, num_nodes)]
    cluster.wait_for_nodes()
    root = str(Path(__file__).resolve().parents[1])
    ray.init(address=cluster.address, namespace=namespace, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": root}})

    @ray.remote(num_cpus=0)
    def where() -> str:
        return ray.get_runtime_context().get_node_id()

    # A task on each node first: its raylet then schedules (soft node affinity falls back to another
    # node while the target has not yet reported its resources).
    seen = ray.get([where.options(resources={f"eep_node{i}": 0.01}).remote() for i in range(num_nodes)], timeout=60)
    assert len(set(seen)) == num_nodes, seen
    try:
        yield ray, cluster, workers
    finally:
        ray.shutdown()
        cluster.shutdown()
