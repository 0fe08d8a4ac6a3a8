"""Fixtures for tests on a real local Ray: one Ray per module, small synthetic checkpoints."""

import pytest

from elastic_ep.storage import write_synthetic_checkpoint
from elastic_ep.testing import SMALL, local_ray


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray for the whole module."""
    with local_ray("elastic-ep-tests", prefix="eepr") as ray:
        yield ray


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt")
    write_synthetic_checkpoint(path, SMALL, preset="deepseek", num_shards=2)
    return str(path)
