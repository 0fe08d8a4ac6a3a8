"""Fixtures for tests on a real local Ray: one Ray per module, small synthetic checkpoints."""

import os
import tempfile

import pytest

from elastic_ep.storage import write_synthetic_checkpoint

from elastic_ep.testing import SMALL


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray for the whole module, with its temp dir under /tmp (short socket paths)."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    tmp = tempfile.mkdtemp(prefix="eepr", dir="/tmp")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    ray.init(
        num_cpus=4,
        include_dashboard=False,
        namespace="elastic-ep-tests",
        _temp_dir=tmp,
        log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": root}},
    )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt")
    write_synthetic_checkpoint(path, SMALL, preset="deepseek", num_shards=2)
    return str(path)
