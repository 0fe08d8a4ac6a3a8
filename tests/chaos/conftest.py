"""Fixtures for chaos tests: one local Ray per module, a tiny synthetic checkpoint, one long-lived cluster."""

import pytest

from elastic_ep.chaos import CHAOS_SPEC
from elastic_ep.storage import write_synthetic_checkpoint
from elastic_ep.testing import local_ray


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray for the whole module."""
    with local_ray("elastic-ep-chaos", prefix="eepc") as ray:
        yield ray


@pytest.fixture(scope="module")
def chaos_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt")
    write_synthetic_checkpoint(path, CHAOS_SPEC, preset="deepseek", num_shards=2)
    return str(path)
