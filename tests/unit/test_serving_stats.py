"""Serving statistics: hand-worked streams with exact numbers, invariants under hypothesis, bad input."""

import json
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from elastic_ep.errors import ElasticEPError
from elastic_ep.serving_stats import (
    CallRecord,
    EventMark,
    Gap,
    ServingLog,
    ServingStatsError,
    completion_gaps,
    kill_stats,
    longest_gap,
    percentile,
    steady_calls,
    summarize,
    tokens_per_s,
)


def ok(t0, t1, tokens=5, **kw):
    return CallRecord(t0, t1, tokens, **kw)


def failed(t0, t1, kind="PeerDiedError", tokens=5):
    return CallRecord(t0, t1, tokens, ok=False, error=kind)


# -- hand-worked examples ------------------------------------------------------------------


def test_longest_gap_of_a_sequential_stream():
    calls = [ok(0, 1), ok(1, 2), ok(2, 2.5), ok(2.5, 4)]
    assert completion_gaps(calls).tolist() == [1.0, 0.5, 1.5]
    assert longest_gap(calls) == Gap(2.5, 4.0)
    assert longest_gap(calls).length_s == 1.5


def test_failed_calls_do_not_close_a_gap():
    calls = [ok(0, 1), failed(1, 2), failed(2, 3), ok(3, 4)]
    assert longest_gap(calls) == Gap(1.0, 4.0)


def test_ties_pick_the_earliest_gap_and_fewer_than_two_completions_give_none():
    assert longest_gap([ok(0, 1), ok(1, 2), ok(2, 3)]) == Gap(1.0, 2.0)
    assert longest_gap([ok(0, 1), failed(0, 2)]) is None
    assert longest_gap([]) is None


KILL_STREAM = [
    ok(0.0, 0.1), ok(0.1, 0.2), ok(0.2, 0.3),
    ok(0.3, 0.7, retried_tokens=2),  # in flight at the kill: retried on a surviving replica
    ok(0.7, 0.8), ok(0.8, 0.9),
]
KILL_MARKS = [EventMark(0.35, "kill", "rank 1"), EventMark(0.4, "detect"), EventMark(0.75, "commit")]


def test_kill_window_gap_and_latency_worked_by_hand():
    k = kill_stats(KILL_STREAM, KILL_MARKS, KILL_MARKS[0])
    # first call started after the kill is (0.7, 0.8): served at 0.8, later than the commit at 0.75
    assert k.recovered and k.window_end_s == 0.8
    assert k.detect_after_s == pytest.approx(0.05) and k.commit_after_s == pytest.approx(0.4)
    # completions 0.3 | 0.7 0.8 0.9: gaps overlapping (0.35, 0.8) are 0.3..0.7 and 0.7..0.8
    assert k.gap == Gap(0.3, 0.7)
    # calls touching [0.35, 0.8]: the retried one (0.4 s) and the two after (0.1 s each)
    assert (k.calls, k.failed_calls) == (3, 0)
    assert k.latency_p50_s == pytest.approx(0.1)
    assert k.latency_p99_s == pytest.approx(0.1 + 0.98 * 0.3)  # linear: rank 0.99 * 2 = 1.98
    assert k.label == "rank 1"


def test_summary_of_the_kill_stream_worked_by_hand():
    s = summarize(KILL_STREAM, KILL_MARKS)
    assert (s.calls, s.ok_calls, s.failed_calls, s.tokens_served, s.retried_tokens) == (6, 6, 0, 30, 2)
    assert s.longest_gap == Gap(0.3, 0.7)
    assert s.steady_calls == 3  # the three before the kill
    assert s.steady_p50_s == pytest.approx(0.1) and s.steady_p99_s == pytest.approx(0.1)
    # span 0..0.9 less the kill window 0.35..0.8 = 0.45 s; tokens completed outside it: 0.1 0.2 0.3 0.9
    assert s.steady_tokens_per_s == pytest.approx(20 / 0.45)
    assert s.t0_s == 0.0 and s.span_s == pytest.approx(0.9)


def test_unrecovered_kill_has_an_open_gap_to_the_end_of_the_log():
    calls = [ok(0, 1), ok(1, 2), failed(2.5, 3.0)]
    k = kill_stats(calls, [EventMark(2.5, "kill")], EventMark(2.5, "kill"))
    assert not k.recovered
    assert k.window_end_s == 3.0 and k.gap == Gap(2.0, 3.0)
    assert (k.calls, k.failed_calls) == (1, 1)
    assert k.latency_p50_s is None and k.commit_after_s is None and k.detect_after_s is None


def test_kill_before_any_completion_measures_from_the_kill():
    calls = [ok(0.5, 1.0)]
    k = kill_stats(calls, [], EventMark(0.0, "kill"))
    assert k.recovered and k.gap == Gap(0.0, 1.0)
    assert summarize(calls, [EventMark(0.0, "kill")]).longest_gap is None


def test_a_late_commit_extends_the_kill_window():
    # the first fresh call is served at 1.1, but the commit comes at 1.6: gaps up to the commit count
    calls = [ok(0, 1), ok(1.05, 1.1), ok(1.1, 1.3), ok(1.3, 1.9)]
    k = kill_stats(calls, [EventMark(1.6, "commit")], EventMark(1.0, "kill"))
    assert k.window_end_s == 1.6 and k.gap == Gap(1.3, 1.9)


def _loop(t0, t1, lat=0.1):
    """Back-to-back calls of ``lat`` from t0 to t1."""
    n = int(round((t1 - t0) / lat))
    return [ok(t0 + i * lat, t0 + (i + 1) * lat) for i in range(n)]


def _chaos_marks(steps):
    """Chaos-style marks: each step's kill at its start, its commit at its end (just before the next step's kill)."""
    return [EventMark(t, kind, f"step {i}") for i, (a, b) in enumerate(steps)
            for t, kind in ((a, "kill"), (b - 1e-3, "commit"))]


def test_one_stall_across_four_chaos_steps_is_one_gap_of_the_first_kill_not_four():
    # the suspicion from `chaos --kills 60 --seed 1`: four kills reported the same 14.2 s gap.
    # Steps of one second tile 10..14; one call hangs from 9.95 to 24.15; the stream runs before and after.
    calls = _loop(8.95, 9.95) + [ok(9.95, 24.15)] + _loop(24.15, 25.15)
    s = summarize(calls, _chaos_marks([(10, 11), (11, 12), (12, 13), (13, 14)]))
    first, *rest = s.kills
    assert first.gap == Gap(9.95, 24.15) and first.kills_in_gap == 4 and first.in_gap_of is None
    assert all(k.in_gap_of == 10 for k in rest)  # each later kill fell inside that gap: reported, not counted again
    # what they own: nothing, or (the last one, whose window is open when serving resumes) the next 0.1 s call
    assert [round(k.gap.length_s, 2) for k in s.kills] == [14.2, 0, 0, 0.1]


def test_a_stall_that_starts_inside_a_steps_window_is_that_steps_even_past_the_next_kill_mark():
    # seen in `chaos --kills 10 --seed 1`: the controller is killed in step A (mark at 0.0); the stream
    # stalls 0.26..6.48 while the controller restarts; step B's kill mark at 5.8 falls inside that stall
    calls = _loop(-0.54, 0.26) + [ok(0.26, 6.48)] + _loop(6.48, 7.28) + [ok(7.28, 7.58)] + _loop(7.58, 9.58)
    a, b = summarize(calls, _chaos_marks([(0.0, 5.8), (5.8, 9.0)])).kills
    assert a.gap == Gap(0.26, 6.48) and a.kills_in_gap == 1
    assert b.in_gap_of == 0.0 and b.gap == Gap(7.28, 7.58)  # B's own longest gap, inside its own window


def test_a_gap_that_holds_the_kill_belongs_to_it_when_no_earlier_window_is_open():
    # the demo's case: the last completion before the kill opens the gap the kill causes
    calls = _loop(0, 1.0) + [ok(1.0, 1.8)] + _loop(1.8, 2.5)
    marks = [EventMark(0.2, "kill", "old"), EventMark(0.3, "commit"), EventMark(1.05, "kill", "new")]
    old, new = summarize(calls, marks).kills
    assert new.gap == Gap(1.0, 1.8) and new.in_gap_of is None and new.kills_in_gap == 1
    assert old.gap.length_s == pytest.approx(0.1)  # the earlier kill's window closed at 0.3


def test_rebalance_throughput_worked_by_hand():
    # 16 calls of 0.25 s back to back, 100 tokens each, 90 each for calls served during the rebalance (2, 3]
    calls = [ok(0.25 * i, 0.25 * (i + 1), 90 if 2 < 0.25 * (i + 1) <= 3 else 100) for i in range(16)]
    marks = [EventMark(2.0, "rebalance_start", "load"), EventMark(3.0, "rebalance_commit")]
    s = summarize(calls, marks)
    (r,) = s.rebalances
    assert (r.t_start_s, r.t_end_s, r.label, r.committed) == (2.0, 3.0, "load", True)
    assert r.tokens_per_s == 360.0  # four completions in (2, 3]
    assert s.steady_tokens_per_s == 400.0  # 12 calls x 100 tokens over 4 s - 1 s
    assert r.ratio_to_steady == 0.9
    assert s.steady_calls == 10  # calls touching [2, 3] (ends at 2.0 .. starts at 3.0) are not steady
    assert s.steady_p50_s == s.steady_p99_s == 0.25
    assert s.kills == ()


def test_uncommitted_rebalance_runs_to_the_end_of_the_log():
    calls = [ok(0, 1, 10), ok(1, 2, 10), ok(2, 3, 10)]
    (r,) = summarize(calls, [EventMark(1.0, "rebalance_start")]).rebalances
    assert not r.committed and r.t_end_s == 3.0 and r.tokens_per_s == 10.0
    assert r.ratio_to_steady == 1.0  # steady: 10 tokens over 0..1


def test_margin_widens_the_windows():
    calls = [ok(0.125 * i, 0.125 * (i + 1)) for i in range(20)]  # binary-exact times
    marks = [EventMark(1.0, "rebalance_start"), EventMark(1.25, "rebalance_commit")]
    assert summarize(calls, marks).steady_calls == 20 - 4  # calls 7..10 touch [1.0, 1.25]
    assert summarize(calls, marks, margin_s=0.25).steady_calls == 20 - 8  # [0.75, 1.5] touches 5..12


def test_failures_wrong_outputs_and_degraded_tokens_are_counted():
    calls = [
        ok(0, 1, wrong=False), ok(1, 2, wrong=True), ok(2, 3, degraded_tokens=3),
        failed(3, 4, "PeerDiedError"), failed(4, 5, "ExpertsLostError"), failed(5, 6, "PeerDiedError"),
    ]
    s = summarize(calls)
    assert s.failed_calls == 3 and dict(s.failed_by_kind) == {"ExpertsLostError": 1, "PeerDiedError": 2}
    assert (s.checked_calls, s.wrong_calls, s.degraded_tokens, s.tokens_served) == (2, 1, 3, 15)


def test_to_dict_is_json_and_the_table_names_what_matters():
    s = summarize(KILL_STREAM + [failed(0.9, 1.0)], KILL_MARKS + [EventMark(0.5, "rebalance_start"), EventMark(0.6, "rebalance_commit")])
    d = json.loads(json.dumps(s.to_dict()))
    assert d["longest_gap"]["length_s"] == pytest.approx(0.4)
    assert d["kills"][0]["gap"]["length_s"] == pytest.approx(0.4)
    assert d["failed_by_kind"] == {"PeerDiedError": 1}
    assert d["rebalances"][0]["committed"] is True
    table = s.format_table()
    assert "longest gap: 400.0 ms (t=0.300..0.700 s)" in table
    assert "PeerDiedError 1" in table and "rank 1" in table and "recovered" in table
    kill_row = next(line for line in table.splitlines() if "rank 1" in line)
    assert kill_row.split()[:6] == ["0.350", "rank", "1", "50.0", "400.0", "400.0"]


# -- the log ---------------------------------------------------------------------------------


def test_log_is_a_bounded_ring_that_counts_what_it_dropped():
    log = ServingLog(capacity=3, mark_capacity=2, clock=lambda: 7.5)
    for i in range(5):
        log.record(ok(i, i + 1))
    calls, _ = log.snapshot()
    assert [c.t_start_s for c in calls] == [2, 3, 4]
    assert log.dropped == 2 and log.calls_seen == 5
    assert log.mark("kill", "rank 0") == EventMark(7.5, "kill", "rank 0")
    log.mark("detect", t_s=8.0)
    log.mark("commit", t_s=9.0)
    assert [m.kind for m in log.snapshot()[1]] == ["detect", "commit"]
    assert log.summary().dropped_calls == 2


def test_log_takes_records_from_many_threads():
    log = ServingLog(capacity=10_000)

    def work(j):
        for i in range(1000):
            log.record(ok(i, i + 1, tokens=j))

    threads = [threading.Thread(target=work, args=(j,)) for j in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    calls, _ = log.snapshot()
    assert len(calls) == 4000 and log.dropped == 0
    assert sorted(np.bincount([c.tokens for c in calls]).tolist()) == [1000] * 4


# -- bad input -------------------------------------------------------------------------------


@pytest.mark.parametrize("make, match", [
    (lambda: CallRecord(1.0, 0.5, 1), r"t_end_s=0.5 < t_start_s=1.0"),
    (lambda: CallRecord(0.0, float("nan"), 1), "finite"),
    (lambda: CallRecord(0.0, 1.0, -2), "tokens=-2"),
    (lambda: CallRecord(0.0, 1.0, 1, retried_tokens=-1), "retried_tokens=-1"),
    (lambda: CallRecord(0.0, 1.0, 1, ok=False), "ok=False with error=None"),
    (lambda: CallRecord(0.0, 1.0, 1, ok=True, error="X"), "ok=True with error='X'"),
    (lambda: EventMark(0.0, "explode"), "'explode' is not one of"),
    (lambda: EventMark(float("inf"), "kill"), "not finite"),
    (lambda: summarize([]), "serving log is empty"),
    (lambda: summarize([ok(0, 1)], margin_s=-1), "margin_s=-1"),
    (lambda: percentile([1.0], 101), "q=101"),
    (lambda: ServingLog(capacity=0), "capacity=0"),
])
def test_bad_input_is_a_typed_error_naming_the_value(make, match):
    with pytest.raises(ServingStatsError, match=match) as info:
        make()
    assert isinstance(info.value, ElasticEPError) and isinstance(info.value, ValueError)


# -- invariants ------------------------------------------------------------------------------

times = st.floats(0, 10, allow_nan=False, allow_infinity=False)


@st.composite
def calls_st(draw, min_size=0):
    out = []
    for _ in range(draw(st.integers(min_size, 30))):
        t0, lat = draw(times), draw(st.floats(0, 1))
        good = draw(st.booleans()) or draw(st.booleans())
        out.append(CallRecord(t0, t0 + lat, draw(st.integers(0, 50)), ok=good, error=None if good else "E"))
    return out


@settings(max_examples=200, deadline=None)
@given(calls_st())
def test_longest_gap_is_at_least_every_gap(calls):
    gaps = completion_gaps(calls)
    g = longest_gap(calls)
    if len(gaps) == 0:
        assert g is None
    else:
        assert g.length_s >= 0 and all(g.length_s >= x for x in gaps) and g.length_s == gaps.max()


@settings(max_examples=100, deadline=None)
@given(times, st.integers(2, 20), st.floats(0, 1))
def test_calls_finishing_together_leave_no_gap(t_end, n, lat):
    assert longest_gap([ok(t_end - lat * i / n, t_end) for i in range(n)]).length_s == 0.0


@settings(max_examples=100, deadline=None)
@given(times, st.integers(2, 20), st.floats(0.001, 1))
def test_a_back_to_back_loop_has_gaps_equal_to_its_latency(t0, n, lat):
    calls = [ok(t0 + i * lat, t0 + (i + 1) * lat) for i in range(n)]
    assert np.allclose(completion_gaps(calls), lat)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(0, 1e3), min_size=1, max_size=50), st.floats(0, 100))
def test_percentiles_lie_within_min_and_max(values, q):
    p = percentile(values, q)
    assert min(values) <= p <= max(values)
    assert percentile(values, 50) <= percentile(values, 99)


@settings(max_examples=200, deadline=None)
@given(calls_st(min_size=1), times, st.lists(st.tuples(st.sampled_from(["detect", "commit"]), times), max_size=4))
@example([ok(9.0, 10.0), ok(0.0, 0.0)], 9.999999999999998, [])  # a kill one ulp before the log's last completion
def test_kill_gap_overlaps_its_window_and_is_bounded_by_the_longest_gap(calls, k, others):
    marks = [EventMark(k, "kill")] + [EventMark(t, kind) for kind, t in others]
    s = summarize(calls, marks)
    (kill,) = s.kills
    assert kill.window_end_s >= k and kill.gap.length_s >= 0
    assert kill.gap.start_s <= max(k, kill.window_end_s) and kill.gap.end_s >= k
    done = [c.t_end_s for c in calls if c.ok]
    if kill.recovered and kill.gap.start_s in done and kill.gap.end_s in done and s.longest_gap is not None:
        assert kill.gap.length_s <= s.longest_gap.length_s
    # the same length from the definition read pointwise: the gap around each moment t of (k, end)
    # runs from the last completion <= t (the kill itself if none) to the next one > t (the window's end if none)
    end = kill.window_end_s
    # (no completion lies strictly inside two successive points, so t in (a, b) reads as: last <= a, next >= b;
    # a float midpoint can round onto b)
    points = sorted({k, end, *[d for d in done if k < d < end]})
    spans = list(zip(points, points[1:]))
    ref = max((min([d for d in done if d >= b], default=end) - max([d for d in done if d <= a], default=k)
               for a, b in spans), default=0.0)
    if not spans and not kill.recovered:  # a kill at the log's very end: the open gap from the last completion
        ref = end - max([d for d in done if d <= k], default=k)
    assert kill.gap.length_s == pytest.approx(ref)
    assert kill.failed_calls <= kill.calls <= len(calls)
    assert s.ok_calls + s.failed_calls == s.calls == len(calls)
    if kill.latency_p50_s is not None:
        assert kill.latency_p50_s <= kill.latency_p99_s


@settings(max_examples=200, deadline=None)
@given(calls_st(min_size=1), st.lists(st.tuples(st.sampled_from(["kill", "commit"]), times), min_size=1, max_size=8))
def test_no_two_kills_report_one_gap(calls, events):
    marks = [EventMark(t, kind) for kind, t in events]
    s = summarize(calls, marks)
    own = {(k.t_kill_s, k.gap.start_s, k.gap.end_s) for k in s.kills if k.gap.length_s > 0}  # marks at one instant: one kill
    assert len(own) == len({(a, b) for _, a, b in own})
    kill_times = [m.t_s for m in marks if m.kind == "kill"]
    for k in s.kills:
        if k.in_gap_of is not None:  # it fell in the gap an earlier kill reports, which it does not report again
            owner = next(o for o in s.kills if o.t_kill_s == k.in_gap_of)
            assert owner.t_kill_s < k.t_kill_s and owner.gap.start_s <= k.t_kill_s < owner.gap.end_s
            assert k.gap.length_s == 0 or k.gap != owner.gap
        if k.gap.length_s > 0:
            assert k.kills_in_gap == sum(k.gap.start_s <= t <= k.gap.end_s for t in set(kill_times))


@settings(max_examples=200, deadline=None)
@given(calls_st(min_size=1), st.lists(times, min_size=2, max_size=6, unique=True))
def test_tokens_split_exactly_between_disjoint_windows_and_steady_state(calls, cuts):
    cuts = sorted(cuts)
    windows = list(zip(cuts[0::2], cuts[1::2]))  # disjoint
    lo, hi = min(c.t_start_s for c in calls), max(c.t_end_s for c in calls)
    inside = sum(tokens_per_s(calls, a, b) * (b - a) for a, b in windows)
    outside = sum(c.tokens for c in calls if c.ok and not any(a < c.t_end_s <= b for a, b in windows))
    assert inside + outside == pytest.approx(sum(c.tokens for c in calls if c.ok))
    for c in steady_calls(calls, windows):
        assert all(c.t_end_s < a or c.t_start_s > b for a, b in windows)
    marks = [EventMark(t, k) for (a, b) in windows for t, k in ((a, "rebalance_start"), (b, "rebalance_commit"))]
    s = summarize(calls, marks)
    assert len(s.rebalances) == len(windows) and all(r.committed for r in s.rebalances)
    covered = sum(min(b, hi) - max(a, lo) for a, b in windows if min(b, hi) > max(a, lo))
    if s.steady_tokens_per_s is not None:
        assert s.steady_tokens_per_s * ((hi - lo) - covered) == pytest.approx(outside)


def test_the_pure_modules_import_neither_ray_nor_torch():
    code = ("import sys\nimport elastic_ep.serving_stats, elastic_ep.degraded\n"
            "print(sorted(m for m in ('ray', 'torch') if m in sys.modules))")
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(root)})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
