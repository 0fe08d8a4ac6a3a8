"""Point-to-point transfers of expert weights between Ray actors: one collective group per communicator generation.

Glossary
- generation: one membership of the worker set as the communicators see it. A death or a join
  starts a new generation, and the new generation gets a new group under a new name
  (``group_name_for(cluster, generation)``). A group is never repaired or re-formed in place:
  after any error it is dropped and the next generation forms afresh. (A layout version is an
  epoch, elsewhere; this package never sees one.)
- store server: one ``TCPStore`` held by a long-lived process (the controller, ``StoreServer``).
  Every generation's group meets there under its own key prefix, the group name; names are never reused.
- op: one ``P2POp`` (send or recv of one contiguous tensor to or from one peer rank).
- round: the ops posted together (see ``split_into_rounds``).

How it plugs into Ray
    ``ray.util.collective`` keeps a registry of backends. We register two, ``EEP_GLOO`` (CPU
    tensors, torch's ``ProcessGroupGloo``) and ``EEP_NCCL`` (CUDA tensors, ``ProcessGroupNCCL``),
    whose group class builds a private torch process group for one generation: no
    ``init_process_group``, no global ``torch.distributed`` state, so a process can hold generation n's
    group, drop it and join generation n+1's within milliseconds. Ray's ``BaseGroup`` constructor takes
    only ``(world_size, rank, group_name)``, so the store address, timeout and device reach it
    through ``configure_group`` (a per-process table read by the constructor); ``form_group`` does
    both steps. Afterwards ``ray.util.collective.send/recv/allreduce/broadcast/barrier`` work on the
    group by name, and ``P2PGroup.exchange`` posts a whole batch of sends and receives at once.

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
    Gloo finishes round i before posting round i+1. NCCL posts up to ``ROUNDS_IN_FLIGHT`` rounds
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

Modules: ``ops`` (names, ops, rounds), ``rendezvous`` (store server, per-process group
configuration), ``failure`` (classifying and containing failures), ``group`` (the group over a
private process group), ``gloo`` and ``nccl`` (the two backends), ``membership`` (registering,
forming and leaving groups), ``interface`` (the Transport the executor uses).
"""

from .group import P2PGroup
from .gloo import GlooGroup
from .interface import CollectiveTransport, Transport
from .membership import form_group, get_group, leave_group, register_backends
from .nccl import NcclGroup
from .ops import DEFAULT_MAX_OPS_IN_FLIGHT, GLOO_BACKEND, NCCL_BACKEND, P2POp, group_name_for, split_into_rounds
from .rendezvous import GroupConfig, StoreServer, configure_group

__all__ = [
    "CollectiveTransport",
    "DEFAULT_MAX_OPS_IN_FLIGHT",
    "GLOO_BACKEND",
    "GlooGroup",
    "GroupConfig",
    "NCCL_BACKEND",
    "NcclGroup",
    "P2PGroup",
    "P2POp",
    "StoreServer",
    "Transport",
    "configure_group",
    "form_group",
    "get_group",
    "group_name_for",
    "leave_group",
    "register_backends",
    "split_into_rounds",
]
