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
from ..degraded import degrade_routing
from ..serving_stats import CallRecord, ServingLog
from .dispatch import DispatchPlan, check_call, live_replicas, plan_dispatch

_DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}


@dataclass
class ServingStats:
    """What a client served: calls, failed calls, (token, expert) pairs, re-planned attempts, masked retries.

    retried_tokens: tokens re-sent within their call because a rank died under them.
    degraded_tokens: tokens served over fewer than their top-k experts (degraded mode).
    """

    calls: int = 0
    failed: int = 0
    tokens: int = 0
    pairs: int = 0
    retries: int = 0
    retried_tokens: int = 0
    degraded_tokens: int = 0
    latencies_s: list = field(default_factory=list)  # per served call, in order (the last 10 000)


class MoEClient:
    """A long-lived serving handle: ``client.moe(layer, hidden_states, topk_ids, topk_weights)``.

    get_view: returns the controller's current CommittedView (a remote call).
    view_max_age_s: a view older than this is re-read before the next call (0: every call);
    a stale one is harmless, since ranks reject a call planned on another epoch.
    unavailable_timeout_s: how long a call whose experts have no live replica waits for the
    recovery's commit (polling the view) before ExpertsUnavailableError names them.
    degraded: opt-in; such tokens are instead served over their remaining top-k experts,
    renormalised (``elastic_ep.degraded``), and counted in ``stats.degraded_tokens``.
    log: a ServingLog that gets one CallRecord per call; metrics_cluster: cluster name for
    ``elastic_ep.metrics.record_serving_call`` (None: no metrics).

    Masking: a rank is masked as soon as the view lists it dead or a call to it fails with
    RayActorError, whichever comes first; the call is re-planned at once on the same epoch
    without it (every pair of the call re-sent, never a mix of epochs).
    """

    def __init__(self, get_view: Callable[[], CommittedView], spec: ModelSpec, call_timeout_s: float = 30.0,
                 view_max_age_s: float = 0.5, retry_sleep_s: float = 0.02, unavailable_timeout_s: float = 30.0,
                 degraded: bool = False, log: Optional[ServingLog] = None, metrics_cluster: Optional[str] = None):
        if unavailable_timeout_s < 0 or call_timeout_s <= 0:
            raise ValueError(f"need call_timeout_s > 0 and unavailable_timeout_s >= 0, got {call_timeout_s}, "
                             f"{unavailable_timeout_s}")
        self.spec = spec
        self.call_timeout_s = call_timeout_s
        self.view_max_age_s = view_max_age_s
        self.retry_sleep_s = retry_sleep_s
        self.unavailable_timeout_s = unavailable_timeout_s
        self.degraded = degraded
        self.log = log
        self.metrics_cluster = metrics_cluster
        self._get_view = get_view
        self._lock = threading.Lock()
        self._view: Optional[CommittedView] = None
        self._view_time = 0.0
        self._rotation = 0
        self._masked: tuple[int, frozenset] = (-1, frozenset())  # (epoch, ranks seen dying under it)
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

    def masked_ranks(self, view: CommittedView) -> frozenset:
        """Ranks not to plan on at ``view``'s epoch: dead in the view or seen dying by a call."""
        with self._lock:
            epoch, seen = self._masked
        return frozenset(view.dead_ranks) | (seen if epoch == view.epoch else frozenset())

    def _mask(self, epoch: int, ranks) -> None:
        with self._lock:
            old_epoch, seen = self._masked
            self._masked = (epoch, (seen if old_epoch == epoch else frozenset()) | frozenset(ranks))

    def moe(self, layer: int, hidden_states: torch.Tensor, topk_ids, topk_weights,
            check: Optional[Callable[[torch.Tensor], bool]] = None) -> torch.Tensor:
        """The MoE layer's routed-experts output: sum_k topk_weights[t, k] * expert_{topk_ids[t, k]}(hidden[t]).

        hidden_states: [num_tokens, hidden] CPU tensor of the model dtype.
        topk_ids: [num_tokens, top_k] logical experts; topk_weights: [num_tokens, top_k] finite, >= 0.
        Returns [num_tokens, hidden] in the model dtype (combined in fp32, rounded once).
        Raises ExpertsUnavailableError (naming them) when experts have no live replica for
        ``unavailable_timeout_s``, ServingError when ranks fail for ``call_timeout_s``.
        check: optional ``check(output) -> wrong`` (e.g. against the oracle), run after the call is timed;
        its answer goes into the call's CallRecord.
        """
        if not isinstance(hidden_states, torch.Tensor):
            raise ServingInputError(f"hidden_states must be a torch.Tensor, got {type(hidden_states).__name__}")
        ids, weights = np.asarray(topk_ids), np.asarray(topk_weights)
        spec = self.spec
        check_call(layer, tuple(hidden_states.shape), _DTYPE_NAMES.get(hidden_states.dtype, str(hidden_states.dtype)),
                   ids, weights, spec.num_layers, spec.num_experts, spec.hidden, spec.dtype,
                   spec.checkpoint_layers)
        t_wall, t0 = time.time(), time.perf_counter()
        tally = _CallTally()
        try:
            result = self._serve(int(layer), hidden_states, ids, weights, tally)
        except Exception as exc:
            self._account(t_wall, t0, ids, tally, exc)
            raise
        latency = time.perf_counter() - t0
        tally.wrong = None if check is None else bool(check(result))
        self._account(t_wall, t0, ids, tally, None, latency)
        return result

    def _serve(self, layer: int, hidden_states: torch.Tensor, ids: np.ndarray, weights: np.ndarray,
               tally: "_CallTally") -> torch.Tensor:
        """Plan, send and re-plan until served: masks dead ranks, waits (bounded) for lost experts."""
        from .bits import to_bits

        bits = to_bits(hidden_states.detach().cpu())
        with self._lock:
            rotation = self._rotation
            self._rotation += 1
        start = time.monotonic()
        deadline = start + self.call_timeout_s
        refresh, last = False, None
        while True:
            view = self.view(refresh=refresh)
            tally.epoch = view.epoch
            refresh = False
            try:
                dead = self.masked_ranks(view)
                row = view.phy2log[layer]
                call_ids, call_weights, degraded = self._route(layer, row, view, dead, ids, weights)
                plan = plan_dispatch(layer, row, view.slots_per_rank, view.ranks, dead, call_ids, rotation)
                out = self._run(view, plan, bits, call_weights.astype(np.float32).ravel(), deadline)
                tally.degraded_tokens = degraded
                return out.to(hidden_states.dtype)
            except _RankFailed as exc:  # mask at once and re-send on the same epoch: no sleep, no waiting
                self._mask(view.epoch, exc.ranks)
                tally.retried_tokens += exc.tokens
                last = exc
            except ExpertsUnavailableError as exc:  # no live replica: wait for the recovery's commit, bounded
                if time.monotonic() - start >= self.unavailable_timeout_s:
                    raise ExpertsUnavailableError(
                        f"{exc} for {self.unavailable_timeout_s:.1f}s (no recovery committed)", exc.experts) from None
                last, refresh = exc, True
                time.sleep(self.retry_sleep_s)
            except StaleEpochError as exc:  # another epoch committed: re-read the view
                last, refresh = exc, True
            tally.attempts += 1
            if time.monotonic() + self.retry_sleep_s > deadline:
                raise ServingError(f"layer {layer} call failed after {tally.attempts} attempts in "
                                   f"{self.call_timeout_s:.1f}s: {last}")

    def _route(self, layer: int, row: np.ndarray, view: CommittedView, dead: frozenset, ids: np.ndarray,
               weights: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
        """The call's (ids, weights, degraded tokens): as given, or in degraded mode renormalised over live experts.

        A dropped (token, k) entry is pointed at one of the token's kept experts with weight 0, so
        the plan stays [num_tokens, top_k]; a token with no live expert left raises ExpertsUnavailableError.
        """
        if not self.degraded:
            return ids, weights, 0
        positions = [i for i, r in enumerate(view.ranks) if r not in dead]
        _, _, count = live_replicas(np.asarray(row, dtype=np.int64), view.slots_per_rank, positions,
                                    self.spec.num_experts)
        lost = count[: self.spec.num_experts] == 0
        if not lost[ids].any():
            return ids, weights, 0
        routed = degrade_routing(ids, weights, unavailable=lost)
        if routed.num_unservable:
            bad = np.unique(ids[routed.unservable_tokens])
            raise ExpertsUnavailableError(
                f"tokens {routed.unservable_tokens.tolist()[:10]} of layer {layer} have no live expert left "
                f"(experts {bad[lost[bad]].tolist()[:20]} lost)", [(layer, int(e)) for e in bad[lost[bad]]])
        first_kept = np.argmax(routed.kept, axis=1)
        substitute = ids[np.arange(len(ids)), first_kept]
        call_ids = np.where(routed.kept, ids, substitute[:, None])
        return call_ids, np.asarray(routed.topk_weights), routed.num_degraded

    def _account(self, t_wall: float, t0: float, ids: np.ndarray, tally: "_CallTally",
                 error: Optional[BaseException], latency: Optional[float] = None) -> None:
        """Counters, the ServingLog record and the metrics of one call, served or failed."""
        latency = time.perf_counter() - t0 if latency is None else latency
        with self._lock:
            st = self.stats
            st.calls += 1
            st.retries += tally.attempts
            st.retried_tokens += tally.retried_tokens
            if error is None:
                st.tokens += len(ids)
                st.pairs += ids.size
                st.degraded_tokens += tally.degraded_tokens
                st.latencies_s.append(latency)
                del st.latencies_s[:-10000]
            else:
                st.failed += 1
        if self.log is not None:
            self.log.record(CallRecord(t_wall, t_wall + latency, len(ids), ok=error is None,
                                       error=None if error is None else type(error).__name__, epoch=tally.epoch,
                                       retried_tokens=tally.retried_tokens,
                                       degraded_tokens=tally.degraded_tokens if error is None else 0,
                                       wrong=tally.wrong))
        if self.metrics_cluster is not None:
            from ..metrics import record_serving_call

            record_serving_call(self.metrics_cluster, latency, len(ids) if error is None else 0, error)

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
        failures, died = [], []
        for part, ref in zip(plan.parts, refs):  # every result is fetched, so no error goes unretrieved
            try:
                partial = ray.get(ref, timeout=max(0.001, deadline - time.monotonic()))
            except RayTaskError as exc:
                cause = exc.cause if getattr(exc, "cause", None) is not None else exc
                failures.append(cause if isinstance(cause, StaleEpochError) else ServingError(
                    f"rank {part.rank} failed layer {plan.layer}: {type(cause).__name__}: {cause}"))
                continue
            except RayActorError as exc:
                died.append((part, type(exc).__name__))
                continue
            if not failures and not died:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # read-only object-store memory, only read here
                    out.index_add_(0, torch.from_numpy(part.tokens), torch.from_numpy(partial))
        if failures:  # the whole attempt is discarded: never a mix of epochs or a partial sum
            raise failures[0]
        if died:
            raise _RankFailed(f"ranks {[p.rank for p, _ in died]} died during layer {plan.layer}: {died[0][1]}",
                              [p.rank for p, _ in died], sum(len(p.tokens) for p, _ in died))
        return out


class _RankFailed(ServingError):
    """Ranks of the view died mid-call; the call masks them and is re-planned on the same epoch.

    ranks: the dead ranks; tokens: how many tokens they had been sent (re-sent elsewhere).
    """

    def __init__(self, message: str, ranks, tokens: int):
        super().__init__(message)
        self.ranks, self.tokens = list(ranks), int(tokens)


@dataclass
class _CallTally:
    """What happened inside one call: the epoch it ended on, re-planned attempts, retried and degraded tokens."""

    epoch: int = -1
    attempts: int = 0
    retried_tokens: int = 0
    degraded_tokens: int = 0
    wrong: Optional[bool] = None
