"""Names, ops and rounds of a point-to-point exchange (no communication happens here)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence, Union

import torch

GLOO_BACKEND = "EEP_GLOO"  # CPU tensors over torch's ProcessGroupGloo
NCCL_BACKEND = "EEP_NCCL"  # CUDA tensors over torch's ProcessGroupNCCL
DEFAULT_MAX_OPS_IN_FLIGHT = 64  # ops posted together in one round (see the package docstring)
P2P_TAG = 0  # one tag for every point-to-point op: matching is by per-pair order

Device = Union[str, torch.device]


def group_name_for(cluster_name: str, generation: int) -> str:
    """Name of the collective group of one communicator generation, e.g. ``"eep-gen3"``."""
    if not isinstance(cluster_name, str) or not cluster_name:
        raise ValueError(f"cluster_name must be a non-empty str, got {cluster_name!r}")
    if not isinstance(generation, int) or isinstance(generation, bool) or generation < 0:
        raise ValueError(f"generation must be an int >= 0, got {generation!r}")
    return f"{cluster_name}-gen{generation}"


@dataclass(frozen=True, eq=False)  # eq would compare tensors elementwise
class P2POp:
    """One point-to-point op of an exchange: send ``tensor`` to ``peer``, or receive into it from ``peer``."""

    kind: Literal["send", "recv"]
    tensor: torch.Tensor  # contiguous; CPU for EEP_GLOO, the group's CUDA device for EEP_NCCL
    peer: int  # rank in the group, not this rank

    def __post_init__(self) -> None:
        if self.kind not in ("send", "recv"):
            raise ValueError(f"P2POp.kind must be 'send' or 'recv', got {self.kind!r}")
        if not isinstance(self.tensor, torch.Tensor):
            raise ValueError(f"P2POp.tensor must be a torch.Tensor, got {type(self.tensor).__name__}")
        if not isinstance(self.peer, int) or isinstance(self.peer, bool):
            raise ValueError(f"P2POp.peer must be an int, got {self.peer!r}")


def split_into_rounds(ops: Sequence[P2POp], world_size: int, max_ops_in_flight: int) -> list[list[P2POp]]:
    """Split one rank's ops into rounds whose partners fall in the same round on every peer.

    Op i goes to round ``n_i // per_direction``, where ``n_i`` counts the earlier ops with the same
    (kind, peer) and ``per_direction = max(1, max_ops_in_flight // (2 * (world_size - 1)))``.
    A round thus holds at most ``max(max_ops_in_flight, 2 * (world_size - 1))`` ops. Ops keep
    their relative order inside a round. Empty rounds are dropped (a rank may skip a round).
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if max_ops_in_flight < 1:
        raise ValueError(f"max_ops_in_flight must be >= 1, got {max_ops_in_flight}")
    per_direction = max(1, max_ops_in_flight // (2 * max(1, world_size - 1)))
    seen: dict[tuple[str, int], int] = {}
    rounds: dict[int, list[P2POp]] = {}
    for op in ops:
        key = (op.kind, op.peer)
        n = seen.get(key, 0)
        seen[key] = n + 1
        rounds.setdefault(n // per_direction, []).append(op)
    return [rounds[i] for i in sorted(rounds)]

