"""Fixtures for chaos tests: one local Ray per module, a tiny synthetic checkpoint, one long-lived cluster."""

import os
import tempfile

import pytest

from elastic_ep.chaos import CHAOS_SPEC
from elastic_ep.storage import write_synthetic_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray for the whole module, with its temp dir under /tmp (short socket paths)."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    tmp = tempfile.mkdtemp(prefix="eepc", dir="/tmp")
    ray.init(
        num_cpus=4,
        include_dashboard=False,
        namespace="elastic-ep-chaos",
        _temp_dir=tmp,
        log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": ROOT}},
    )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def chaos_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt")
    write_synthetic_checkpoint(path, CHAOS_SPEC, preset="deepseek", num_shards=2)
    return str(path)
