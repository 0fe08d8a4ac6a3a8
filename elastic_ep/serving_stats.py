"""Serving statistics: a bounded log of served calls and event marks, and pure functions that measure gaps, latency and throughput.

Glossary (every time is in seconds on ONE clock shared by calls and marks; wall
clock ``time.time()`` by default, because marks come from other processes):

- call: one served request, ``CallRecord(t_start_s, t_end_s, tokens, ok, ...)``.
  A call is *successful* (``ok``) when its tokens were served; its *completion*
  is ``t_end_s``. Failed calls never count as served.
- completion gap: the time between two successive completions of successful
  calls (completions sorted by time). Calls finishing at the same instant give a
  gap of 0. In a steady loop the gap is about one call's latency divided by the
  number of concurrent clients; a death shows as one long gap. This is the
  "gap in served tokens" a user sees.
- kill window of a kill mark at ``k``: ``[k, e]`` where ``e`` is the later of
  (a) the first ``commit`` mark after ``k`` and (b) the completion of the first
  successful call that started at or after ``k`` (the first call issued after
  the death that was served). The kill is *recovered* when (b) exists;
  otherwise ``e`` is the end of the log.
- owner of a completion gap ``(a, b)``: the nearest kill at or before ``a`` if its
  window is still open at ``a`` (serving stalled while that kill's recovery ran) and,
  where a later kill falls in ``(a, b]``, still open at the gap's middle; else the
  first kill in ``(a, b]`` (the kill that interrupted serving); else none.
  Each gap has at most one owner, so kills close together (overlapping or adjacent
  windows, as in chaos where each step's kill mark follows the last one's commit)
  never share one gap.
- kill gap: the longest completion gap that overlaps the open interval ``(k, e)``
  and that the kill owns. Where no completion precedes ``k`` the gap starts at
  ``k``; an unrecovered kill's gap runs from the last completion to the end of the
  log (open gap); a window of one instant (a fresh call served at ``k`` itself) has
  a gap of 0. A kill reports as its gap only the longest gap it owns (0 if none);
  ``kills_in_gap`` counts the kill marks inside a kill's gap (> 1: the gap spans
  later kills too). In a summary, a kill that falls inside the gap an earlier kill
  reports gives that kill's time as ``in_gap_of``.
- rebalance window: a ``rebalance_start`` mark to the next ``rebalance_commit``
  mark (or the end of the log, ``committed=False``).
- steady state: calls whose ``[t_start_s, t_end_s]`` touches no kill or
  rebalance window (each widened by ``margin_s``). Steady throughput is the
  tokens of successful calls completed outside every window, divided by the
  log's span (first start .. last end) less the windows' union.
- throughput in a window ``[a, b]``: tokens of successful calls completed in
  ``(a, b]`` (half-open, so adjacent windows never count a call twice) divided
  by ``b - a``; meaningful only for windows much longer than one call.
- latency: ``t_end_s - t_start_s`` of successful calls; percentiles are numpy's
  linear interpolation, so they lie within the observed min and max.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, replace
from typing import Callable, Optional, Sequence, Union

import numpy as np

from .errors import ElasticEPError

MARK_KINDS = ("kill", "detect", "commit", "rebalance_start", "rebalance_commit")


class ServingStatsError(ElasticEPError, ValueError):
    """A call record, a mark or a stats request is malformed (names the bad value)."""


@dataclass(frozen=True)
class CallRecord:
    """One served call: when it ran, how many tokens, and how it ended.

    error: the failure's kind (e.g. the exception class name) when ``ok`` is False, else None.
    epoch: the committed layout epoch the call used (-1 when unknown).
    retried_tokens: tokens with a (token, expert) pair re-sent within the call (a rank died under it,
    or the epoch changed after it was computed); retried_pairs: the pairs re-sent (each re-sending counts).
    degraded_tokens: tokens served over fewer than their top-k experts (degraded mode).
    wrong: True/False when checked against the oracle, None when not checked.
    """

    t_start_s: float
    t_end_s: float
    tokens: int
    ok: bool = True
    error: Optional[str] = None
    epoch: int = -1
    retried_tokens: int = 0
    degraded_tokens: int = 0
    wrong: Optional[bool] = None
    retried_pairs: int = 0

    def __post_init__(self):
        if not (math.isfinite(self.t_start_s) and math.isfinite(self.t_end_s)):
            raise ServingStatsError(f"call times must be finite, got {self.t_start_s}..{self.t_end_s}")
        if self.t_end_s < self.t_start_s:
            raise ServingStatsError(f"call ends before it starts: t_end_s={self.t_end_s} < t_start_s={self.t_start_s}")
        for name in ("tokens", "retried_tokens", "degraded_tokens", "retried_pairs"):
            if getattr(self, name) < 0:
                raise ServingStatsError(f"{name}={getattr(self, name)} is negative")
        if self.ok != (self.error is None):
            raise ServingStatsError(f"ok={self.ok} with error={self.error!r}: a failed call needs an error kind, a served one none")

    @property
    def latency_s(self) -> float:
        return self.t_end_s - self.t_start_s


@dataclass(frozen=True)
class EventMark:
    """A moment on the serving timeline: kind in MARK_KINDS, label free text (e.g. 'rank 3')."""

    t_s: float
    kind: str
    label: str = ""

    def __post_init__(self):
        if self.kind not in MARK_KINDS:
            raise ServingStatsError(f"mark kind {self.kind!r} is not one of {MARK_KINDS}")
        if not math.isfinite(self.t_s):
            raise ServingStatsError(f"mark time {self.t_s} is not finite")


class ServingLog:
    """Thread-safe append-only recorder keeping the last ``capacity`` calls and ``mark_capacity`` marks."""

    def __init__(self, capacity: int = 200_000, mark_capacity: int = 10_000, clock: Callable[[], float] = time.time):
        if capacity < 1 or mark_capacity < 1:
            raise ServingStatsError(f"capacities must be >= 1, got capacity={capacity}, mark_capacity={mark_capacity}")
        self._calls: deque[CallRecord] = deque(maxlen=capacity)
        self._marks: deque[EventMark] = deque(maxlen=mark_capacity)
        self._lock = threading.Lock()
        self.clock = clock
        self.calls_seen = 0  # every call ever recorded, including those the ring has dropped

    def record(self, call: CallRecord) -> None:
        with self._lock:
            self._calls.append(call)
            self.calls_seen += 1

    def mark(self, kind: str, label: str = "", t_s: Optional[float] = None) -> EventMark:
        """Record an event now (or at ``t_s`` on the log's clock) and return it."""
        m = EventMark(self.clock() if t_s is None else float(t_s), kind, label)
        with self._lock:
            self._marks.append(m)
        return m

    def snapshot(self) -> tuple[tuple[CallRecord, ...], tuple[EventMark, ...]]:
        with self._lock:
            return tuple(self._calls), tuple(self._marks)

    @property
    def dropped(self) -> int:
        with self._lock:
            return self.calls_seen - len(self._calls)

    def summary(self, margin_s: float = 0.0) -> "ServingSummary":
        with self._lock:  # one consistent view: the calls, the marks and what the ring dropped before them
            calls, marks, dropped = tuple(self._calls), tuple(self._marks), self.calls_seen - len(self._calls)
        return summarize(calls, marks, margin_s=margin_s, dropped_calls=dropped)


# -- pure measures ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Gap:
    """An interval with no served completion: ``start_s`` .. ``end_s``."""

    start_s: float
    end_s: float

    @property
    def length_s(self) -> float:
        return self.end_s - self.start_s


@dataclass(frozen=True)
class CallTable:
    """The calls as columns, built once so every measure is vectorised: each array is [num_calls], ``done`` [num_ok]."""

    start: np.ndarray
    end: np.ndarray
    tokens: np.ndarray
    ok: np.ndarray
    done: np.ndarray  # sorted completion times of the successful calls

    @classmethod
    def of(cls, calls: "Sequence[CallRecord] | CallTable") -> "CallTable":
        if isinstance(calls, CallTable):
            return calls
        calls = list(calls)
        col = lambda f, dtype: np.fromiter((f(c) for c in calls), dtype=dtype, count=len(calls))  # noqa: E731
        end, ok = col(lambda c: c.t_end_s, np.float64), col(lambda c: c.ok, np.bool_)
        return cls(col(lambda c: c.t_start_s, np.float64), end, col(lambda c: c.tokens, np.int64), ok, np.sort(end[ok]))

    def touching(self, a: float, b: float) -> np.ndarray:
        """[num_calls] bool: the call's [start, end] touches [a, b]."""
        return (self.start <= b) & (self.end >= a)


Calls = Union[Sequence[CallRecord], CallTable]


def completions(calls: Calls) -> np.ndarray:
    """Sorted completion times of successful calls: [num_ok]."""
    return CallTable.of(calls).done


def completion_gaps(calls: Calls) -> np.ndarray:
    """Gaps between successive successful completions: [max(num_ok - 1, 0)]."""
    return np.diff(completions(calls))


def longest_gap(calls: Calls) -> Optional[Gap]:
    """The longest completion gap (earliest on ties), or None with fewer than two successful calls."""
    done = completions(calls)
    if len(done) < 2:
        return None
    i = int(np.argmax(np.diff(done)))
    return Gap(float(done[i]), float(done[i + 1]))


def percentile(values: Sequence[float], q: float) -> Optional[float]:
    """numpy's linear percentile (``q`` in 0..100), or None for no values."""
    if not 0 <= q <= 100:
        raise ServingStatsError(f"percentile q={q} is outside 0..100")
    return float(np.percentile(np.asarray(values, dtype=np.float64), q)) if len(values) else None


def tokens_per_s(calls: Calls, t0: float, t1: float) -> Optional[float]:
    """Tokens of successful calls completed in ``(t0, t1]`` per second, None for an empty window."""
    if t1 <= t0:
        return None
    t = CallTable.of(calls)
    return float(t.tokens[t.ok & (t.end > t0) & (t.end <= t1)].sum()) / (t1 - t0)


def _first_after(marks: Sequence[EventMark], kind: str, t: float) -> Optional[float]:
    times = [m.t_s for m in marks if m.kind == kind and m.t_s >= t]
    return min(times) if times else None


def _log_end(t: CallTable, marks: Sequence[EventMark]) -> float:
    return max([float(t.end.max())] * bool(len(t.end)) + [m.t_s for m in marks])


@dataclass(frozen=True)
class KillStats:
    """What serving saw around one kill (see the module docstring for the window and gap rules)."""

    t_kill_s: float
    label: str
    detect_after_s: Optional[float]  # first detect mark after the kill, minus the kill
    commit_after_s: Optional[float]  # first commit mark after the kill, minus the kill
    window_end_s: float
    recovered: bool  # a call started after the kill was served
    gap: Gap  # the longest gap this kill owns (see the module docstring)
    calls: int  # calls touching the kill window
    failed_calls: int
    latency_p50_s: Optional[float]  # of the successful calls touching the window
    latency_p99_s: Optional[float]
    in_gap_of: Optional[float] = None  # in a summary: the earlier kill whose reported gap this kill fell in
    kills_in_gap: int = 0  # kill marks inside [gap.start_s, gap.end_s] (0 for a gap of 0)


def gap_owners(starts: np.ndarray, ends: np.ndarray, kills: np.ndarray, window_ends: np.ndarray) -> np.ndarray:
    """The kill owning each gap (see the module docstring): [num_gaps] index into ``kills``, -1 for none.

    starts, ends: [num_gaps] the gaps' bounds; kills: [num_kills] kill times, ascending;
    window_ends: [num_kills] each kill's window end.
    """
    if not len(kills):
        return np.full(len(starts), -1, dtype=np.int64)
    before = np.searchsorted(kills, starts, side="right") - 1  # the latest kill <= start (-1: none)
    after = before + 1  # the first kill > start, owning the gap if it comes by the gap's end
    inside = (after < len(kills)) & (kills[np.minimum(after, len(kills) - 1)] <= ends)
    window_end = window_ends[np.maximum(before, 0)]
    # the earlier kill's window must be open at the start, and at the middle if a later kill competes
    ongoing = (before >= 0) & (window_end > starts) & (~inside | (window_end > (starts + ends) / 2))
    return np.where(ongoing, before, np.where(inside, after, -1))


def kill_window(calls: Calls, marks: Sequence[EventMark], k: float) -> tuple[float, bool]:
    """(the window's end, recovered) of a kill at ``k`` (see the module docstring)."""
    t = CallTable.of(calls)
    fresh = t.end[t.ok & (t.start >= k)]
    commit = _first_after(marks, "commit", k)
    if len(fresh):
        return max(float(fresh.min()), commit if commit is not None else -np.inf), True
    return max(_log_end(t, marks), k), False


def kill_windows(calls: Calls, marks: Sequence[EventMark], extra: Sequence[float] = ()) -> tuple[np.ndarray, np.ndarray]:
    """(kill times, ascending and unique; each one's window end) of the kills in ``marks`` plus ``extra``."""
    t = CallTable.of(calls)
    kills = np.unique([m.t_s for m in marks if m.kind == "kill"] + list(extra))
    return kills, np.array([kill_window(t, marks, x)[0] for x in kills])


def kill_stats(calls: Calls, marks: Sequence[EventMark], kill: EventMark,
               windows: Optional[tuple[np.ndarray, np.ndarray]] = None) -> KillStats:
    """Measure the serving gap, failures and latency in one kill's window (gaps shared out among ``marks``' kills).

    windows: ``kill_windows(calls, marks)`` when the caller measures every kill (computed here otherwise).
    """
    t, k = CallTable.of(calls), kill.t_s
    kills, window_ends = windows if windows is not None else kill_windows(t, marks, [k])
    commit = _first_after(marks, "commit", k)
    detect = _first_after(marks, "detect", k)
    end, recovered = kill_window(t, marks, k)
    cut = int(np.searchsorted(t.done, k, side="right"))  # t.done[:cut] <= k < t.done[cut:]
    last = int(np.searchsorted(t.done, end, side="left"))  # t.done[last] is the first completion >= end
    seq = np.concatenate([[t.done[cut - 1] if cut else k], t.done[cut:last + 1]])
    if not recovered or seq[-1] < end:
        seq = np.append(seq, end)  # open gap: nothing was served up to the window's end
    # the interval (seq[i], seq[i+1]) overlaps (k, end) when seq[i] < end (seq[i+1] > k holds by construction)
    starts, ends = seq[:-1], seq[1:]
    owners = gap_owners(starts, ends, kills, window_ends)
    own = owners == int(np.searchsorted(kills, k))
    lengths = np.where((starts < end) & own, ends - starts, -1.0)
    i = int(np.argmax(lengths)) if len(lengths) else 0
    if len(lengths) and lengths[i] >= 0:
        gap = Gap(float(starts[i]), float(ends[i]))
    else:
        gap = Gap(float(k), float(k)) if len(starts) and starts[0] <= k < ends[0] else Gap(float(end), float(end))
    inside_gap = int(((kills >= gap.start_s) & (kills <= gap.end_s)).sum()) if gap.length_s > 0 else 0
    inside = t.touching(k, end)
    lat = (t.end - t.start)[inside & t.ok]
    return KillStats(
        t_kill_s=k, label=kill.label,
        detect_after_s=None if detect is None else detect - k,
        commit_after_s=None if commit is None else commit - k,
        window_end_s=float(end), recovered=recovered, gap=gap,
        calls=int(inside.sum()), failed_calls=int((inside & ~t.ok).sum()),
        latency_p50_s=percentile(lat, 50), latency_p99_s=percentile(lat, 99),
        kills_in_gap=inside_gap,
    )


@dataclass(frozen=True)
class WindowThroughput:
    """Throughput during one rebalance (start .. commit) beside steady state."""

    t_start_s: float
    t_end_s: float
    label: str
    committed: bool
    tokens_per_s: Optional[float]
    ratio_to_steady: Optional[float]


def rebalance_windows(marks: Sequence[EventMark], log_end_s: float) -> list[tuple[float, float, str, bool]]:
    """Pair each rebalance_start with the next rebalance_commit: [(start, end, label, committed)]."""
    out = []
    for m in sorted((m for m in marks if m.kind == "rebalance_start"), key=lambda m: m.t_s):
        end = _first_after(marks, "rebalance_commit", m.t_s)
        out.append((m.t_s, end if end is not None else max(log_end_s, m.t_s), m.label, end is not None))
    return out


def steady_mask(calls: Calls, windows: Sequence[tuple[float, float]], margin_s: float = 0.0) -> np.ndarray:
    """[num_calls] bool: the call touches no window widened by ``margin_s`` on each side."""
    t = CallTable.of(calls)
    busy = np.zeros(len(t.start), dtype=bool)
    for a, b in windows:
        busy |= t.touching(a - margin_s, b + margin_s)
    return ~busy


def steady_calls(calls: Sequence[CallRecord], windows: Sequence[tuple[float, float]], margin_s: float = 0.0) -> list[CallRecord]:
    """Calls touching no window widened by ``margin_s`` on each side."""
    return [c for c, steady in zip(calls, steady_mask(calls, windows, margin_s)) if steady]


def _union_length(windows: Sequence[tuple[float, float]], lo: float, hi: float) -> float:
    total, cur_a, cur_b = 0.0, None, None
    for a, b in sorted((max(a, lo), min(b, hi)) for a, b in windows):
        if b <= a:
            continue
        if cur_b is None or a > cur_b:
            total += 0.0 if cur_b is None else cur_b - cur_a
            cur_a, cur_b = a, b
        else:
            cur_b = max(cur_b, b)
    return total + (0.0 if cur_b is None else cur_b - cur_a)


def steady_tokens_per_s(calls: Calls, windows: Sequence[tuple[float, float]], margin_s: float = 0.0) -> Optional[float]:
    """Tokens/s completed outside every (widened) window over the log's span less the windows' union."""
    t = CallTable.of(calls)
    if not len(t.start):
        return None
    lo, hi = float(t.start.min()), float(t.end.max())
    wide = [(a - margin_s, b + margin_s) for a, b in windows]
    span = (hi - lo) - _union_length(wide, lo, hi)
    if span <= 0:
        return None
    counted = t.ok.copy()
    for a, b in wide:
        counted &= ~((t.end > a) & (t.end <= b))
    return float(t.tokens[counted].sum()) / span


@dataclass(frozen=True)
class ServingSummary:
    """Everything the chaos summary and the demo report about serving (JSON via ``to_dict``)."""

    t0_s: float  # the log's first moment; format_table prints times relative to it
    span_s: float
    calls: int
    ok_calls: int
    failed_calls: int
    failed_by_kind: tuple[tuple[str, int], ...]
    checked_calls: int
    wrong_calls: int
    tokens_served: int
    retried_tokens: int
    degraded_tokens: int
    dropped_calls: int  # calls the bounded log forgot before this summary (stats cover the rest)
    longest_gap: Optional[Gap]
    steady_calls: int
    steady_p50_s: Optional[float]
    steady_p99_s: Optional[float]
    steady_tokens_per_s: Optional[float]
    kills: tuple[KillStats, ...]
    rebalances: tuple[WindowThroughput, ...]
    retried_pairs: int = 0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["failed_by_kind"] = dict(self.failed_by_kind)
        if self.longest_gap is not None:
            d["longest_gap"]["length_s"] = self.longest_gap.length_s
        for kd, k in zip(d["kills"], self.kills):
            kd["gap"]["length_s"] = k.gap.length_s
        return d

    def format_table(self) -> str:
        return _format(self)


def summarize(calls: Sequence[CallRecord], marks: Sequence[EventMark] = (), *, margin_s: float = 0.0, dropped_calls: int = 0) -> ServingSummary:
    """Measure a serving stream around its events; see the module docstring for every definition."""
    if not calls:
        raise ServingStatsError("no calls to summarize: the serving log is empty")
    if margin_s < 0:
        raise ServingStatsError(f"margin_s={margin_s} is negative")
    calls = list(calls)
    table = CallTable.of(calls)
    marks = sorted(marks, key=lambda m: m.t_s)
    end = _log_end(table, marks)
    t0 = min([float(table.start.min())] + [m.t_s for m in marks])
    kill_ends = kill_windows(table, marks)  # once for all kills: each kill's gap depends on every kill's window
    kills = tuple(kill_stats(table, marks, m, kill_ends) for m in marks if m.kind == "kill")
    kills = tuple(replace(k, in_gap_of=next((o.t_kill_s for o in kills if o.t_kill_s < k.t_kill_s
                                             and o.gap.start_s <= k.t_kill_s < o.gap.end_s), None)) for k in kills)
    rebs = rebalance_windows(marks, end)
    windows = [(k.t_kill_s, k.window_end_s) for k in kills] + [(a, b) for a, b, _, _ in rebs]
    steady = steady_mask(table, windows, margin_s)
    steady_lat = (table.end - table.start)[steady & table.ok]
    steady_tps = steady_tokens_per_s(table, windows, margin_s)
    failed: dict[str, int] = {}
    for c in calls:
        if not c.ok:
            failed[c.error] = failed.get(c.error, 0) + 1
    reb_stats = []
    for a, b, label, committed in rebs:
        tps = tokens_per_s(table, a, b)
        ratio = tps / steady_tps if tps is not None and steady_tps else None
        reb_stats.append(WindowThroughput(a, b, label, committed, tps, ratio))
    n_ok = int(table.ok.sum())
    return ServingSummary(
        t0_s=t0, span_s=end - t0, calls=len(calls), ok_calls=n_ok, failed_calls=len(calls) - n_ok,
        failed_by_kind=tuple(sorted(failed.items())),
        checked_calls=sum(c.wrong is not None for c in calls), wrong_calls=sum(c.wrong is True for c in calls),
        tokens_served=int(table.tokens[table.ok].sum()), retried_tokens=sum(c.retried_tokens for c in calls),
        degraded_tokens=sum(c.degraded_tokens for c in calls), dropped_calls=dropped_calls,
        retried_pairs=sum(c.retried_pairs for c in calls),
        longest_gap=longest_gap(table), steady_calls=int(steady.sum()),
        steady_p50_s=percentile(steady_lat, 50), steady_p99_s=percentile(steady_lat, 99),
        steady_tokens_per_s=steady_tps, kills=kills, rebalances=tuple(reb_stats),
    )


def _ms(x: Optional[float]) -> str:
    return "-" if x is None else f"{x * 1e3:.1f}"


def _format(s: ServingSummary) -> str:
    failed = ", ".join(f"{k} {n}" for k, n in s.failed_by_kind)
    tps = "-" if s.steady_tokens_per_s is None else f"{s.steady_tokens_per_s:,.0f}"
    lines = [
        f"serving: {s.calls} calls over {s.span_s:.2f} s, {s.ok_calls} served, {s.failed_calls} failed"
        + (f" ({failed})" if failed else "") + f", {s.wrong_calls} wrong of {s.checked_calls} checked",
        f"tokens: {s.tokens_served:,} served, {s.retried_tokens:,} retried ({s.retried_pairs:,} pairs re-sent), "
        f"{s.degraded_tokens:,} degraded"
        + (f"; {s.dropped_calls} older calls dropped from the log" if s.dropped_calls else ""),
        f"steady: {s.steady_calls} calls, p50 {_ms(s.steady_p50_s)} ms, p99 {_ms(s.steady_p99_s)} ms, {tps} tokens/s",
    ]
    if s.longest_gap is not None:
        g = s.longest_gap
        lines.append(f"longest gap: {_ms(g.length_s)} ms (t={g.start_s - s.t0_s:.3f}..{g.end_s - s.t0_s:.3f} s)")
    if s.kills:
        lines.append(f"{'kill t_s':>9} {'label':>10} {'detect_ms':>9} {'commit_ms':>9} {'gap_ms':>8} "
                     f"{'p50_ms':>7} {'p99_ms':>7} {'calls':>6} {'failed':>6} recovered")
        for k in s.kills:
            lines.append(f"{k.t_kill_s - s.t0_s:9.3f} {k.label[:10]:>10} {_ms(k.detect_after_s):>9} {_ms(k.commit_after_s):>9} "
                         f"{_ms(k.gap.length_s):>8} {_ms(k.latency_p50_s):>7} {_ms(k.latency_p99_s):>7} "
                         f"{k.calls:6d} {k.failed_calls:6d} {'yes' if k.recovered else 'NO'}"
                         + (f" (in the gap of the kill at {k.in_gap_of - s.t0_s:.3f})" if k.in_gap_of is not None else "")
                         + (f" (gap spans {k.kills_in_gap} kills)" if k.kills_in_gap > 1 else ""))
    if s.rebalances:
        lines.append(f"{'rebal t_s':>9} {'label':>10} {'dur_ms':>9} {'tokens/s':>12} {'vs steady':>9} committed")
        for r in s.rebalances:
            rtps = "-" if r.tokens_per_s is None else f"{r.tokens_per_s:,.0f}"
            ratio = "-" if r.ratio_to_steady is None else f"{100 * r.ratio_to_steady:.1f}%"
            lines.append(f"{r.t_start_s - s.t0_s:9.3f} {r.label[:10]:>10} {_ms(r.t_end_s - r.t_start_s):>9} "
                         f"{rtps:>12} {ratio:>9} {'yes' if r.committed else 'NO'}")
    return "\n".join(lines)
