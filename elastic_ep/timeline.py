"""Recovery timeline PNG: served tokens/s and per-call latency over time, with kill/detect/commit marks and the serving gap shaded.

One figure shows the whole stream (``write_timeline``); a long soak is better
drawn as one cropped figure per kill (``write_recovery_timelines``), each
spanning the kill window padded on both sides. Gaps, windows and steady-state
numbers come from ``serving_stats.summarize`` over the whole stream, so a
cropped figure shows the same numbers as the JSON summary.

Top panel: tokens of successful calls per second, binned by completion time
(bin width ``bin_s``, default the larger of span/240 and 8 median completion
gaps, so a steady stream reads as a flat line), with the steady level dashed.
Bottom panel: each call's latency at its completion time; calls served with
retried or degraded tokens are orange diamonds, failed calls red crosses. Kill
gaps are shaded red and labelled with their length (the longest in bold, an
unrecovered kill's open gap marked so), rebalance windows purple with their mean
throughput drawn against the steady line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence, Union

import matplotlib

matplotlib.use("Agg")  # files only, never a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .serving_stats import (  # noqa: E402
    CallRecord, EventMark, Gap, ServingLog, ServingStatsError, ServingSummary, completion_gaps, summarize,
)

MAX_LABELLED_KILLS = 12  # beyond this many kills in one figure, kill marks are drawn thin and unlabelled

MARK_STYLE = {  # kind -> (colour, line style, legend text)
    "kill": ("#d62728", "-", "kill"),
    "detect": ("#ff7f0e", "--", "death detected"),
    "commit": ("#2ca02c", "-.", "recovery committed"),
    "rebalance_start": ("#9467bd", ":", "rebalance start"),
    "rebalance_commit": ("#9467bd", "-.", "rebalance commit"),
}


def _inputs(log_or_records, marks) -> tuple[list[CallRecord], list[EventMark]]:
    if isinstance(log_or_records, ServingLog):
        calls, logged = log_or_records.snapshot()
        marks = logged if marks is None else marks
    else:
        calls = log_or_records
    calls = list(calls)
    if not calls:
        raise ServingStatsError("no calls to draw: the serving log is empty")
    return calls, list(marks or ())


def _default_bin_s(calls: Sequence[CallRecord], span_s: float) -> float:
    gaps = completion_gaps(calls)
    typical = float(np.median(gaps)) if len(gaps) else 0.0
    return max(span_s / 240, 8 * typical, 1e-3)


def _shade_gap(axes, gap: Gap, t0: float, text: Optional[str], strong: bool) -> None:
    for ax in axes:
        ax.axvspan(gap.start_s - t0, gap.end_s - t0, color="#d62728", alpha=0.28 if strong else 0.14, lw=0, zorder=0)
    if text:
        top = axes[0]
        lo, hi = top.get_xlim()
        mid = (gap.start_s + gap.end_s) / 2 - t0
        right = mid < lo + 0.6 * (hi - lo)  # label on the side with room, never past the frame
        top.annotate(text, xy=(mid, 0.5), xycoords=("data", "axes fraction"), xytext=(8 if right else -8, 0),
                     textcoords="offset points", ha="left" if right else "right", va="center", fontsize=11,
                     fontweight="bold" if strong else "normal", color="#a01010",
                     bbox=dict(boxstyle="round,pad=0.25", fc="white", ec="#d62728", alpha=0.9))


def _draw(calls, marks, path: Path, title: str, bin_s: Optional[float], window: Optional[tuple[float, float]],
          s: ServingSummary) -> Path:
    t0 = s.t0_s
    lo, hi = window if window is not None else (t0, t0 + s.span_s)
    shown = [c for c in calls if c.t_end_s >= lo and c.t_start_s <= hi] or calls
    bin_s = bin_s or _default_bin_s(shown, hi - lo)
    fig, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(13.5, 7), height_ratios=(1, 1.15), constrained_layout=True)

    # Step 1: throughput, binned by completion time
    # whole bins on a grid anchored at the stream's start (a cropped figure bins like the full one); the view clips them
    first = t0 + np.floor((lo - t0) / bin_s) * bin_s
    edges = np.arange(first, hi + bin_s, bin_s)
    done = [c for c in calls if c.ok]
    tok, _ = np.histogram([c.t_end_s for c in done], bins=edges, weights=[c.tokens for c in done])
    rate = tok / bin_s
    top.stairs(rate, edges - t0, color="#1f77b4", lw=1.4, fill=True, alpha=0.35)
    top.stairs(rate, edges - t0, color="#1f77b4", lw=1.4, label=f"served tokens/s ({bin_s * 1e3:.0f} ms bins)")
    if s.steady_tokens_per_s:
        top.axhline(s.steady_tokens_per_s, color="0.35", ls="--", lw=1, label=f"steady {s.steady_tokens_per_s:,.0f} tokens/s")
    top.set_ylabel("served tokens / s")
    top.set_ylim(0, max(rate.max(), s.steady_tokens_per_s or 0) * 1.3 or 1)

    # Step 2: latency of each call at its completion; failures stand out
    helped = lambda c: bool(c.retried_tokens or c.degraded_tokens)  # noqa: E731
    kinds = [  # (which calls, legend text, marker style)
        ([c for c in shown if c.ok and not helped(c)], "served call", dict(s=7, color="#1f77b4", alpha=0.6, lw=0)),
        ([c for c in shown if c.ok and helped(c)], "served with retried/degraded tokens",
         dict(s=45, color="#ff7f0e", marker="D", edgecolors="k", lw=0.6)),
        ([c for c in shown if not c.ok], "failed call", dict(s=40, color="#d62728", marker="x", lw=1.5)),
    ]
    for group, text, style in kinds:
        if group or text == "served call":
            label = text if text == "served call" else f"{text} ({len(group)})"
            bottom.scatter([c.t_end_s - t0 for c in group], [c.latency_s * 1e3 for c in group], label=label, **style)
    lat = [c.latency_s * 1e3 for c in shown if c.latency_s > 0]
    if lat and max(lat) / min(lat) > 20:
        bottom.set_yscale("log")
        bottom.set_ylim(min(lat) / 1.5, max(lat) * 2)  # headroom: the slowest call never sits on the frame
    bottom.set_ylabel("call latency (ms)")
    bottom.set_xlabel("time since the stream started (s); latency drawn at each call's completion")

    # Step 3: gaps and rebalance windows, then the marks on top
    top.set_xlim(lo - t0, hi - t0)
    gaps = {(k.gap.start_s, k.gap.end_s): (k.gap, not k.recovered) for k in s.kills if k.gap.length_s > 0}
    if s.longest_gap is not None:
        gaps.setdefault((s.longest_gap.start_s, s.longest_gap.end_s), (s.longest_gap, False))
    longest = max((g for g, _ in gaps.values()), key=lambda g: g.length_s, default=None)
    for g, is_open in gaps.values():
        if g.end_s >= lo and g.start_s <= hi:
            strong = g is longest
            label = f"{'longest gap' if strong else 'gap'} {g.length_s * 1e3:.0f} ms" + (" (not recovered)" if is_open else "")
            _shade_gap((top, bottom), g, t0, label if strong or len(gaps) <= 6 else None, strong)
    seen: set[str] = set()  # legend entries already given
    for r in s.rebalances:
        if r.t_end_s >= lo and r.t_start_s <= hi:
            for ax in (top, bottom):
                ax.axvspan(r.t_start_s - t0, r.t_end_s - t0, color="#9467bd", alpha=0.12, lw=0, zorder=0)
            ratio = "" if r.ratio_to_steady is None else f"{100 * r.ratio_to_steady:.0f}% of steady"
            if r.tokens_per_s is not None:  # the window's mean throughput, to read against the steady line
                top.hlines(r.tokens_per_s, r.t_start_s - t0, r.t_end_s - t0, color="#5b3a8c", lw=2.2,
                           label=None if "rebalance mean" in seen else "rebalance mean tokens/s")
                seen.add("rebalance mean")
            top.annotate(f"rebalance\n{ratio}", xy=((r.t_start_s + r.t_end_s) / 2 - t0, 0.06), xycoords=("data", "axes fraction"),
                         ha="center", va="bottom", fontsize=9, color="#5b3a8c",
                         bbox=dict(boxstyle="round,pad=0.2", fc="white", ec="none", alpha=0.8))
    shown = [m for m in marks if lo <= m.t_s <= hi]
    crowded = sum(m.kind == "kill" for m in shown) > MAX_LABELLED_KILLS  # a long soak: thin marks, no kill labels
    for m in shown:
        colour, ls, text = MARK_STYLE[m.kind]
        for ax in (top, bottom):
            ax.axvline(m.t_s - t0, color=colour, ls=ls, lw=0.5 if crowded else 1.6, alpha=0.5 if crowded else 1.0,
                       label=None if m.kind in seen or ax is top else text)
        seen.add(m.kind)
        if m.kind == "kill" and m.label and not crowded:
            top.annotate(m.label, xy=(m.t_s - t0, 1.0), xycoords=("data", "axes fraction"), xytext=(0, 3),
                         textcoords="offset points", ha="center", va="bottom", fontsize=9, color=colour)
    for ax in (top, bottom):  # legends beside the plots, never over the data
        ax.legend(loc="upper left", bbox_to_anchor=(1.005, 1.0), fontsize=8, framealpha=0.9)
    for ax in (top, bottom):
        ax.grid(alpha=0.3)

    gap_txt = "-" if longest is None else f"{longest.length_s * 1e3:.0f} ms"
    p50 = "-" if s.steady_p50_s is None else f"{s.steady_p50_s * 1e3:.1f}"
    p99 = "-" if s.steady_p99_s is None else f"{s.steady_p99_s * 1e3:.1f}"
    fig.suptitle(f"{title}\nlongest serving gap {gap_txt} · steady latency p50 {p50} ms, p99 {p99} ms · "
                 f"{s.failed_calls} failed, {s.wrong_calls} wrong of {s.calls} calls", fontsize=12)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_timeline(log_or_records: Union[ServingLog, Sequence[CallRecord]], marks: Optional[Sequence[EventMark]],
                   path: Union[str, Path], *, title: str = "Serving through faults", bin_s: Optional[float] = None,
                   window: Optional[tuple[float, float]] = None, margin_s: float = 0.0) -> Path:
    """Draw the stream (all of it, or ``window`` = (t_from_s, t_to_s) on the log's clock) as a PNG at ``path``.

    marks: None takes the log's own marks (a ServingLog) or none (records).
    """
    calls, marks = _inputs(log_or_records, marks)
    if window is not None and not window[1] > window[0]:
        raise ServingStatsError(f"window {window} must run forwards in time")
    return _draw(calls, marks, Path(path), title, bin_s, window, summarize(calls, marks, margin_s=margin_s))


def write_recovery_timelines(log_or_records: Union[ServingLog, Sequence[CallRecord]], marks: Optional[Sequence[EventMark]],
                             folder: Union[str, Path], *, pad_s: float = 0.5, title: str = "Recovery",
                             max_figures: int = 20, bin_s: Optional[float] = None) -> list[Path]:
    """One PNG per kill (the first ``max_figures``): ``folder/recovery-000.png``, ... cropped to the kill window +- pad_s."""
    calls, marks = _inputs(log_or_records, marks)
    summary = summarize(calls, marks)
    kills = summary.kills[:max_figures]
    out = []
    for i, k in enumerate(kills):
        window = (k.t_kill_s - pad_s, k.window_end_s + pad_s)
        name = f"{title} {i + 1} of {len(kills)}" + (f" ({k.label})" if k.label else "")
        out.append(_draw(calls, marks, Path(folder) / f"recovery-{i:03d}.png", name, bin_s, window, summary))
    return out
