"""MoEClient: sends a layer call's tokens to the ranks holding their experts and combines what comes back.

One call = one committed epoch: the client plans on one ``CommittedView`` and every
rank checks the epoch under its serving lock. When a rank dies mid-call, the partial
sums of the ranks that answered are kept and only the dead rank's (token, expert) pairs
are planned again over the live replicas, on the same epoch. Partial sums are kept only
while the epoch is unchanged: if a rank reports another epoch, or the view moves to a new
one (a recovery's commit), the whole call is planned again on the new epoch (partial
results of two epochs are never mixed). Each rank involved gets one remote call per
attempt with its tokens once (Ray object store, zero-copy numpy on the CPU data path);
every wait is bounded by ``call_timeout_s``. Safe to share between threads; several
clients may serve at once.
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
from .dispatch import DispatchPlan, RankDispatch, check_call, live_replicas, pairs_to_send, plan_dispatch

_DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}


@dataclass
class ServingStats:
    """What a client served: calls, failed calls, (token, expert) pairs, re-planned attempts, masked retries.

    retried_pairs: (token, expert) pairs sent again within their call (a rank died under them, or
    the epoch changed after they were computed); each sending beyond a pair's first counts.
    retried_tokens: tokens with at least one pair sent again, once per call.
    degraded_tokens: tokens served over fewer than their top-k experts (degraded mode).
    """

    calls: int = 0
    failed: int = 0
    tokens: int = 0
    pairs: int = 0
    retries: int = 0
    retried_pairs: int = 0
    retried_tokens: int = 0
    degraded_tokens: int = 0
    latencies_s: list = field(default_factory=list)  # per served call, in order (the last 10 000)


class MoEClient:
    """A long-lived serving handle: ``client.moe(layer, hidden_states, topk_ids, topk_weights)``.

    get_view: returns the controller's current CommittedView (a remote call).
    view_max_age_s: a view older than this is re-read in the background (0: after every call),
    calls going on with the held one meanwhile; a stale one is harmless, since ranks reject a
    call planned on another epoch: the call then takes the later view from the rank that
    rejected it (each rank keeps the view its commit came with), so a restarting controller
    stalls no call; only a rank with no view sends the call to re-read the controller's.
    unavailable_timeout_s: how long a call whose experts have no live replica waits for the
    recovery's commit (polling the view) before ExpertsUnavailableError names them.
    degraded: opt-in; such tokens are instead served over their remaining top-k experts,
    renormalised (``elastic_ep.degraded``), and counted in ``stats.degraded_tokens``.
    log: a ServingLog that gets one CallRecord per call; metrics_cluster: cluster name for
    ``elastic_ep.metrics.record_serving_call`` (None: no metrics).

    Masking: a rank is masked as soon as the view lists it dead or a call to it fails with
    RayActorError, whichever comes first; the dead rank's pairs are re-planned at once on the
    same epoch without it, the other ranks' partial sums kept (never a mix of epochs).
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
        self._refreshing = False  # a background view refresh is in flight
        self._rotation = 0
        self._masked: tuple[int, frozenset] = (-1, frozenset())  # (epoch, ranks seen dying under it)
        self.stats = ServingStats()

    def view(self, refresh: bool = False) -> CommittedView:
        """The committed view calls are planned on.

        A view older than ``view_max_age_s`` is re-read in the background while calls go on with
        the one held (a stale view is harmless: ranks reject another epoch, and a call that hits
        one re-reads here with ``refresh``), so a controller that is slow or restarting never
        stalls serving while the ranks serve the epoch held. The first view and ``refresh``
        read at once (the call needs them).
        """
        with self._lock:
            held = self._view
            if held is not None and not refresh:
                if time.monotonic() - self._view_time > self.view_max_age_s and not self._refreshing:
                    self._refreshing = True
                    threading.Thread(target=self._refresh_in_background, daemon=True, name="moe-view-refresh").start()
                return held
        return self._store(self._get_view(), refresh)

    def _store(self, view: CommittedView, forced: bool) -> CommittedView:
        with self._lock:
            if self._view is None or view.epoch >= self._view.epoch or forced:
                self._view, self._view_time = view, time.monotonic()
            return self._view

    def _refresh_in_background(self) -> None:
        try:
            self._store(self._get_view(), False)
        except Exception:  # noqa: BLE001 - the controller is unreachable or restarting: keep serving the held view
            pass
        finally:
            with self._lock:
                self._refreshing = False

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
        """Plan, send and re-plan until served: masks dead ranks, re-sends only what is missing, waits (bounded) for lost experts."""
        from .bits import to_bits

        bits = to_bits(hidden_states.detach().cpu())
        with self._lock:
            rotation = self._rotation
            self._rotation += 1
        start = time.monotonic()
        deadline = start + self.call_timeout_s
        sums = _PartialSums(*ids.shape, self.spec.hidden)
        refresh, last = False, None
        try:
            while True:
                view = self.view(refresh=refresh)
                tally.epoch = view.epoch
                refresh = False
                try:
                    dead = self.masked_ranks(view)
                    row = view.phy2log[layer]
                    call_ids, call_weights, degraded = self._route(layer, row, view, dead, ids, weights)
                    pending = sums.pending(view.epoch, call_ids, call_weights)
                    plan = plan_dispatch(layer, row, view.slots_per_rank, view.ranks, dead, call_ids, rotation,
                                         pending)
                    sums.sending(plan)
                    self._run(view, plan, bits, call_ids, call_weights.astype(np.float32), sums, deadline)
                    tally.degraded_tokens = degraded
                    return sums.out.to(hidden_states.dtype)
                except _RankFailed as exc:  # mask at once, re-send its pairs on the same epoch: no sleep, no waiting
                    self._mask(view.epoch, exc.ranks)
                    last = exc
                except ExpertsUnavailableError as exc:  # no live replica: wait for the recovery's commit, bounded
                    if time.monotonic() - start >= self.unavailable_timeout_s:
                        raise ExpertsUnavailableError(
                            f"{exc} for {self.unavailable_timeout_s:.1f}s (no recovery committed)",
                            exc.experts) from None
                    last, refresh = exc, True
                    time.sleep(self.retry_sleep_s)
                except _RankMovedOn as exc:  # read the later view from that rank: the controller may be restarting
                    last = exc.error
                    refresh = not self._adopt_view_of(exc.handle, view.epoch, deadline)
                except StaleEpochError as exc:
                    last = exc
                    if exc.worker_epoch < exc.call_epoch:  # a rank has yet to apply the commit the view shows:
                        time.sleep(self.retry_sleep_s)  # wait for it; re-reading the view would not help
                    else:  # the rank changed hands at this epoch: re-read the view
                        refresh = True
                tally.attempts += 1
                if time.monotonic() + self.retry_sleep_s > deadline:
                    raise ServingError(f"layer {layer} call failed after {tally.attempts} attempts in "
                                       f"{self.call_timeout_s:.1f}s: {last}")
        finally:
            tally.retried_pairs, tally.retried_tokens = sums.resent_pairs, sums.resent_tokens()

    def _adopt_view_of(self, handle, epoch: int, deadline: float) -> bool:
        """Hold the later CommittedView a rank got with its commit; False where it has none (re-read the controller).

        A rank that committed a later epoch than ``epoch`` knows the whole view in force, so a
        client behind it catches up without asking a controller that may be restarting.
        """
        import ray

        try:
            got = ray.get(handle.committed_view.remote(), timeout=max(0.001, min(deadline - time.monotonic(), 5.0)))
        except Exception:  # noqa: BLE001 - the rank died or is slow: the controller's view will do
            return False
        if got is None or got.epoch <= epoch:
            return False
        self._store(got, False)
        return True

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
            st.retried_pairs += tally.retried_pairs
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
                                       retried_tokens=tally.retried_tokens, retried_pairs=tally.retried_pairs,
                                       degraded_tokens=tally.degraded_tokens if error is None else 0,
                                       wrong=tally.wrong))
        if self.metrics_cluster is not None:
            from ..metrics import record_serving_call

            record_serving_call(self.metrics_cluster, latency, len(ids) if error is None else 0, error)

    def _run(self, view: CommittedView, plan: DispatchPlan, bits: np.ndarray, call_ids: np.ndarray,
             call_weights: np.ndarray, sums: "_PartialSums", deadline: float) -> None:
        """One attempt: one remote call per rank, all awaited with the call's deadline, summed into ``sums``.

        call_ids / call_weights: [num_tokens, top_k] the routing the plan was made from (float32 weights).
        Every rank that answered is kept in ``sums`` (same epoch); then a rank's error is raised,
        or _RankFailed naming the ranks that died.
        """
        import ray
        from ray.exceptions import RayActorError, RayTaskError

        flat_weights = call_weights.ravel()
        refs = []
        for part in plan.parts:
            handle = view.workers[part.rank]
            refs.append(handle.serve_layer.remote(view.epoch, part.rank, plan.layer, bits[part.tokens], part.rows,
                                                  part.slots, flat_weights[part.pairs]))
        if not refs:
            return
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
                if isinstance(cause, StaleEpochError) and cause.worker_epoch > cause.call_epoch:
                    failures.append(_RankMovedOn(cause, view.workers[part.rank]))
                else:
                    failures.append(cause if isinstance(cause, StaleEpochError) else ServingError(
                        f"rank {part.rank} failed layer {plan.layer}: {type(cause).__name__}: {cause}\n"
                        f"rank {part.rank}'s traceback (end):\n{_traceback_tail(exc)}"))
                continue
            except RayActorError as exc:
                died.append((part, type(exc).__name__))
                continue
            sums.add(part, partial, call_ids, call_weights)  # computed at view.epoch: kept while it holds
        if failures:  # a stale epoch re-plans on a fresh view (the sums reset if the epoch moved)
            raise failures[0]
        if died:
            raise _RankFailed(f"ranks {[p.rank for p, _ in died]} died during layer {plan.layer}: {died[0][1]}",
                              [p.rank for p, _ in died])


def _traceback_tail(exc: BaseException, lines: int = 12) -> str:
    """The last lines of a RayTaskError's remote traceback (where on the rank it failed)."""
    return "\n".join(str(exc).strip().splitlines()[-lines:])


class _RankMovedOn(Exception):
    """A rank serves a later committed epoch than the call's; ``handle`` is that rank's worker (to read its view)."""

    def __init__(self, error: StaleEpochError, handle):
        super().__init__(str(error))
        self.error, self.handle = error, handle


class _PartialSums:
    """One call's fp32 output, summed from the ranks that answered, kept within one committed epoch.

    out: [num_tokens, hidden] float32; done: [num_tokens, top_k] pairs summed into ``out`` at ``epoch``;
    ids / weights: [num_tokens, top_k] the routing the done pairs were computed with;
    sent: [num_tokens, top_k] pairs sent at least once (any epoch); resent: pairs sent more than once.
    """

    def __init__(self, num_tokens: int, top_k: int, hidden: int):
        self.out = torch.zeros((num_tokens, hidden), dtype=torch.float32)
        self.done = np.zeros((num_tokens, top_k), dtype=bool)
        self.ids = np.zeros((num_tokens, top_k), dtype=np.int64)
        self.weights = np.zeros((num_tokens, top_k), dtype=np.float32)
        self.sent = np.zeros((num_tokens, top_k), dtype=bool)
        self.resent = np.zeros((num_tokens, top_k), dtype=bool)
        self.resent_pairs = 0  # every sending of a pair beyond its first
        self.epoch: Optional[int] = None

    def pending(self, epoch: int, ids: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """[num_tokens, top_k] pairs still to send at ``epoch`` under the routing (ids, weights) now in force."""
        if epoch != self.epoch:  # a new epoch: nothing computed on another one is kept
            self.out.zero_()
            self.done[:] = False
            self.epoch = epoch
        reset, pending = pairs_to_send(self.done, self.ids, self.weights, ids, weights.astype(np.float32))
        if reset.any():  # degraded mode re-weighted these tokens: their sums start over
            self.out[torch.from_numpy(reset)] = 0.0
            self.done[reset] = False
        return pending

    def sending(self, plan: DispatchPlan) -> None:
        """Count the plan's pairs that were sent before (re-sends)."""
        flat = np.zeros(self.sent.size, dtype=bool)
        for part in plan.parts:
            flat[part.pairs] = True
        again = flat & self.sent.ravel()
        self.resent_pairs += int(again.sum())
        self.resent.ravel()[again] = True
        self.sent.ravel()[flat] = True

    def add(self, part: RankDispatch, partial: np.ndarray, ids: np.ndarray, weights: np.ndarray) -> None:
        """Sum one rank's answer ([len(part.tokens), hidden] float32) into ``out``; its pairs are done."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # read-only object-store memory, only read here
            self.out.index_add_(0, torch.from_numpy(part.tokens), torch.from_numpy(partial))
        self.done.ravel()[part.pairs] = True
        self.ids.ravel()[part.pairs] = ids.ravel()[part.pairs]
        self.weights.ravel()[part.pairs] = weights.ravel()[part.pairs]

    def resent_tokens(self) -> int:
        return int(self.resent.any(axis=1).sum())


class _RankFailed(ServingError):
    """Ranks of the view died mid-call; the call masks them and re-plans their pairs on the same epoch."""

    def __init__(self, message: str, ranks):
        super().__init__(message)
        self.ranks = list(ranks)


@dataclass
class _CallTally:
    """What happened inside one call: the epoch it ended on, re-planned attempts, retried pairs and tokens, degraded tokens."""

    epoch: int = -1
    attempts: int = 0
    retried_pairs: int = 0
    retried_tokens: int = 0
    degraded_tokens: int = 0
    wrong: Optional[bool] = None
