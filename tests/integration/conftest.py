"""Fixtures for tests on a real local Ray (``ray_local``: tests/conftest.py): small synthetic checkpoints."""

import pytest

from elastic_ep.storage import write_synthetic_checkpoint
from elastic_ep.testing import SMALL


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt")
    write_synthetic_checkpoint(path, SMALL, preset="deepseek", num_shards=2)
    return str(path)
