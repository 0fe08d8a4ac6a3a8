"""Point-to-point transfers of expert weights between Ray actors: one collective group per membership epoch.

Glossary
- epoch: one membership of the worker set. A death or a join starts a new epoch, and the new
  epoch gets a new group under a new name (``group_name_for(cluster, epoch)``). A group is never
  repaired or re-formed in place: after any error it is dropped and the next epoch forms afresh.
- store server: one ``TCPStore`` held by a long-lived process (the controller, ``StoreServer``).
  Every epoch's group meets there under its own key prefix, the group name; names are never reused.
- op: one ``P2POp`` (send or recv of one contiguous tensor to or from one peer rank).
- round: the ops posted together (see ``split_into_rounds``).

How it plugs into Ray
    ``ray.util.collective`` keeps a registry of backends. We register two, ``EEP_GLOO`` (CPU
    tensors, torch's ``ProcessGroupGloo``) and ``EEP_NCCL`` (CUDA tensors, ``ProcessGroupNCCL``),
    whose group class builds a private torch process group for one epoch: no
    ``init_process_group``, no global ``torch.distributed`` state, so a process can hold epoch n's
    group, drop it and join epoch n+1's within milliseconds. Ray's ``BaseGroup`` constructor takes
    only ``(world_size, rank, group_name)``, so the store address, timeout and device reach it
    through ``configure_group`` (a per-process table read by the constructor); ``form_group`` does
    both steps. Afterwards ``ray.util.collective.send/recv/allreduce/broadcast/barrier`` work on the
    group by name, and ``EpochP2PGroup.exchange`` posts a whole batch of sends and receives at once.

Ordering contract (the executor's job, not this module's)
    Between two ranks, the k-th send from a to b is received by the k-th recv on b from a, with the
    same shape and dtype. Each rank's op list must therefore list its sends to, and receives from,
    any one peer in the same order as that peer's list; a plan built once and projected onto each
    rank has this property. Nothing else about the order matters: sends and receives of one
    exchange are posted together, so a ring (each rank sends right and receives left) cannot
    deadlock the way a blocking send-then-recv does.

Rounds, and why not a sliding window of ops
    ``exchange`` splits its ops into rounds of at most ``max_ops_in_flight``. The round of an op is
    ``n // per_direction``, where n counts the earlier ops of the same direction with the same peer
    and ``per_direction = max(1, max_ops_in_flight // (2 * (world - 1)))``. Both ends of a transfer
    compute the same n (it is the matching index above), so every op's partner lies in the same
    round on the peer. ``exchange_rounds`` takes the rounds from the caller instead (the executor
    makes one per message index, so it can pack the next round while this one moves); its
    contract is the same: every rank posts its rounds in one global order of round keys, and
    each op's partner sits in the peer's round of the same key.
    Gloo finishes round i before posting round i+1. NCCL posts up to ``_ROUNDS_IN_FLIGHT`` rounds
    before waiting for the oldest: each round is one coalesced group, and the groups of one rank
    run in posting order on its NCCL stream. Neither can deadlock: the incomplete round with the
    smallest key, on every rank that has it, has only complete rounds before it, so it is
    running (or posted) at both ends of each of its transfers and finishes.
    A per-rank sliding window of *ops* (post the first W ops, then one more each time the oldest
    finishes) can deadlock even when every pair's order agrees: with A = [send B, recv C],
    B = [send C, recv A], C = [send A, recv B] and W = 1, each rank waits on a send whose receive
    its peer has not posted. Rounds need only the per-pair order above and are safe for both
    backends, so both use them.

Failure semantics
    Every wait is bounded by the exchange's deadline. A timeout raises ``TransferTimeoutError``
    naming the peers still pending; a closed connection (gloo) or a remote error (NCCL) raises
    ``PeerDiedError`` naming the peer(s). Either way the process group is aborted, the group is
    marked broken, and every later call raises ``TransferError`` ("group broken, re-form"). The
    raised errors carry ``.peers`` (sorted ranks). Receive buffers of a failed exchange hold
    undefined bytes and, with gloo, may still be written until the exchange's deadline passes:
    receive into staging buffers, never into live weights.

Measured with local Ray (tests/integration/test_transport.py):
- gloo, 2-core CPU machine: formation 3-10 ms once every rank has called ``form_group``; a 64 MiB
  ring step in about 155 ms (0.4 GiB/s per link, CPU-bound); a killed peer reported as
  ``PeerDiedError`` 20-70 ms after the kill; leaving a group about 30 ms.
- NCCL, 2 x H100 (torch 2.11, NCCL 2.28): formation 0.25 s between warm processes (about 1 s with
  CUDA start-up); 256 MiB each way in 1.2 ms (about 225 GB/s per direction); a timeout is raised
  about 0.5 s after the deadline (``ncclCommAbort``); a killed peer shows up only as a timeout.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from datetime import timedelta
from typing import Iterable, Literal, Optional, Sequence, Union

import numpy as np
import torch
import torch.distributed as dist
import ray
from ray.util import collective as ray_collective
from ray.util.collective import types as ray_types
from ray.util.collective.backend_registry import BackendRegistry, register_collective_backend
from ray.util.collective.collective_group.base_collective_group import BaseGroup

from .errors import FormationAbandoned, PeerDiedError, TransferError, TransferTimeoutError

logger = logging.getLogger(__name__)

GLOO_BACKEND = "EEP_GLOO"  # CPU tensors over torch's ProcessGroupGloo
NCCL_BACKEND = "EEP_NCCL"  # CUDA tensors over torch's ProcessGroupNCCL
DEFAULT_MAX_OPS_IN_FLIGHT = 64  # ops posted together in one round (see the module docstring)
_ROUNDS_IN_FLIGHT = 4  # NCCL rounds posted before the oldest must finish (see the module docstring)

_P2P_TAG = 0  # one tag for every point-to-point op: matching is by per-pair order
_NCCL_SPIN_S = 0.002  # poll a posted NCCL round without sleeping for this long (small transfers)...
_NCCL_POLL_S = 0.0005  # ...then sleep this long between polls
_ABORT_POLL_S = 0.05  # how often a gloo exchange checks whether another thread aborted the group
_JOIN_POLL_S = 0.005  # how often a rank waiting for a group's members checks them (and whether it was abandoned)
_ABANDON_KEY = "eep/abandoned"  # set (under the group's prefix) by StoreServer.abandon
_JOIN_SLACK_S = 0.5  # grace past a deadline for helper threads to report before we give up on them
_DISPOSE_WAIT_S = 1.0  # destroy_group waits at most this long for a process group to be released
_NCCL_WATCHDOG_SLACK_S = 30.0  # torch's NCCL watchdog fires this long after the group timeout (backstop)

# Read by each ProcessGroupNCCL's constructor. torch's default error handling (3) takes the whole
# process down when an NCCL op times out; a worker that holds expert weights must survive its peers.
_NCCL_FORCED_ENV = {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "2"}  # 2: abort communicators, keep the process
_NCCL_DEFAULT_ENV = {"TORCH_NCCL_ENABLE_MONITORING": "0"}  # no heartbeat monitor that SIGABRTs the process

_PEER_CLOSED_MARKERS = (
    "connection closed by peer",
    "connection reset by peer",
    "broken pipe",
    "econnreset",
    "epipe",
    "remote process exited",
    "remote peer",
    "ncclremoteerror",
)
_TIMEOUT_MARKERS = ("timed out", "timeout")

Device = Union[str, torch.device]


# ---------------------------------------------------------------------------------------------
# Names, ops and rounds (pure)
# ---------------------------------------------------------------------------------------------


def group_name_for(cluster_name: str, epoch: int) -> str:
    """Name of the collective group of one membership epoch, e.g. ``"eep-epoch3"``."""
    if not isinstance(cluster_name, str) or not cluster_name:
        raise ValueError(f"cluster_name must be a non-empty str, got {cluster_name!r}")
    if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 0:
        raise ValueError(f"epoch must be an int >= 0, got {epoch!r}")
    return f"{cluster_name}-epoch{epoch}"


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


# ---------------------------------------------------------------------------------------------
# Store server and per-process group configuration
# ---------------------------------------------------------------------------------------------


def _node_ip() -> str:
    """This node's IP as Ray sees it, or loopback outside Ray."""
    if ray.is_initialized():
        return ray.util.get_node_ip_address()
    return "127.0.0.1"


class StoreServer:
    """The TCPStore server every epoch's group meets at; hold one in a long-lived process (the controller).

    Keys accumulate (a few hundred bytes per rank per epoch) until the server is closed.
    """

    def __init__(self, host: Optional[str] = None, timeout_s: float = 60.0):
        self.host = host or _node_ip()  # address the ranks connect to
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
        if self._store is not None:  # the same prefix the group's ranks see (EpochP2PGroup._connect_store)
            dist.PrefixStore(group_name + "/", self._store).set(_ABANDON_KEY, reason[:500])

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
_register_lock = threading.Lock()


def _as_device(device: Device) -> torch.device:
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
    config = GroupConfig(str(host), port, float(timeout_s), _as_device(device), max_ops_in_flight)
    with _configs_lock:
        _configs[group_name] = config


def _take_config(group_name: str) -> GroupConfig:
    with _configs_lock:
        config = _configs.pop(group_name, None)
    if config is None:
        raise TransferError(
            f"group {group_name!r} has no configuration in this process: call configure_group() "
            "(or use form_group()) before init_collective_group()"
        )
    return config


def register_backends() -> None:
    """Register EEP_GLOO and EEP_NCCL with ``ray.util.collective``; idempotent, call in every process."""
    registry = BackendRegistry()  # the process-wide singleton
    with _register_lock:
        for name, cls in ((GLOO_BACKEND, GlooEpochGroup), (NCCL_BACKEND, NcclEpochGroup)):
            if not registry.is_registered(name):
                register_collective_backend(name, cls)


# ---------------------------------------------------------------------------------------------
# Helpers: errors, bounded calls, disposal
# ---------------------------------------------------------------------------------------------


class _RoundFailed(Exception):
    """Internal: one round failed; ``exchange`` turns it into a public error."""

    def __init__(self, cause: str, peers: set[int], detail: str):
        super().__init__(detail)
        self.cause = cause  # "timeout" | "peer_died" | "aborted" | "failed"
        self.peers = peers
        self.detail = detail


def _classify(message: str) -> str:
    text = message.lower()
    if any(marker in text for marker in _PEER_CLOSED_MARKERS):
        return "peer_died"
    if any(marker in text for marker in _TIMEOUT_MARKERS):
        return "timeout"
    return "failed"


def _short(message: str, limit: int = 300) -> str:
    """One line, without gloo's source-location prefix, at most ``limit`` characters."""
    message = " ".join(str(message).split())
    if message.startswith("[") and "] " in message:
        message = message.split("] ", 1)[1]
    return message if len(message) <= limit else message[: limit - 3] + "..."


def _run_bounded(fn, timeout_s: float, what: str):
    """Run ``fn()`` in a daemon thread; return its result, or raise TransferTimeoutError after ``timeout_s``.

    A call that never returns is left behind in its thread (it cannot be cancelled).
    """
    box: dict[str, object] = {}

    def target() -> None:
        try:
            box["result"] = fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=target, name=f"eep-{what}", daemon=True)
    thread.start()
    thread.join(max(timeout_s, 0.0))
    if thread.is_alive():
        raise TransferTimeoutError(f"{what} did not finish within {timeout_s:.1f} s")
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box.get("result")


def _dispose(pg, what: str) -> None:
    """Abort ``pg`` and drop the last reference in a daemon thread; wait at most ``_DISPOSE_WAIT_S``.

    Dropping a process group runs its C++ destructor, which can block (for gloo, until a stuck
    collective times out); doing it in a thread keeps ``destroy_group`` from ever hanging.
    """
    holder = [pg]
    del pg

    def release() -> None:
        group = holder.pop()
        try:
            group.abort()
        except Exception as exc:  # noqa: BLE001 - best effort: the group is being dropped anyway
            logger.debug("%s: abort failed: %s", what, exc)
        del group

    thread = threading.Thread(target=release, name=f"eep-dispose-{what}", daemon=True)
    thread.start()
    thread.join(_DISPOSE_WAIT_S)
    if thread.is_alive():
        logger.warning(
            "%s: process group still releasing after %.1f s; left to a background thread", what, _DISPOSE_WAIT_S
        )


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


# ---------------------------------------------------------------------------------------------
# The group
# ---------------------------------------------------------------------------------------------


class EpochP2PGroup(BaseGroup):
    """A ``ray.util.collective`` group for one membership epoch over a private torch process group.

    Built by Ray's group manager from ``init_collective_group``; configure it first with
    ``configure_group`` (or call ``form_group``). Its constructor blocks until every rank has
    joined, or raises ``TransferTimeoutError`` naming the ranks that did not within ``timeout_s``.
    One exchange runs at a time per group (a lock serialises callers); ``abort`` may be called
    from any thread to make a running exchange fail at once.
    """

    device_type = "cpu"  # overridden by subclasses

    def __init__(self, world_size: int, rank: int, group_name: str):
        super().__init__(world_size, rank, group_name)
        config = _take_config(group_name)
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
                f"{config.host}:{config.port}: {_short(exc)}"
            ) from exc
        return dist.PrefixStore(self.group_name + "/", client)

    def _join(self, store, deadline: float) -> None:
        """Wait until every rank has announced itself; name the missing ranks on timeout."""
        keys = [f"eep/joined/{r}" for r in range(self.world_size)]
        try:
            store.set(keys[self.rank], str(os.getpid()))
        except (RuntimeError, dist.DistError) as exc:
            raise TransferError(f"group {self.group_name!r} rank {self.rank}: store unusable: {_short(exc)}") from exc
        # Polled rather than one blocking wait: a wait that times out leaves the store client
        # unusable, and polling lets an abandoned formation release us at once.
        def missing() -> list[int]:
            return [r for r, key in enumerate(keys) if not store.check([key])]

        try:
            while not store.check(keys):
                if store.check([_ABANDON_KEY]):
                    reason = store.get(_ABANDON_KEY).decode(errors="replace")
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
            raise TransferError(f"group {self.group_name!r} rank {self.rank}: store unusable: {_short(exc)}") from exc

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
            _dispose(pg, self.group_name)

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

        ``ops`` must follow the ordering contract of the module docstring. Raises ``ValueError``
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
        (on NCCL posted, not finished: up to ``_ROUNDS_IN_FLIGHT`` rounds move at once), so a
        caller can pack round i+1's sends while round i is on the wire. Every rank must draw its
        rounds in one global order of round keys, with each op's partner in the peer's round of
        the same key (a rank skips keys it has nothing in); see "Rounds" in the module docstring.
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
                        while len(posted) >= _ROUNDS_IN_FLIGHT:
                            self._finish_round(posted[0][0], deadline)
                            posted.pop(0)
                        posted.append((self._start_round(part, deadline), {op.peer for op in part}))
                while posted:
                    self._finish_round(posted[0][0], deadline)
                    posted.pop(0)
            except _RoundFailed as failure:
                later = {peer for _, peers in posted for peer in peers} - failure.peers
                raise self._fail(failure, later, n_ops, timeout_s) from None
            except Exception as exc:  # posting failed, a bad op, or the caller's generator raised
                self._break(f"exchange failed: {_short(exc)}")
                raise TransferError(
                    f"group {self.group_name!r} rank {self.rank}: exchange failed: {_short(exc)}; "
                    "group aborted, re-form"
                ) from exc

    def _fail(self, failure: _RoundFailed, later_peers: set[int], n_ops: int, timeout_s: float) -> TransferError:
        """Break the group and build the public error for a failed round."""
        where = f"group {self.group_name!r} rank {self.rank}"
        external = self._broken  # set when another thread aborted us
        self._break(f"{failure.cause}: {_short(failure.detail, 200)}")
        if failure.cause == "aborted":
            error: TransferError = TransferError(f"{where}: exchange interrupted, group broken, re-form: {external}")
        elif failure.cause == "peer_died":
            peers = sorted(failure.peers)
            error = PeerDiedError(
                f"{where}: connection to peer(s) {peers} closed mid-transfer (died or left the group): "
                f"{_short(failure.detail)}; group aborted, re-form"
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
                f"{where}: exchange with peer(s) {peers} failed: {_short(failure.detail)}; group aborted, re-form"
            )
        involved = failure.peers | (later_peers if failure.cause == "timeout" else set())
        error.peers = sorted(involved)  # type: ignore[attr-defined]
        return error

    def _start_round(self, ops: list[P2POp], deadline: float) -> object:
        """Post ``ops`` together; returns a handle for ``_finish_round``. Raises _RoundFailed.

        By default the round runs to completion here (``_run_round``) and the handle is None.
        """
        self._run_round(ops, deadline)
        return None

    def _finish_round(self, handle: object, deadline: float) -> None:
        """Wait for a round started by ``_start_round``; raise _RoundFailed."""

    @abstractmethod
    def _run_round(self, ops: list[P2POp], deadline: float) -> None:
        """Post ``ops`` together and wait for all of them; raise _RoundFailed."""

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
            except _RoundFailed as failure:
                raise self._fail(failure, set(), 1, self._config.timeout_s) from None
            except Exception as exc:
                self._break(f"{what} failed: {_short(exc)}")
                raise TransferError(
                    f"group {self.group_name!r} rank {self.rank}: {what} failed: {_short(exc)}"
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


class GlooEpochGroup(EpochP2PGroup):
    """EEP_GLOO: CPU tensors over a private ``ProcessGroupGloo``.

    Gloo reports a send or receive complete only once it is waited on, and a wait that times out
    poisons the whole context, so a round is waited on by one helper thread per peer: the first
    failure (a peer's closed connection) is seen at once whichever peer it comes from.
    ``ProcessGroupGloo.abort()`` does not wake a waiting receive (measured); after a failure,
    helper threads still waiting end by the exchange's deadline.
    """

    device_type = "cpu"

    @classmethod
    def backend(cls) -> str:
        return GLOO_BACKEND

    @classmethod
    def check_backend_availability(cls) -> bool:
        return dist.is_available() and dist.is_gloo_available()

    def _create_process_group(self, store, deadline: float):
        opts = dist.ProcessGroupGloo._Options()
        opts._timeout = timedelta(seconds=self._config.timeout_s)
        opts._devices = [_gloo_device()]
        try:
            return dist.ProcessGroupGloo(store, self.rank, self.world_size, opts)
        except (RuntimeError, dist.DistError) as exc:
            raise TransferTimeoutError(
                f"group {self.group_name!r} rank {self.rank}: gloo could not connect every rank within "
                f"{self._config.timeout_s:.1f} s: {_short(exc)}"
            ) from exc

    def _run_round(self, ops: list[P2POp], deadline: float) -> None:
        pg = self._pg
        if pg is None:
            raise _RoundFailed("aborted", {op.peer for op in ops}, self._broken or "group released")
        by_peer: dict[int, list] = {}
        for op in ops:
            post = pg.send if op.kind == "send" else pg.recv
            try:
                by_peer.setdefault(op.peer, []).append(post([op.tensor], op.peer, _P2P_TAG))
            except RuntimeError as exc:  # the pair is already closed (the peer left or died)
                raise _RoundFailed(_classify(str(exc)), {op.peer}, str(exc)) from None
        del pg
        results: queue.SimpleQueue = queue.SimpleQueue()
        for peer, works in by_peer.items():
            threading.Thread(
                target=_wait_gloo_works,
                args=(peer, works, deadline, results),
                name=f"eep-wait-{self.group_name}-{peer}",
                daemon=True,
            ).start()
        pending = set(by_peer)
        while pending:
            if self._broken is not None:
                raise _RoundFailed("aborted", pending, self._broken)
            remaining = deadline - time.monotonic()
            if remaining < -_JOIN_SLACK_S:  # gloo did not honour its own timeout
                raise _RoundFailed("timeout", pending, "gloo wait overran its deadline")
            try:
                peer, error = results.get(timeout=min(_ABORT_POLL_S, max(remaining + _JOIN_SLACK_S, 0.001)))
            except queue.Empty:
                continue
            if error is None:
                pending.discard(peer)
                continue
            cause = _classify(error)
            raise _RoundFailed(cause, {peer} if cause != "timeout" else pending, error)

    def _collective(self, what: str, post, deadline: float) -> None:
        remaining = max(deadline - time.monotonic(), 0.001)
        work = post(self._pg, timedelta(seconds=remaining))
        peers = set(range(self.world_size)) - {self.rank}
        try:
            work.wait(timedelta(seconds=remaining + _JOIN_SLACK_S))
        except RuntimeError as exc:
            raise _RoundFailed(_classify(str(exc)), peers, f"{what}: {exc}") from None


def _wait_gloo_works(peer: int, works: list, deadline: float, results: queue.SimpleQueue) -> None:
    """Helper thread: wait on one peer's works in posting order; report (peer, None) or (peer, message)."""
    for work in works:
        # gloo counts in whole milliseconds; 0 would mean "the default timeout"
        remaining = max(deadline - time.monotonic(), 0.001)
        try:
            work.wait(timedelta(seconds=remaining))
        except Exception as exc:  # noqa: BLE001 - reported to the exchanging thread
            results.put((peer, str(exc)))
            return
    results.put((peer, None))


def _gloo_device():
    """The gloo transport device: ``GLOO_SOCKET_IFNAME`` if set, else this node's IP as Ray sees it."""
    interface = os.environ.get("GLOO_SOCKET_IFNAME")
    if interface:
        return dist.ProcessGroupGloo.create_device(interface=interface.split(",")[0])
    return dist.ProcessGroupGloo.create_device(hostname=_node_ip())


class NcclEpochGroup(EpochP2PGroup):
    """EEP_NCCL: CUDA tensors over a private ``ProcessGroupNCCL`` bound to one device.

    Formation creates the communicator eagerly and connects every pair with a one-element
    all-to-all, so later exchanges never set up connections (a CPU-blocking handshake with the
    peer). Each round is one coalesced NCCL group (``_start_coalescing``/``_end_coalescing``),
    polled with ``is_completed`` until the deadline; on timeout the communicator is aborted
    (``ncclCommAbort``). A dead peer usually shows up as a timeout: NVLink transfers do not notice
    that a peer's process is gone.
    """

    device_type = "cuda"

    @classmethod
    def backend(cls) -> str:
        return NCCL_BACKEND

    @classmethod
    def check_backend_availability(cls) -> bool:
        return dist.is_available() and dist.is_nccl_available() and torch.cuda.is_available()

    def _create_process_group(self, store, deadline: float):
        _set_nccl_env()
        device = self.device
        torch.cuda.set_device(device)
        opts = dist.ProcessGroupNCCL.Options()
        # torch's watchdog is a backstop only: every op we post is polled against its own deadline
        opts._timeout = timedelta(seconds=self._config.timeout_s + _NCCL_WATCHDOG_SLACK_S)
        opts.is_high_priority_stream = False
        if hasattr(opts, "group_name"):
            opts.group_name = self.group_name
        if hasattr(opts, "global_ranks_in_group"):
            opts.global_ranks_in_group = list(range(self.world_size))
        pg = dist.ProcessGroupNCCL(store, self.rank, self.world_size, opts)
        peers = [r for r in range(self.world_size) if r != self.rank]

        def connect():
            # runs in a helper thread: the current device and NCCL's group depth are per thread
            torch.cuda.set_device(device)
            pg._set_sequence_number_for_group()
            pg.eager_connect_single_device(device)
            if not peers:
                return None, []
            mine = torch.full((1,), float(self.rank), device=device)
            theirs = [torch.full((1,), -1.0, device=device) for _ in peers]
            pg._start_coalescing()
            try:
                for peer, buffer in zip(peers, theirs):
                    pg.send([mine], peer, _P2P_TAG)
                    pg.recv([buffer], peer, _P2P_TAG)
            finally:
                work = pg._end_coalescing()
            return work, theirs

        try:
            work, theirs = _run_bounded(connect, deadline - time.monotonic(), f"nccl-connect-{self.group_name}")
            if work is not None:
                _poll_nccl(work, deadline, lambda: None)
                got = [int(t.item()) for t in theirs]
                if got != peers:
                    raise TransferError(f"NCCL warm-up received ranks {got}, expected {peers}")
        except _RoundFailed as failure:
            _dispose(pg, self.group_name)
            raise TransferTimeoutError(
                f"group {self.group_name!r} rank {self.rank}: NCCL communicator not connected within "
                f"{self._config.timeout_s:.1f} s ({failure.cause}: {_short(failure.detail)})"
            ) from None
        except TransferError:
            _dispose(pg, self.group_name)
            raise
        except Exception as exc:
            _dispose(pg, self.group_name)
            raise TransferError(
                f"group {self.group_name!r} rank {self.rank}: NCCL communicator creation failed: {_short(exc)}"
            ) from exc
        return pg

    def _start_round(self, ops: list[P2POp], deadline: float) -> object:
        """Post the round as one coalesced NCCL group; it waits on the GPU for work already queued
        on the current stream (the packing of its sends), not for later rounds' packing."""
        pg = self._pg
        if pg is None:
            raise _RoundFailed("aborted", {op.peer for op in ops}, self._broken or "group released")
        pg._start_coalescing()
        try:
            for op in ops:
                post = pg.send if op.kind == "send" else pg.recv
                post([op.tensor], op.peer, _P2P_TAG)
        finally:
            work = pg._end_coalescing()
        return work, {op.peer for op in ops}

    def _finish_round(self, handle: object, deadline: float) -> None:
        work, peers = handle
        _poll_nccl(work, deadline, lambda: self._broken, peers)

    def _run_round(self, ops: list[P2POp], deadline: float) -> None:
        self._finish_round(self._start_round(ops, deadline), deadline)

    def _collective(self, what: str, post, deadline: float) -> None:
        work = post(self._pg, timedelta(seconds=max(deadline - time.monotonic(), 0.001)))
        peers = set(range(self.world_size)) - {self.rank}
        _poll_nccl(work, deadline, lambda: self._broken, peers, what)


def _poll_nccl(work, deadline: float, broken, peers: Optional[set[int]] = None, what: str = "exchange") -> None:
    """Poll an NCCL work until it completes, the deadline passes, or ``broken()`` returns a reason."""
    peers = set(peers or ())
    spin_until = time.monotonic() + _NCCL_SPIN_S
    while True:
        reason = broken()
        if reason is not None:
            raise _RoundFailed("aborted", peers, reason)
        try:
            done = work.is_completed()
        except RuntimeError as exc:
            raise _RoundFailed(_classify(str(exc)), peers, f"{what}: {exc}") from None
        if done:
            break
        now = time.monotonic()
        if now >= deadline:
            raise _RoundFailed("timeout", peers, f"{what}: NCCL work not completed by its deadline")
        if now >= spin_until:
            time.sleep(_NCCL_POLL_S)
    try:
        error = work.exception()  # deprecated in torch, still the one way to read an async NCCL error
    except Exception:  # noqa: BLE001 - no error to read
        error = None
    if error is not None:
        raise _RoundFailed(_classify(str(error)), peers, f"{what}: {error}")
    work.wait()  # makes the caller's current stream wait for the NCCL stream; does not block the CPU


def _set_nccl_env() -> None:
    for key, value in _NCCL_FORCED_ENV.items():
        if os.environ.get(key, value) != value:
            logger.warning(
                "overriding %s=%s with %s: a timed-out transfer must not kill the worker", key, os.environ[key], value
            )
        os.environ[key] = value
    for key, value in _NCCL_DEFAULT_ENV.items():
        os.environ.setdefault(key, value)


# ---------------------------------------------------------------------------------------------
# Forming and leaving groups through ray.util.collective
# ---------------------------------------------------------------------------------------------


def form_group(
    group_name: str,
    world_size: int,
    rank: int,
    host: str,
    port: int,
    timeout_s: float,
    device: Device = "cpu",
    max_ops_in_flight: int = DEFAULT_MAX_OPS_IN_FLIGHT,
) -> EpochP2PGroup:
    """Join the group ``group_name`` from inside a Ray actor; blocks until every rank has joined.

    Picks EEP_NCCL for a CUDA ``device`` and EEP_GLOO otherwise. Raises TransferTimeoutError
    naming the ranks that did not join within ``timeout_s``; a failed name cannot be retried
    (the store keeps its keys): form the next epoch's group instead.
    """
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be an int >= 1, got {world_size!r}")
    if not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be an int in 0..{world_size - 1}, got {rank!r}")
    register_backends()
    dev = _as_device(device)
    backend = NCCL_BACKEND if dev.type == "cuda" else GLOO_BACKEND
    if ray_collective.is_group_initialized(group_name):
        raise TransferError(f"group {group_name!r} already exists in this process")
    configure_group(group_name, host, port, timeout_s, dev, max_ops_in_flight)
    try:
        ray_collective.init_collective_group(world_size, rank, backend=backend, group_name=group_name)
    finally:
        with _configs_lock:
            _configs.pop(group_name, None)
    return get_group(group_name)


def get_group(group_name: str) -> EpochP2PGroup:
    """The group ``group_name`` formed in this process."""
    if not ray_collective.is_group_initialized(group_name):
        raise TransferError(f"group {group_name!r} is not formed in this process")
    from ray.util.collective.collective import get_group_handle

    group = get_group_handle(group_name)
    if not isinstance(group, EpochP2PGroup):
        raise TransferError(f"group {group_name!r} is a {type(group).__name__}, not an elastic-ep group")
    return group


def leave_group(group_name: str) -> None:
    """Destroy this process's handle on ``group_name``; a no-op if it has none. Never hangs on a dead peer."""
    if ray_collective.is_group_initialized(group_name):
        ray_collective.destroy_collective_group(group_name)


# ---------------------------------------------------------------------------------------------
# The interface the executor uses
# ---------------------------------------------------------------------------------------------


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
        peer's round of the same key (``EpochP2PGroup.exchange_rounds``). This default runs
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

    The group belongs to its epoch: ``close`` leaves it only when ``owns_group`` is set.
    """

    def __init__(self, group_name: str, owns_group: bool = False):
        self._group_name = group_name
        self._owns_group = owns_group
        self._group: Optional[EpochP2PGroup] = get_group(group_name)
        self._ops: list[P2POp] = []

    @property
    def group(self) -> EpochP2PGroup:
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
