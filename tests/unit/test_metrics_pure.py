"""What a report, a membership and a serving call turn into as metric samples (no Ray)."""

from __future__ import annotations

import pytest

from dataclasses import replace

from elastic_ep.errors import CapacityError
from elastic_ep.metrics import (
    METRICS,
    failure_samples,
    membership_samples,
    reconfiguration_samples,
    serving_call_samples,
)
from elastic_ep.report import RebalanceReport


def _by_metric(samples):
    out = {}
    for s in samples:
        out.setdefault(s.metric, []).append((dict(s.tags), s.value))
    return out


REPORT = RebalanceReport(
    reason="recover", epoch_from=3, epoch_to=4, noop=False, total_s=0.25,
    phases={"detect": 0.01, "plan": 0.002, "transfer": 0.2},
    bytes_p2p=4096, bytes_from_backup=0, bytes_from_checkpoint=1024,
    balance={"before": 1.4, "after": 1.05},
)


def test_a_committed_recovery_counts_once_with_its_phases_bytes_and_balance():
    got = _by_metric(reconfiguration_samples("c1", REPORT))
    assert got["elastic_ep_reconfigurations_total"] == [
        ({"cluster": "c1", "reason": "recover", "outcome": "committed", "error": ""}, 1.0)]
    assert got["elastic_ep_reconfiguration_seconds"] == [({"cluster": "c1", "reason": "recover",
                                                           "outcome": "committed"}, 0.25)]
    phases = {tags["phase"]: v for tags, v in got["elastic_ep_phase_seconds"]}
    assert phases == REPORT.phases
    moved = {tags["source"]: v for tags, v in got["elastic_ep_moved_bytes_total"]}
    assert moved == {"peer": 4096.0, "checkpoint": 1024.0}  # zero backup bytes: no counter increment
    assert got["elastic_ep_rank_load_imbalance"] == [({"cluster": "c1"}, 1.05)]
    assert got["elastic_ep_epoch"] == [({"cluster": "c1"}, 4.0)]


def test_a_noop_is_its_own_outcome_and_moves_nothing():
    got = _by_metric(reconfiguration_samples("c1", replace(REPORT, noop=True, bytes_p2p=0,
                                                                      bytes_from_checkpoint=0)))
    assert got["elastic_ep_reconfigurations_total"][0][0]["outcome"] == "noop"
    assert "elastic_ep_moved_bytes_total" not in got


def test_a_failure_names_its_error_class():
    got = _by_metric(failure_samples("c1", "shrink", CapacityError("too few slots"), 0.5))
    assert got["elastic_ep_reconfigurations_total"] == [
        ({"cluster": "c1", "reason": "shrink", "outcome": "failed", "error": "CapacityError"}, 1.0)]
    assert got["elastic_ep_reconfiguration_seconds"][0][1] == 0.5
    assert _by_metric(failure_samples("c1", "recover", "TransferError"))["elastic_ep_reconfigurations_total"][0][0][
        "error"] == "TransferError"


def test_membership_counts_dead_members_and_live_spares():
    got = _by_metric(membership_samples("c1", 7, {0: "w0", 1: "w1", 2: "w2"}, ["w4", "w5"], {"w1", "w5", "w9"}))
    assert got == {
        "elastic_ep_epoch": [({"cluster": "c1"}, 7.0)],
        "elastic_ep_ranks": [({"cluster": "c1"}, 3.0)],
        "elastic_ep_dead_members": [({"cluster": "c1"}, 1.0)],
        "elastic_ep_spares_ready": [({"cluster": "c1"}, 1.0)],
    }


def test_serving_calls_count_tokens_or_failures():
    ok = _by_metric(serving_call_samples("c1", 0.03, tokens=128))
    assert ok == {"elastic_ep_call_seconds": [({"cluster": "c1", "outcome": "ok"}, 0.03)],
                  "elastic_ep_tokens_served_total": [({"cluster": "c1"}, 128.0)]}
    bad = _by_metric(serving_call_samples("c1", 1.5, error=TimeoutError("slow")))
    assert bad == {"elastic_ep_call_seconds": [({"cluster": "c1", "outcome": "failed"}, 1.5)],
                   "elastic_ep_failed_calls_total": [({"cluster": "c1", "error": "TimeoutError"}, 1.0)]}
    with pytest.raises(ValueError, match="latency_s"):
        serving_call_samples("c1", -1.0)


def test_every_sample_names_a_defined_metric_with_exactly_its_tags():
    samples = (reconfiguration_samples("c", REPORT) + failure_samples("c", "grow", "X", 1.0)
               + membership_samples("c", 1, {0: "w0"}, [], set())
               + serving_call_samples("c", 0.1, 5) + serving_call_samples("c", 0.1, error=ValueError()))
    for s in samples:
        assert tuple(k for k, _ in s.tags) == ("cluster",) + METRICS[s.metric].tags, s
