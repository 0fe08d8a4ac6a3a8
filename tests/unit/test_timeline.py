"""Timeline PNGs: drawn from a realistic synthetic stream (a kill, a rebalance), valid and readable; empty input refused."""

import numpy as np
import pytest
from matplotlib import image

from elastic_ep.serving_stats import CallRecord, EventMark, ServingLog, ServingStatsError, summarize
from elastic_ep.timeline import write_recovery_timelines, write_timeline

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def synthetic_stream(seed=0, failed_after_kill=0):
    """Steady 200 calls/s of 128 tokens for 6 s; kill at 2 s holds the in-flight call 150 ms (commit 2.2 s);
    a rebalance 4.0..4.5 s slows calls by 5%. Returns (log, marks)."""
    rng = np.random.default_rng(seed)
    log = ServingLog()
    t, held = 0.0, False
    while t < 6.0:
        lat = 0.005 * rng.lognormal(0.0, 0.08)
        if 4.0 <= t < 4.5:
            lat /= 0.95
        if not held and t + lat >= 2.0:
            held, lat = True, 2.0 - t + 0.15  # in flight at the kill: waits for the retry on a surviving replica
            for i in range(failed_after_kill):
                log.record(CallRecord(2.001 + i * 1e-3, 2.02 + i * 1e-3, 128, ok=False, error="PeerDiedError"))
        log.record(CallRecord(t, t + lat, 128, epoch=1 if t > 2.2 else 0, retried_tokens=40 if lat > 0.1 else 0))
        t += lat
    for t_s, kind, label in [(2.0, "kill", "rank 3"), (2.02, "detect", ""), (2.2, "commit", "epoch 1"),
                             (4.0, "rebalance_start", ""), (4.5, "rebalance_commit", "")]:
        log.mark(kind, label, t_s=t_s)
    return log


def _check_png(path, min_kib=20):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert min_kib * 1024 < len(data) < 3 * 1024 * 1024
    img = image.imread(path)
    assert img.shape[0] >= 600 and img.shape[1] >= 1000
    return img


def _has_colour(img, rgb, tol=0.06):
    return bool((np.abs(img[..., :3] - np.array(rgb)).max(axis=-1) < tol).any())


def test_the_synthetic_stream_has_the_gap_it_claims():
    s = summarize(*synthetic_stream().snapshot())
    (kill,) = s.kills
    assert 0.15 <= kill.gap.length_s <= 0.16 and s.longest_gap == kill.gap
    assert kill.commit_after_s == pytest.approx(0.2) and kill.recovered
    (r,) = s.rebalances
    assert 0.9 < r.ratio_to_steady < 1.0


def test_write_timeline_draws_a_readable_png(tmp_path):
    log = synthetic_stream()
    path = write_timeline(log, None, tmp_path / "timeline.png", title="Kill of rank 3 at t=2 s, rebalance at t=4 s")
    assert path == tmp_path / "timeline.png"
    img = _check_png(path)
    assert _has_colour(img, (0.839, 0.153, 0.157))  # the kill line's red
    assert _has_colour(img, (0.173, 0.627, 0.173))  # the commit line's green


def test_failed_calls_are_drawn_and_records_work_without_a_log(tmp_path):
    calls, marks = synthetic_stream(seed=1, failed_after_kill=3).snapshot()
    path = write_timeline(list(calls), list(marks), tmp_path / "sub" / "t.png", bin_s=0.05)
    _check_png(path)
    assert summarize(calls, marks).failed_calls == 3


def test_one_cropped_figure_per_kill(tmp_path):
    paths = write_recovery_timelines(synthetic_stream(), None, tmp_path, pad_s=0.3)
    assert [p.name for p in paths] == ["recovery-000.png"]
    _check_png(paths[0])


def test_empty_input_and_a_backward_window_are_refused(tmp_path):
    with pytest.raises(ServingStatsError, match="serving log is empty"):
        write_timeline([], [], tmp_path / "x.png")
    with pytest.raises(ServingStatsError, match="serving log is empty"):
        write_timeline(ServingLog(), None, tmp_path / "x.png")
    with pytest.raises(ServingStatsError, match=r"window \(2.0, 1.0\) must run forwards"):
        write_timeline([CallRecord(0, 1, 1)], [], tmp_path / "x.png", window=(2.0, 1.0))
    assert not (tmp_path / "x.png").exists()


def test_an_unrecovered_kill_is_drawn_as_an_open_gap(tmp_path):
    calls, marks = synthetic_stream(seed=2).snapshot()
    calls = [c for c in calls if c.t_end_s < 5.0]
    calls += [CallRecord(5.0 + 0.05 * i, 5.04 + 0.05 * i, 128, ok=False, error="ExpertsLostError") for i in range(10)]
    marks = list(marks) + [EventMark(5.0, "kill", "rank 0 (last copy)")]
    s = summarize(calls, marks)
    assert not s.kills[1].recovered and s.kills[1].gap.end_s == pytest.approx(5.49)
    img = _check_png(write_timeline(calls, marks, tmp_path / "open.png", title="Second kill loses the last copy"))
    assert _has_colour(img, (0.839, 0.153, 0.157))


def test_a_long_soak_draws_kill_marks_thin_and_unlabelled(tmp_path, monkeypatch):
    """Beyond MAX_LABELLED_KILLS kills in one figure, kill labels would overlap into an unreadable band: none is drawn."""
    from matplotlib.axes import Axes

    from elastic_ep.timeline import MAX_LABELLED_KILLS

    texts = []
    original = Axes.annotate
    monkeypatch.setattr(Axes, "annotate", lambda self, text, *a, **k: (texts.append(text), original(self, text, *a, **k))[1])
    few = synthetic_stream()
    write_timeline(few, None, tmp_path / "few.png", title="one kill")
    assert "rank 3" in texts
    texts.clear()
    many = ServingLog()
    for i in range(400):  # 20 s of calls, a kill every 0.5 s after the first second
        many.record(CallRecord(i * 0.05, i * 0.05 + 0.01, 64))
    for k in range(MAX_LABELLED_KILLS + 20):
        many.mark("kill", f"rank {k}", t_s=1.0 + 0.5 * k)
        many.mark("commit", "", t_s=1.2 + 0.5 * k)
    _check_png(write_timeline(many, None, tmp_path / "many.png", title="soak"))
    assert not any(str(t).startswith("rank ") for t in texts)
