"""EEP_GLOO: the group backend that moves CPU tensors over a private ProcessGroupGloo."""

from __future__ import annotations

import os
import queue
import threading
import time
from datetime import timedelta

import torch.distributed as dist

from ..errors import TransferTimeoutError
from .failure import JOIN_SLACK_S, RoundFailed, classify, short
from .group import P2PGroup
from .ops import GLOO_BACKEND, P2P_TAG, P2POp
from .rendezvous import node_ip

_ABORT_POLL_S = 0.05  # how often a gloo exchange checks whether another thread aborted the group


class GlooGroup(P2PGroup):
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
                f"{self._config.timeout_s:.1f} s: {short(exc)}"
            ) from exc

    def _run_round(self, ops: list[P2POp], deadline: float) -> None:
        pg = self._pg
        if pg is None:
            raise RoundFailed("aborted", {op.peer for op in ops}, self._broken or "group released")
        by_peer: dict[int, list] = {}
        for op in ops:
            post = pg.send if op.kind == "send" else pg.recv
            try:
                by_peer.setdefault(op.peer, []).append(post([op.tensor], op.peer, P2P_TAG))
            except RuntimeError as exc:  # the pair is already closed (the peer left or died)
                raise RoundFailed(classify(str(exc)), {op.peer}, str(exc)) from None
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
                raise RoundFailed("aborted", pending, self._broken)
            remaining = deadline - time.monotonic()
            if remaining < -JOIN_SLACK_S:  # gloo did not honour its own timeout
                raise RoundFailed("timeout", pending, "gloo wait overran its deadline")
            try:
                peer, error = results.get(timeout=min(_ABORT_POLL_S, max(remaining + JOIN_SLACK_S, 0.001)))
            except queue.Empty:
                continue
            if error is None:
                pending.discard(peer)
                continue
            cause = classify(error)
            raise RoundFailed(cause, {peer} if cause != "timeout" else pending, error)

    def _collective(self, what: str, post, deadline: float) -> None:
        remaining = max(deadline - time.monotonic(), 0.001)
        work = post(self._pg, timedelta(seconds=remaining))
        peers = set(range(self.world_size)) - {self.rank}
        try:
            work.wait(timedelta(seconds=remaining + JOIN_SLACK_S))
        except RuntimeError as exc:
            raise RoundFailed(classify(str(exc)), peers, f"{what}: {exc}") from None


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
    return dist.ProcessGroupGloo.create_device(hostname=node_ip())

