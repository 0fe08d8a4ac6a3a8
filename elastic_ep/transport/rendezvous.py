"""Where a group's ranks meet: the store server, and the per-process table of how each group is built."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from datetime import timedelta
from typing import Optional

import ray
import torch
import torch.distributed as dist

from ..errors import TransferError
from .ops import DEFAULT_MAX_OPS_IN_FLIGHT, Device

ABANDON_KEY = "eep/abandoned"  # set (under the group's prefix) by StoreServer.abandon


def node_ip() -> str:
    """This node's IP as Ray sees it, or loopback outside Ray."""
    if ray.is_initialized():
        return ray.util.get_node_ip_address()
    return "127.0.0.1"


class StoreServer:
    """The TCPStore server every generation's group meets at; hold one in a long-lived process (the controller).

    Keys accumulate (a few hundred bytes per rank per generation) until the server is closed.
    """

    def __init__(self, host: Optional[str] = None, timeout_s: float = 60.0):
        self.host = host or node_ip()  # address the ranks connect to
        self._store: Optional[dist.TCPStore] = dist.TCPStore(
            self.host, 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=timeout_s)
        )
        self.port = int(self._store.port)  # chosen by the OS

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port

    def abandon(self, group_name: str, reason: str) -> None:
        """Release the ranks still waiting to form ``group_name``: they raise ``FormationAbandoned``
        within ms instead of waiting out their timeout (e.g. a member died before joining)."""
        if self._store is not None:  # the same prefix the group's ranks see (P2PGroup._connect_store)
            dist.PrefixStore(group_name + "/", self._store).set(ABANDON_KEY, reason[:500])

    def close(self) -> None:
        """Stop serving. Groups already formed keep working; new ones cannot form."""
        self._store = None


@dataclass(frozen=True)
class GroupConfig:
    """What a group's constructor needs beyond ``(world_size, rank, group_name)``."""

    host: str  # StoreServer host
    port: int  # StoreServer port
    timeout_s: float  # bound on formation and the default bound on every op
    device: torch.device  # cpu (EEP_GLOO) or cuda:N (EEP_NCCL)
    max_ops_in_flight: int = DEFAULT_MAX_OPS_IN_FLIGHT  # ops posted together in one round


_configs: dict[str, GroupConfig] = {}
_configs_lock = threading.Lock()


def as_device(device: Device) -> torch.device:
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be cpu or cuda[:N], got {device!r}")
    return dev


def configure_group(
    group_name: str,
    host: str,
    port: int,
    timeout_s: float,
    device: Device = "cpu",
    max_ops_in_flight: int = DEFAULT_MAX_OPS_IN_FLIGHT,
) -> None:
    """Record, in this process, how the group ``group_name`` is to be built.

    Call before ``ray.util.collective.init_collective_group(..., group_name=group_name)``; the
    group's constructor consumes the entry. ``form_group`` does both.
    """
    if not isinstance(group_name, str) or not group_name:
        raise ValueError(f"group_name must be a non-empty str, got {group_name!r}")
    if not isinstance(port, int) or not 0 < port < 65536:
        raise ValueError(f"port must be an int in 1..65535, got {port!r}")
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s!r}")
    if not isinstance(max_ops_in_flight, int) or max_ops_in_flight < 1:
        raise ValueError(f"max_ops_in_flight must be an int >= 1, got {max_ops_in_flight!r}")
    config = GroupConfig(str(host), port, float(timeout_s), as_device(device), max_ops_in_flight)
    with _configs_lock:
        _configs[group_name] = config


def take_config(group_name: str) -> GroupConfig:
    with _configs_lock:
        config = _configs.pop(group_name, None)
    if config is None:
        raise TransferError(
            f"group {group_name!r} has no configuration in this process: call configure_group() "
            "(or use form_group()) before init_collective_group()"
        )
    return config



def discard_config(group_name: str) -> None:
    """Forget ``group_name``'s configuration if its constructor did not consume it."""
    with _configs_lock:
        _configs.pop(group_name, None)
