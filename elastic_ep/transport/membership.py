"""Joining and leaving a group through ray.util.collective: backend registration, form, get, leave."""

from __future__ import annotations

import threading

from ray.util import collective as ray_collective
from ray.util.collective.backend_registry import BackendRegistry, register_collective_backend

from ..errors import TransferError
from .gloo import GlooGroup
from .group import P2PGroup
from .nccl import NcclGroup
from .ops import DEFAULT_MAX_OPS_IN_FLIGHT, GLOO_BACKEND, NCCL_BACKEND, Device
from .rendezvous import as_device, configure_group, discard_config

_register_lock = threading.Lock()


def register_backends() -> None:
    """Register EEP_GLOO and EEP_NCCL with ``ray.util.collective``; idempotent, call in every process."""
    registry = BackendRegistry()  # the process-wide singleton
    with _register_lock:
        for name, cls in ((GLOO_BACKEND, GlooGroup), (NCCL_BACKEND, NcclGroup)):
            if not registry.is_registered(name):
                register_collective_backend(name, cls)



def form_group(
    group_name: str,
    world_size: int,
    rank: int,
    host: str,
    port: int,
    timeout_s: float,
    device: Device = "cpu",
    max_ops_in_flight: int = DEFAULT_MAX_OPS_IN_FLIGHT,
) -> P2PGroup:
    """Join the group ``group_name`` from inside a Ray actor; blocks until every rank has joined.

    Picks EEP_NCCL for a CUDA ``device`` and EEP_GLOO otherwise. Raises TransferTimeoutError
    naming the ranks that did not join within ``timeout_s``; a failed name cannot be retried
    (the store keeps its keys): form the next generation's group instead.
    """
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be an int >= 1, got {world_size!r}")
    if not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be an int in 0..{world_size - 1}, got {rank!r}")
    register_backends()
    dev = as_device(device)
    backend = NCCL_BACKEND if dev.type == "cuda" else GLOO_BACKEND
    if ray_collective.is_group_initialized(group_name):
        raise TransferError(f"group {group_name!r} already exists in this process")
    configure_group(group_name, host, port, timeout_s, dev, max_ops_in_flight)
    try:
        ray_collective.init_collective_group(world_size, rank, backend=backend, group_name=group_name)
    finally:
        discard_config(group_name)
    return get_group(group_name)


def get_group(group_name: str) -> P2PGroup:
    """The group ``group_name`` formed in this process."""
    if not ray_collective.is_group_initialized(group_name):
        raise TransferError(f"group {group_name!r} is not formed in this process")
    from ray.util.collective.collective import get_group_handle

    group = get_group_handle(group_name)
    if not isinstance(group, P2PGroup):
        raise TransferError(f"group {group_name!r} is a {type(group).__name__}, not an elastic-ep group")
    return group


def leave_group(group_name: str) -> None:
    """Destroy this process's handle on ``group_name``; a no-op if it has none. Never hangs on a dead peer."""
    if ray_collective.is_group_initialized(group_name):
        ray_collective.destroy_collective_group(group_name)

