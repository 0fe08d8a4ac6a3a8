"""The collective group of one communicator generation over a private torch process group: formation, exchange, collectives."""

from __future__ import annotations

import os
import threading
import time
from abc import abstractmethod
from datetime import timedelta
from typing import Iterable, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
from ray.util.collective import types as ray_types
from ray.util.collective.collective_group.base_collective_group import BaseGroup

from ..errors import FormationAbandoned, PeerDiedError, TransferError, TransferTimeoutError
from .failure import RoundFailed, dispose, short
from .ops import P2POp, split_into_rounds
from .rendezvous import ABANDON_KEY, take_config

ROUNDS_IN_FLIGHT = 4  # NCCL rounds posted before the oldest must finish (see the package docstring)
_JOIN_POLL_S = 0.005  # how often a rank waiting for a group's members checks them (and whether it was abandoned)


def _as_tensor(value, what: str) -> torch.Tensor:
    """Ray hands tensors wrapped in a one-element list; accept torch tensors and numpy arrays."""
    if isinstance(value, (list, tuple)):
        if len(value) != 1:
            raise ValueError(f"{what}: expected one tensor, got {len(value)} (multi-GPU calls are not supported)")
        value = value[0]
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value)  # shares memory, so a receive lands in the array
    if isinstance(value, torch.Tensor):
        return value
    raise ValueError(f"{what}: expected a torch.Tensor or numpy.ndarray, got {type(value).__name__}")


_REDUCE_OPS = {
    ray_types.ReduceOp.SUM: dist.ReduceOp.SUM,
    ray_types.ReduceOp.PRODUCT: dist.ReduceOp.PRODUCT,
    ray_types.ReduceOp.MIN: dist.ReduceOp.MIN,
    ray_types.ReduceOp.MAX: dist.ReduceOp.MAX,
}



class P2PGroup(BaseGroup):
    """A ``ray.util.collective`` group for one communicator generation over a private torch process group.

    Built by Ray's group manager from ``init_collective_group``; configure it first with
    ``configure_group`` (or call ``form_group``). Its constructor blocks until every rank has
    joined, or raises ``TransferTimeoutError`` naming the ranks that did not within ``timeout_s``.
    One exchange runs at a time per group (a lock serialises callers); ``abort`` may be called
    from any thread to make a running exchange fail at once.
    """

    device_type = "cpu"  # overridden by subclasses

    def __init__(self, world_size: int, rank: int, group_name: str):
        super().__init__(world_size, rank, group_name)
        config = take_config(group_name)
        if config.device.type != self.device_type:
            raise ValueError(
                f"group {group_name!r}: backend {self.backend()} needs a {self.device_type} device, "
                f"got {config.device}"
            )
        self._config = config
        self._lock = threading.Lock()  # one exchange or collective at a time
        self._state_lock = threading.Lock()  # guards _broken and _pg against concurrent abort
        self._broken: Optional[str] = None  # reason, once unusable
        self._pg = None
        started = time.monotonic()
        deadline = started + config.timeout_s
        store = self._connect_store(deadline)
        self._join(store, deadline)
        self._pg = self._create_process_group(store, deadline)
        self.formation_s = time.monotonic() - started  # measured: join + process group + warm-up

    # -- identity -----------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self._config.device

    @property
    def timeout_s(self) -> float:
        return self._config.timeout_s

    @property
    def broken(self) -> Optional[str]:
        """Why the group is unusable, or None while it works."""
        return self._broken

    def __repr__(self) -> str:
        state = f"broken: {self._broken}" if self._broken else "ok"
        return f"{type(self).__name__}({self.group_name!r}, rank={self.rank}/{self.world_size}, {self.device}, {state})"

    # -- formation ----------------------------------------------------------------------------

    def _connect_store(self, deadline: float):
        config = self._config
        try:
            client = dist.TCPStore(
                config.host, config.port, is_master=False, timeout=timedelta(seconds=config.timeout_s)
            )
        except (RuntimeError, dist.DistError) as exc:
            raise TransferError(
                f"group {self.group_name!r} rank {self.rank}: cannot reach the store at "
                f"{config.host}:{config.port}: {short(exc)}"
            ) from exc
        return dist.PrefixStore(self.group_name + "/", client)

    def _join(self, store, deadline: float) -> None:
        """Wait until every rank has announced itself; name the missing ranks on timeout."""
        keys = [f"eep/joined/{r}" for r in range(self.world_size)]
        try:
            store.set(keys[self.rank], str(os.getpid()))
        except (RuntimeError, dist.DistError) as exc:
            raise TransferError(f"group {self.group_name!r} rank {self.rank}: store unusable: {short(exc)}") from exc
        # Polled rather than one blocking wait: a wait that times out leaves the store client
        # unusable, and polling lets an abandoned formation release us at once.
        def missing() -> list[int]:
            return [r for r, key in enumerate(keys) if not store.check([key])]

        try:
            while not store.check(keys):
                if store.check([ABANDON_KEY]):
                    reason = store.get(ABANDON_KEY).decode(errors="replace")
                    raise FormationAbandoned(
                        f"group {self.group_name!r} rank {self.rank}: formation abandoned ({reason}); "
                        f"ranks {missing()} had not joined"
                    )
                if time.monotonic() >= deadline:
                    raise TransferTimeoutError(
                        f"group {self.group_name!r} rank {self.rank}: ranks {missing()} of {self.world_size} did not "
                        f"join within {self._config.timeout_s:.1f} s"
                    )
                time.sleep(_JOIN_POLL_S)
        except (RuntimeError, dist.DistError) as exc:
            raise TransferError(f"group {self.group_name!r} rank {self.rank}: store unusable: {short(exc)}") from exc

    @abstractmethod
    def _create_process_group(self, store, deadline: float):
        """Build the torch process group (all ranks are known to have joined)."""

    # -- state --------------------------------------------------------------------------------

    def _check_usable(self) -> None:
        if self._broken is not None:
            raise TransferError(f"group {self.group_name!r} broken, re-form: {self._broken}")
        if self._pg is None:
            raise TransferError(f"group {self.group_name!r} destroyed, re-form")

    def _break(self, reason: str) -> None:
        """Mark the group unusable and abort its process group (idempotent, never blocks long)."""
        with self._state_lock:
            if self._broken is None:
                self._broken = reason
            pg, self._pg = self._pg, None
        if pg is not None:
            dispose(pg, self.group_name)

    def abort(self, reason: str = "aborted by caller") -> None:
        """Make the group unusable now; a running exchange raises TransferError within ~50 ms (gloo) or 1 ms (NCCL)."""
        self._break(reason)

    def destroy_group(self) -> None:
        """Release the process group; never hangs on a dead peer. Called by ``destroy_collective_group``."""
        self._break("destroyed")

    # -- exchange -----------------------------------------------------------------------------

    def _check_op(self, op: P2POp) -> None:
        if not 0 <= op.peer < self.world_size or op.peer == self.rank:
            raise ValueError(
                f"group {self.group_name!r} rank {self.rank}: peer {op.peer} is not another rank "
                f"of 0..{self.world_size - 1}"
            )
        if op.tensor.device != self.device:
            raise ValueError(
                f"group {self.group_name!r}: {op.kind} with peer {op.peer} has a tensor on {op.tensor.device}, "
                f"this group moves tensors on {self.device}"
            )
        if not op.tensor.is_contiguous():
            raise ValueError(f"group {self.group_name!r}: {op.kind} with peer {op.peer} has a non-contiguous tensor")

    def exchange(self, ops: Sequence[P2POp], timeout_s: Optional[float] = None) -> None:
        """Run every op, all posted together round by round, within ``timeout_s`` (default: the group's).

        ``ops`` must follow the ordering contract of the package docstring. Raises ``ValueError``
        for a bad op before anything is posted; then ``TransferTimeoutError`` (peers still
        pending), ``PeerDiedError`` (a peer's connection closed) or ``TransferError``; after any
        of them the group is broken.
        """
        ops = list(ops)
        for op in ops:
            if not isinstance(op, P2POp):
                raise ValueError(f"exchange takes P2POp items, got {type(op).__name__}")
            self._check_op(op)
        self._check_usable()
        self.exchange_rounds([ops], timeout_s)

    def exchange_rounds(self, rounds: Iterable[Sequence[P2POp]], timeout_s: Optional[float] = None) -> None:
        """Run rounds of ops in order, each round's ops posted together, all within ``timeout_s``.

        ``rounds`` may be a generator: the next round is drawn once the previous one is posted
        (on NCCL posted, not finished: up to ``ROUNDS_IN_FLIGHT`` rounds move at once), so a
        caller can pack round i+1's sends while round i is on the wire. Every rank must draw its
        rounds in one global order of round keys, with each op's partner in the peer's round of
        the same key (a rank skips keys it has nothing in); see "Rounds" in the package docstring.
        A round larger than ``max_ops_in_flight`` is split with ``split_into_rounds``. Errors as
        for ``exchange``; a bad op or a failing ``rounds`` generator breaks the group too, since
        earlier rounds may already be posted.
        """
        timeout_s = self._config.timeout_s if timeout_s is None else float(timeout_s)
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s!r}")
        self._check_usable()
        deadline = time.monotonic() + timeout_s
        n_ops = 0
        with self._lock:
            self._check_usable()
            posted: list[tuple[object, set[int]]] = []  # (handle, peers) of unfinished rounds, oldest first
            try:
                for ops in rounds:
                    ops = list(ops)
                    for op in ops:
                        if not isinstance(op, P2POp):
                            raise ValueError(f"exchange takes P2POp items, got {type(op).__name__}")
                        self._check_op(op)
                    n_ops += len(ops)
                    for part in split_into_rounds(ops, self.world_size, self._config.max_ops_in_flight):
                        while len(posted) >= ROUNDS_IN_FLIGHT:
                            self._finish_round(posted[0][0], deadline)
                            posted.pop(0)
                        posted.append((self._start_round(part, deadline), {op.peer for op in part}))
                while posted:
                    self._finish_round(posted[0][0], deadline)
                    posted.pop(0)
            except RoundFailed as failure:
                later = {peer for _, peers in posted for peer in peers} - failure.peers
                raise self._fail(failure, later, n_ops, timeout_s) from None
            except Exception as exc:  # posting failed, a bad op, or the caller's generator raised
                self._break(f"exchange failed: {short(exc)}")
                raise TransferError(
                    f"group {self.group_name!r} rank {self.rank}: exchange failed: {short(exc)}; "
                    "group aborted, re-form"
                ) from exc

    def _fail(self, failure: RoundFailed, later_peers: set[int], n_ops: int, timeout_s: float) -> TransferError:
        """Break the group and build the public error for a failed round."""
        where = f"group {self.group_name!r} rank {self.rank}"
        external = self._broken  # set when another thread aborted us
        self._break(f"{failure.cause}: {short(failure.detail, 200)}")
        if failure.cause == "aborted":
            error: TransferError = TransferError(f"{where}: exchange interrupted, group broken, re-form: {external}")
        elif failure.cause == "peer_died":
            peers = sorted(failure.peers)
            error = PeerDiedError(
                f"{where}: connection to peer(s) {peers} closed mid-transfer (died or left the group): "
                f"{short(failure.detail)}; group aborted, re-form"
            )
        elif failure.cause == "timeout":
            peers = sorted(failure.peers | later_peers)
            error = TransferTimeoutError(
                f"{where}: exchange of {n_ops} ops not finished after {timeout_s:.1f} s; still pending with "
                f"peers {peers}; group aborted, re-form"
            )
        else:
            peers = sorted(failure.peers)
            error = TransferError(
                f"{where}: exchange with peer(s) {peers} failed: {short(failure.detail)}; group aborted, re-form"
            )
        involved = failure.peers | (later_peers if failure.cause == "timeout" else set())
        error.peers = sorted(involved)  # type: ignore[attr-defined]
        return error

    def _start_round(self, ops: list[P2POp], deadline: float) -> object:
        """Post ``ops`` together; returns a handle for ``_finish_round``. Raises RoundFailed.

        By default the round runs to completion here (``_run_round``) and the handle is None.
        """
        self._run_round(ops, deadline)
        return None

    def _finish_round(self, handle: object, deadline: float) -> None:
        """Wait for a round started by ``_start_round``; raise RoundFailed."""

    @abstractmethod
    def _run_round(self, ops: list[P2POp], deadline: float) -> None:
        """Post ``ops`` together and wait for all of them; raise RoundFailed."""

    # -- small collectives (control tensors) --------------------------------------------------

    @abstractmethod
    def _collective(self, what: str, post, deadline: float) -> None:
        """Run one collective posted by ``post(pg, timeout) -> Work`` within ``deadline``."""

    def _run_collective(self, what: str, post) -> None:
        self._check_usable()
        with self._lock:
            self._check_usable()
            deadline = time.monotonic() + self._config.timeout_s
            try:
                self._collective(what, post, deadline)
            except RoundFailed as failure:
                raise self._fail(failure, set(), 1, self._config.timeout_s) from None
            except Exception as exc:
                self._break(f"{what} failed: {short(exc)}")
                raise TransferError(
                    f"group {self.group_name!r} rank {self.rank}: {what} failed: {short(exc)}"
                ) from exc

    def allreduce(self, tensors, allreduce_options=ray_types.AllReduceOptions()) -> None:
        """Reduce (sum by default) a small tensor across the group, in place."""
        tensor = self._collective_tensor(tensors, "allreduce")
        opts = dist.AllreduceOptions()
        opts.reduceOp = _REDUCE_OPS[getattr(allreduce_options, "reduceOp", ray_types.ReduceOp.SUM)]

        def post(pg, timeout):
            opts.timeout = timeout
            return pg.allreduce([tensor], opts)

        self._run_collective("allreduce", post)

    def broadcast(self, tensors, broadcast_options=ray_types.BroadcastOptions()) -> None:
        """Copy the root rank's tensor into every rank's tensor, in place."""
        tensor = self._collective_tensor(tensors, "broadcast")
        opts = dist.BroadcastOptions()
        opts.rootRank = int(getattr(broadcast_options, "root_rank", 0))
        opts.rootTensor = 0

        def post(pg, timeout):
            opts.timeout = timeout
            return pg.broadcast([tensor], opts)

        self._run_collective("broadcast", post)

    def barrier(self, barrier_options=ray_types.BarrierOptions()) -> None:
        """Return once every rank has entered the barrier (an allreduce of one element)."""
        token = torch.zeros(1, device=self.device)
        opts = dist.AllreduceOptions()
        opts.reduceOp = dist.ReduceOp.SUM

        def post(pg, timeout):
            opts.timeout = timeout
            return pg.allreduce([token], opts)

        self._run_collective("barrier", post)

    def send(self, tensors, send_options: ray_types.SendOptions) -> None:
        """``ray.util.collective.send``: one bounded exchange of a single send."""
        tensor = _as_tensor(tensors, "send")
        self.exchange([P2POp("send", tensor, int(send_options.dst_rank))])

    def recv(self, tensors, recv_options: ray_types.RecvOptions) -> None:
        """``ray.util.collective.recv``: one bounded exchange of a single receive."""
        tensor = _as_tensor(tensors, "recv")
        self.exchange([P2POp("recv", tensor, int(recv_options.src_rank))])

    def _collective_tensor(self, tensors, what: str) -> torch.Tensor:
        tensor = _as_tensor(tensors, what)
        if tensor.device != self.device or not tensor.is_contiguous():
            raise ValueError(f"group {self.group_name!r}: {what} needs a contiguous tensor on {self.device}")
        return tensor

    def reduce(self, tensors, reduce_options=ray_types.ReduceOptions()):
        raise NotImplementedError(f"{self.backend()} moves expert weights point to point; reduce is not supported")

    def allgather(self, tensor_lists, tensors, allgather_options=ray_types.AllGatherOptions()):
        raise NotImplementedError(f"{self.backend()} moves expert weights point to point; allgather is not supported")

    def reducescatter(self, tensors, tensor_lists, reducescatter_options=ray_types.ReduceScatterOptions()):
        raise NotImplementedError(
            f"{self.backend()} moves expert weights point to point; reducescatter is not supported"
        )

