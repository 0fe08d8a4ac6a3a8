"""EEP_NCCL: the group backend that moves CUDA tensors over a private ProcessGroupNCCL."""

from __future__ import annotations

import logging
import os
import time
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist

from ..errors import TransferError, TransferTimeoutError
from .failure import RoundFailed, classify, dispose, run_bounded, short
from .group import P2PGroup
from .ops import NCCL_BACKEND, P2P_TAG, P2POp

logger = logging.getLogger(__name__)

_NCCL_SPIN_S = 0.002  # poll a posted NCCL round without sleeping for this long (small transfers)...
_NCCL_POLL_S = 0.0005  # ...then sleep this long between polls
_NCCL_WATCHDOG_SLACK_S = 30.0  # torch's NCCL watchdog fires this long after the group timeout (backstop)

# Read by each ProcessGroupNCCL's constructor. torch's default error handling (3) takes the whole
# process down when an NCCL op times out; a worker that holds expert weights must survive its peers.
_NCCL_FORCED_ENV = {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "2"}  # 2: abort communicators, keep the process
_NCCL_DEFAULT_ENV = {"TORCH_NCCL_ENABLE_MONITORING": "0"}  # no heartbeat monitor that SIGABRTs the process


class NcclGroup(P2PGroup):
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
                    pg.send([mine], peer, P2P_TAG)
                    pg.recv([buffer], peer, P2P_TAG)
            finally:
                work = pg._end_coalescing()
            return work, theirs

        try:
            work, theirs = run_bounded(connect, deadline - time.monotonic(), f"nccl-connect-{self.group_name}")
            if work is not None:
                _poll_nccl(work, deadline, lambda: None)
                got = [int(t.item()) for t in theirs]
                if got != peers:
                    raise TransferError(f"NCCL warm-up received ranks {got}, expected {peers}")
        except RoundFailed as failure:
            dispose(pg, self.group_name)
            raise TransferTimeoutError(
                f"group {self.group_name!r} rank {self.rank}: NCCL communicator not connected within "
                f"{self._config.timeout_s:.1f} s ({failure.cause}: {short(failure.detail)})"
            ) from None
        except TransferError:
            dispose(pg, self.group_name)
            raise
        except Exception as exc:
            dispose(pg, self.group_name)
            raise TransferError(
                f"group {self.group_name!r} rank {self.rank}: NCCL communicator creation failed: {short(exc)}"
            ) from exc
        return pg

    def _start_round(self, ops: list[P2POp], deadline: float) -> object:
        """Post the round as one coalesced NCCL group; it waits on the GPU for work already queued
        on the current stream (the packing of its sends), not for later rounds' packing."""
        pg = self._pg
        if pg is None:
            raise RoundFailed("aborted", {op.peer for op in ops}, self._broken or "group released")
        pg._start_coalescing()
        try:
            for op in ops:
                post = pg.send if op.kind == "send" else pg.recv
                post([op.tensor], op.peer, P2P_TAG)
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
            raise RoundFailed("aborted", peers, reason)
        try:
            done = work.is_completed()
        except RuntimeError as exc:
            raise RoundFailed(classify(str(exc)), peers, f"{what}: {exc}") from None
        if done:
            break
        now = time.monotonic()
        if now >= deadline:
            raise RoundFailed("timeout", peers, f"{what}: NCCL work not completed by its deadline")
        if now >= spin_until:
            time.sleep(_NCCL_POLL_S)
    try:
        error = work.exception()  # deprecated in torch, still the one way to read an async NCCL error
    except Exception:  # noqa: BLE001 - no error to read
        error = None
    if error is not None:
        raise RoundFailed(classify(str(error)), peers, f"{what}: {error}")
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


