"""MoEClient: sends a layer call's tokens to the ranks holding their experts and combines what comes back.

One call = one committed epoch: the client plans on one ``CommittedView`` and every
rank checks the epoch under its serving lock; if any rank reports another epoch, or a
rank dies, the whole call is discarded and re-planned on a fresh view (partial results
of two epochs are never mixed). Each rank involved gets one remote call per layer call
with its tokens once (Ray object store, zero-copy numpy on the CPU data path); every
wait is bounded by ``call_timeout_s``. Safe to share between threads; several clients
may serve at once.
"""

from __future__ import annotations

import threading
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch

from ..config import ModelSpec
from ..errors import ExpertsUnavailableError, ServingError, ServingInputError, StaleEpochError
from ..status import CommittedView
from .dispatch import DispatchPlan, check_call, plan_dispatch

_DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}


@dataclass
class ServingStats:
    """What a client served: calls, (token, expert) pairs, re-planned attempts and latencies."""

    calls: int = 0
    tokens: int = 0
    pairs: int = 0
    retries: int = 0
    latencies_s: list = field(default_factory=list)  # per call, in order (the last 10 000)


class MoEClient:
    """A long-lived serving handle: ``client.moe(layer, hidden_states, topk_ids, topk_weights)``.

    get_view: returns the controller's current CommittedView (a remote call).
    view_max_age_s: a view older than this is re-read before the next call (0: every call);
    a stale one is harmless, since ranks reject a call planned on another epoch.
    """

    def __init__(self, get_view: Callable[[], CommittedView], spec: ModelSpec, call_timeout_s: float = 30.0,
                 view_max_age_s: float = 0.5, retry_sleep_s: float = 0.02):
        self.spec = spec
        self.call_timeout_s = call_timeout_s
        self.view_max_age_s = view_max_age_s
        self.retry_sleep_s = retry_sleep_s
        self._get_view = get_view
        self._lock = threading.Lock()
        self._view: Optional[CommittedView] = None
        self._view_time = 0.0
        self._rotation = 0
        self.stats = ServingStats()

    def view(self, refresh: bool = False) -> CommittedView:
        """The committed view calls are planned on (re-read when stale or asked)."""
        with self._lock:
            fresh = self._view is not None and time.monotonic() - self._view_time <= self.view_max_age_s
            if fresh and not refresh:
                return self._view
        view = self._get_view()
        with self._lock:
            if self._view is None or view.epoch >= self._view.epoch or refresh:
                self._view, self._view_time = view, time.monotonic()
            return self._view

    def moe(self, layer: int, hidden_states: torch.Tensor, topk_ids, topk_weights) -> torch.Tensor:
        """The MoE layer's routed-experts output: sum_k topk_weights[t, k] * expert_{topk_ids[t, k]}(hidden[t]).

        hidden_states: [num_tokens, hidden] CPU tensor of the model dtype.
        topk_ids: [num_tokens, top_k] logical experts; topk_weights: [num_tokens, top_k] finite, >= 0.
        Returns [num_tokens, hidden] in the model dtype (combined in fp32, rounded once).
        """
        from .bits import to_bits

        if not isinstance(hidden_states, torch.Tensor):
            raise ServingInputError(f"hidden_states must be a torch.Tensor, got {type(hidden_states).__name__}")
        ids, weights = np.asarray(topk_ids), np.asarray(topk_weights)
        spec = self.spec
        check_call(layer, tuple(hidden_states.shape), _DTYPE_NAMES.get(hidden_states.dtype, str(hidden_states.dtype)),
                   ids, weights, spec.num_layers, spec.num_experts, spec.hidden, spec.dtype,
                   spec.checkpoint_layers)
        t0 = time.perf_counter()
        bits = to_bits(hidden_states.detach().cpu())
        flat_weights = weights.astype(np.float32).ravel()
        with self._lock:
            rotation = self._rotation
            self._rotation += 1
        deadline = time.monotonic() + self.call_timeout_s
        attempts, last = 0, None
        while True:
            view = self.view(refresh=attempts > 0)
            try:
                plan = plan_dispatch(int(layer), view.phy2log[int(layer)], view.slots_per_rank, view.ranks,
                                     view.dead_ranks, ids, rotation)
                out = self._run(view, plan, bits, flat_weights, deadline)
                break
            except (StaleEpochError, ExpertsUnavailableError, _RankFailed) as exc:
                last = exc  # another epoch, or a dead rank the view still shows: re-plan on a fresh view
            attempts += 1
            if time.monotonic() + self.retry_sleep_s > deadline:
                if isinstance(last, ExpertsUnavailableError):
                    raise last
                raise ServingError(f"layer {layer} call failed after {attempts} attempts in "
                                   f"{self.call_timeout_s:.1f}s: {last}")
            time.sleep(self.retry_sleep_s)
        result = out.to(hidden_states.dtype)
        with self._lock:
            st = self.stats
            st.calls += 1
            st.tokens += len(ids)
            st.pairs += ids.size
            st.retries += attempts
            st.latencies_s.append(time.perf_counter() - t0)
            del st.latencies_s[:-10000]
        return result

    def _run(self, view: CommittedView, plan: DispatchPlan, bits: np.ndarray, flat_weights: np.ndarray,
             deadline: float) -> torch.Tensor:
        """One attempt: one remote call per rank, all awaited with the call's deadline, combined in fp32."""
        import ray
        from ray.exceptions import RayActorError, RayTaskError

        refs = []
        for part in plan.parts:
            handle = view.workers[part.rank]
            refs.append(handle.serve_layer.remote(view.epoch, part.rank, plan.layer, bits[part.tokens], part.rows,
                                                  part.slots, flat_weights[part.pairs]))
        out = torch.zeros((plan.num_tokens, self.spec.hidden), dtype=torch.float32)
        if not refs:
            return out
        _, pending = ray.wait(refs, num_returns=len(refs), timeout=max(0.001, deadline - time.monotonic()))
        if pending:
            late = [part.rank for part, ref in zip(plan.parts, refs) if ref in pending]
            for ref in pending:
                try:
                    ray.cancel(ref, force=False)
                except Exception:  # noqa: BLE001 - best effort: the call fails either way
                    pass
            raise ServingError(f"ranks {late} did not answer layer {plan.layer} within {self.call_timeout_s:.1f}s")
        failures = []
        for part, ref in zip(plan.parts, refs):  # every result is fetched, so no error goes unretrieved
            try:
                partial = ray.get(ref, timeout=max(0.001, deadline - time.monotonic()))
            except RayTaskError as exc:
                cause = exc.cause if getattr(exc, "cause", None) is not None else exc
                failures.append(cause if isinstance(cause, StaleEpochError) else ServingError(
                    f"rank {part.rank} failed layer {plan.layer}: {type(cause).__name__}: {cause}"))
                continue
            except RayActorError as exc:
                failures.append(_RankFailed(f"rank {part.rank} died during layer {plan.layer}: {type(exc).__name__}"))
                continue
            if not failures:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # read-only object-store memory, only read here
                    out.index_add_(0, torch.from_numpy(part.tokens), torch.from_numpy(partial))
        if failures:  # the whole attempt is discarded: never a mix of epochs or a partial sum
            raise failures[0]
        return out


class _RankFailed(ServingError):
    """A rank of the view died mid-call; the call is re-planned on a fresh view."""
