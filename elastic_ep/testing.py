"""Small helpers for tests and drills: a tiny model spec and a cluster config around a checkpoint."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

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


@contextlib.contextmanager
def local_ray(namespace: str, prefix: str = "eepr", num_cpus: int = 4):
    """A fresh local Ray with its temp dir under /tmp (short socket paths); shut down on exit."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    root = str(Path(__file__).resolve().parents[1])
    ray.init(
        num_cpus=num_cpus,
        include_dashboard=False,
        namespace=namespace,
        _temp_dir=tempfile.mkdtemp(prefix=prefix, dir="/tmp"),
        log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}},
    )
    try:
        yield ray
    finally:
        ray.shutdown()
