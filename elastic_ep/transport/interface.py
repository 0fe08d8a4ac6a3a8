"""The Transport interface the executor uses, and its implementation over a formed group."""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from typing import Iterable, Optional, Sequence

import torch

from ..errors import TransferError
from .group import P2PGroup
from .membership import get_group, leave_group
from .ops import P2POp


class Transport(ABC):
    """Queues sends and receives of one rank, then runs them together.

    ``add_send``/``add_recv`` only record; ``execute`` runs everything recorded (bounded by
    ``timeout_s``) and clears the queue whether or not it succeeded.
    """

    @abstractmethod
    def add_send(self, tensor: torch.Tensor, peer: int) -> None:
        """Queue sending ``tensor`` to rank ``peer``."""

    @abstractmethod
    def add_recv(self, tensor: torch.Tensor, peer: int) -> None:
        """Queue receiving into ``tensor`` from rank ``peer``."""

    @abstractmethod
    def execute(self, timeout_s: float) -> None:
        """Run every queued op; raise TransferError (or a subclass) on failure."""

    def execute_rounds(self, rounds: Iterable[Sequence[tuple[str, torch.Tensor, int]]], timeout_s: float) -> None:
        """Run rounds of ``(kind, tensor, peer)`` ops drawn lazily from ``rounds``, within ``timeout_s``.

        Round i+1 is drawn once round i is under way, so its sends can be packed meanwhile.
        Every rank must draw its rounds in one global order of keys, each op's partner in the
        peer's round of the same key (``P2PGroup.exchange_rounds``). This default runs
        them one by one through ``add_send``/``add_recv``/``execute``.
        """
        deadline = time.monotonic() + timeout_s
        for ops in rounds:
            for kind, tensor, peer in ops:
                (self.add_send if kind == "send" else self.add_recv)(tensor, peer)
            self.execute(max(deadline - time.monotonic(), 0.001))

    @abstractmethod
    def close(self) -> None:
        """Drop queued ops and release what the transport owns; idempotent, never hangs."""


class CollectiveTransport(Transport):
    """A Transport over a group formed with ``form_group`` in this process.

    The group belongs to its generation: ``close`` leaves it only when ``owns_group`` is set.
    """

    def __init__(self, group_name: str, owns_group: bool = False):
        self._group_name = group_name
        self._owns_group = owns_group
        self._group: Optional[P2PGroup] = get_group(group_name)
        self._ops: list[P2POp] = []

    @property
    def group(self) -> P2PGroup:
        if self._group is None:
            raise TransferError(f"transport over {self._group_name!r} is closed")
        return self._group

    def add_send(self, tensor: torch.Tensor, peer: int) -> None:
        op = P2POp("send", tensor, peer)
        self.group._check_op(op)
        self._ops.append(op)

    def add_recv(self, tensor: torch.Tensor, peer: int) -> None:
        op = P2POp("recv", tensor, peer)
        self.group._check_op(op)
        self._ops.append(op)

    def execute(self, timeout_s: float) -> None:
        ops, self._ops = self._ops, []
        self.group.exchange(ops, timeout_s)

    def execute_rounds(self, rounds: Iterable[Sequence[tuple[str, torch.Tensor, int]]], timeout_s: float) -> None:
        if self._ops:
            raise TransferError("execute_rounds with ops still queued: execute() them first")
        self.group.exchange_rounds(
            ([P2POp(kind, tensor, peer) for kind, tensor, peer in ops] for ops in rounds), timeout_s
        )

    def close(self) -> None:
        self._ops = []
        if self._group is not None and self._owns_group:
            leave_group(self._group_name)
        self._group = None
