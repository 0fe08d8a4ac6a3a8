"""Shared pytest setup: import the repo's packages, Hypothesis's CI profile, skip GPU tests where CUDA is
absent, one local Ray shared by the modules that ask for ``ray_local``."""

import os
import sys
from pathlib import Path

import pytest
from hypothesis import settings

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # plain `pytest` (not `python -m pytest`) finds elastic_ep and actors

# CI (.ci/run sets HYPOTHESIS_PROFILE=ci) draws the same examples on every run, so a red CI always
# reproduces; runs elsewhere draw new ones each time and keep exploring.
settings.register_profile("ci", derandomize=True, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


def pytest_collection_modifyitems(config, items):
    """Within each folder, modules that use ``ray_local`` run first, so one local Ray serves them all
    (each module keeps its tests' order); skip tests marked ``gpu`` when no CUDA device is visible."""
    _USERS.update(item.module.__name__ for item in items if "ray_local" in item.fixturenames)
    order = {id(item): i for i, item in enumerate(items)}
    items.sort(key=lambda it: (str(it.path.parent), it.module.__name__ not in _USERS, order[id(it)]))
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# -- one local Ray for consecutive modules that use ``ray_local`` ---------------------------------
# A start and shutdown of Ray costs ~7 s on a 2-core machine; 12 modules ask for the same local Ray.
# They run first in their folder (pytest_collection_modifyitems) and share it; it is shut down before
# a module that does not ask for it (which may start its own Ray, a multi-node one, or none). At each
# module's end the named actors it left (its clusters' controllers, workers, backup stores) are
# killed, so no module sees another's actors.

_SHARED = {"gcs": None}  # the GCS address of the shared Ray while it runs
_USERS: set = set()  # names of the modules with a test that uses ray_local


def _shared_is_up() -> bool:
    import ray

    return ray.is_initialized() and ray.get_runtime_context().gcs_address == _SHARED["gcs"]


def _stop_shared() -> None:
    import ray

    if _shared_is_up():
        ray.shutdown()
    _SHARED["gcs"] = None


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    if item.module.__name__ not in _USERS:
        _stop_shared()


def pytest_sessionfinish(session, exitstatus):
    _stop_shared()


@pytest.fixture(scope="module")
def ray_local():
    """The shared local Ray (started if not running); the named actors the module leaves are killed at its end."""
    import ray

    from elastic_ep.testing import kill_named_actors, start_local_ray

    if not _shared_is_up():
        if ray.is_initialized():
            ray.shutdown()
        start_local_ray("elastic-ep-tests", prefix="eepr")
        _SHARED["gcs"] = ray.get_runtime_context().gcs_address
    yield ray
    if _shared_is_up():
        kill_named_actors()
