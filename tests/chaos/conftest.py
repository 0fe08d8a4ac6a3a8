"""Fixtures for chaos tests (``ray_local``: tests/conftest.py): a tiny synthetic checkpoint."""

import pytest

from elastic_ep.chaos import CHAOS_SPEC
from elastic_ep.storage import write_synthetic_checkpoint


@pytest.fixture(scope="module")
def chaos_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt")
    write_synthetic_checkpoint(path, CHAOS_SPEC, preset="deepseek", num_shards=2)
    return str(path)
