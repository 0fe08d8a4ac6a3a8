"""Prometheus metrics of a cluster through ray.util.metrics, exported by Ray's own metrics endpoint.

Every metric carries a ``cluster`` tag (the cluster's actor prefix, ``<name>-<id>``).
Ray's exporter prefixes each name with ``ray_``: ``elastic_ep_epoch`` is scraped as
``ray_elastic_ep_epoch``.

    elastic_ep_reconfigurations_total   counter    reason, outcome (committed | noop | failed), error
    elastic_ep_reconfiguration_seconds  histogram  reason, outcome: first attempt to commit (or failure)
    elastic_ep_phase_seconds            histogram  reason, phase (detect, decide, plan, ... replenish)
    elastic_ep_moved_bytes_total        counter    source (peer | backup | checkpoint)
    elastic_ep_rank_load_imbalance      gauge      max/mean rank load, mean over layers (1.0 = even)
    elastic_ep_epoch                    gauge      layout epoch in force
    elastic_ep_ranks                    gauge      ranks in the membership
    elastic_ep_dead_members             gauge      members whose worker is dead and not yet replaced
    elastic_ep_spares_ready             gauge      live hot spares
    elastic_ep_tokens_served_total      counter    tokens a serving call answered
    elastic_ep_call_seconds             histogram  outcome (ok | failed): latency of one serving call
    elastic_ep_failed_calls_total       counter    error (exception class name)

Which values a report or a membership turns into is decided by pure functions
(``reconfiguration_samples``, ``membership_samples``, ``serving_call_samples``) that
return ``Sample`` data; ``record_*`` apply them to the Ray metrics of this process.
Recording never raises: a metrics failure must not fail a reconfiguration.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Optional, Union

if TYPE_CHECKING:
    from .report import RebalanceReport

log = logging.getLogger("elastic_ep.metrics")

# Seconds: 1 ms .. 10 min. Phases of a GPU recovery sit in the ms; restarts and disk reads in seconds.
SECONDS_BOUNDARIES = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                      120.0, 600.0]
BYTE_SOURCES = {"bytes_p2p": "peer", "bytes_from_backup": "backup", "bytes_from_checkpoint": "checkpoint"}


@dataclass(frozen=True)
class MetricDef:
    """One metric: its Ray kind, help text and tag keys (``cluster`` is always the first)."""

    kind: str  # counter | gauge | histogram
    help: str
    tags: tuple[str, ...] = ()


METRICS: dict[str, MetricDef] = {
    "elastic_ep_reconfigurations_total": MetricDef(
        "counter", "Reconfigurations (rebalance, recover, grow, shrink, drain) by reason and outcome",
        ("reason", "outcome", "error")),
    "elastic_ep_reconfiguration_seconds": MetricDef(
        "histogram", "Seconds from a reconfiguration's first attempt to its commit or failure", ("reason", "outcome")),
    "elastic_ep_phase_seconds": MetricDef("histogram", "Seconds spent in one phase of a reconfiguration",
                                          ("reason", "phase")),
    "elastic_ep_moved_bytes_total": MetricDef("counter", "Expert bytes moved into new slots, by where they came from",
                                              ("source",)),
    "elastic_ep_rank_load_imbalance": MetricDef("gauge", "Max over mean rank load, mean over layers (1.0 is even)"),
    "elastic_ep_epoch": MetricDef("gauge", "Epoch of the layout in force"),
    "elastic_ep_ranks": MetricDef("gauge", "Ranks in the membership"),
    "elastic_ep_dead_members": MetricDef("gauge", "Members whose worker is dead and not yet replaced"),
    "elastic_ep_spares_ready": MetricDef("gauge", "Live hot spares"),
    "elastic_ep_tokens_served_total": MetricDef("counter", "Tokens answered by serving calls"),
    "elastic_ep_call_seconds": MetricDef("histogram", "Latency of one serving call", ("outcome",)),
    "elastic_ep_failed_calls_total": MetricDef("counter", "Serving calls that failed, by error", ("error",)),
}


@dataclass(frozen=True)
class Sample:
    """One update: add to a counter, set a gauge, or observe a histogram value."""

    metric: str
    value: float
    tags: tuple[tuple[str, str], ...]  # (key, value) pairs, cluster first


def _tags(cluster: str, **tags: str) -> tuple[tuple[str, str], ...]:
    return (("cluster", str(cluster)),) + tuple((k, str(v)) for k, v in tags.items())


# -- pure: what to record --------------------------------------------------------------------


def reconfiguration_samples(cluster: str, report: "RebalanceReport") -> list[Sample]:
    """The updates one finished reconfiguration makes (an ``elastic_ep.report.RebalanceReport``)."""
    reason = report.reason
    outcome = "noop" if report.noop else "committed"
    out = [
        Sample("elastic_ep_reconfigurations_total", 1.0, _tags(cluster, reason=reason, outcome=outcome, error="")),
        Sample("elastic_ep_reconfiguration_seconds", float(report.total_s),
               _tags(cluster, reason=reason, outcome=outcome)),
    ]
    for phase, seconds in sorted(report.phases.items()):
        out.append(Sample("elastic_ep_phase_seconds", float(seconds), _tags(cluster, reason=reason, phase=phase)))
    for key, source in BYTE_SOURCES.items():
        moved = int(getattr(report, key) or 0)
        if moved > 0:  # a Ray counter only takes positive increments
            out.append(Sample("elastic_ep_moved_bytes_total", float(moved), _tags(cluster, source=source)))
    after = report.balance.get("after")
    if after is not None:
        out.append(Sample("elastic_ep_rank_load_imbalance", float(after), _tags(cluster)))
    if report.epoch_to is not None:
        out.append(Sample("elastic_ep_epoch", float(report.epoch_to), _tags(cluster)))
    return out


def failure_samples(cluster: str, reason: str, error: Union[BaseException, str],
                    elapsed_s: Optional[float] = None) -> list[Sample]:
    """The updates a reconfiguration that gave up makes (the previous layout stays in force).

    ``error``: the exception, or its class name.
    """
    name = error if isinstance(error, str) else type(error).__name__
    tags = _tags(cluster, reason=reason, outcome="failed", error=name)
    out = [Sample("elastic_ep_reconfigurations_total", 1.0, tags)]
    if elapsed_s is not None:
        out.append(Sample("elastic_ep_reconfiguration_seconds", float(elapsed_s),
                          _tags(cluster, reason=reason, outcome="failed")))
    return out


def membership_samples(cluster: str, epoch: int, members: dict, spares: Iterable[str],
                       dead: Iterable[str]) -> list[Sample]:
    """Gauges of the membership: members {rank: worker id}, spares [worker id], dead {worker id}."""
    dead = set(dead)
    return [
        Sample("elastic_ep_epoch", float(epoch), _tags(cluster)),
        Sample("elastic_ep_ranks", float(len(members)), _tags(cluster)),
        Sample("elastic_ep_dead_members", float(sum(w in dead for w in members.values())), _tags(cluster)),
        Sample("elastic_ep_spares_ready", float(sum(w not in dead for w in spares)), _tags(cluster)),
    ]


def serving_call_samples(cluster: str, latency_s: float, tokens: int = 0,
                         error: Optional[BaseException] = None) -> list[Sample]:
    """The updates one serving call makes: its latency, the tokens it answered, or its failure."""
    if latency_s < 0 or tokens < 0:
        raise ValueError(f"a serving call needs latency_s >= 0 and tokens >= 0, got {latency_s!r}, {tokens!r}")
    outcome = "ok" if error is None else "failed"
    out = [Sample("elastic_ep_call_seconds", float(latency_s), _tags(cluster, outcome=outcome))]
    if error is not None:
        out.append(Sample("elastic_ep_failed_calls_total", 1.0, _tags(cluster, error=type(error).__name__)))
    elif tokens > 0:
        out.append(Sample("elastic_ep_tokens_served_total", float(tokens), _tags(cluster)))
    return out


# -- applying samples to Ray's metrics -------------------------------------------------------

_made: dict = {}  # metric name -> ray.util.metrics object, one per process


def _metric(name: str):
    if name not in _made:
        from ray.util import metrics as rm

        d = METRICS[name]
        keys = ("cluster",) + d.tags
        if d.kind == "counter":
            _made[name] = rm.Counter(name, description=d.help, tag_keys=keys)
        elif d.kind == "gauge":
            _made[name] = rm.Gauge(name, description=d.help, tag_keys=keys)
        else:
            _made[name] = rm.Histogram(name, description=d.help, boundaries=SECONDS_BOUNDARIES, tag_keys=keys)
    return _made[name]


def apply(samples: Iterable[Sample]) -> int:
    """Record samples in this process's Ray metrics; returns how many were recorded. Never raises."""
    done = 0
    for s in samples:
        try:
            metric, tags = _metric(s.metric), dict(s.tags)
            kind = METRICS[s.metric].kind
            if kind == "counter":
                metric.inc(s.value, tags=tags)
            elif kind == "gauge":
                metric.set(s.value, tags=tags)
            else:
                metric.observe(s.value, tags=tags)
            done += 1
        except Exception as exc:  # noqa: BLE001  metrics must never break the cluster
            log.debug("metric %s not recorded: %s: %s", s.metric, type(exc).__name__, exc)
    return done


def record_reconfiguration(cluster: str, report: "RebalanceReport") -> int:
    """Record a finished reconfiguration (controller: after it commits or finds nothing to move)."""
    return apply(reconfiguration_samples(cluster, report))


def record_failure(cluster: str, reason: str, error: Union[BaseException, str],
                   elapsed_s: Optional[float] = None) -> int:
    """Record a reconfiguration that gave up (controller: where it raises)."""
    return apply(failure_samples(cluster, reason, error, elapsed_s))


def record_membership(cluster: str, epoch: int, members: dict, spares: Iterable[str], dead: Iterable[str]) -> int:
    """Record epoch, ranks, dead members and spares ready (controller: whenever it saves its state)."""
    return apply(membership_samples(cluster, epoch, members, spares, dead))


def record_serving_call(cluster: str, latency_s: float, tokens: int = 0,
                        error: Optional[BaseException] = None) -> int:
    """Record one serving call (the serving path: once per call, failed or not)."""
    return apply(serving_call_samples(cluster, latency_s, tokens, error))
