"""elastic-ep's metrics as Prometheus scrapes them from a real local Ray's metrics endpoint.

A rebalance and a recovery after a SIGKILL run on a real cluster; the test then reads
Ray's Prometheus text over HTTP, parses it with prometheus_client's parser, and checks
the counters, gauges and histograms against the reports the cluster returned.
"""

from __future__ import annotations

import os
import signal
import socket
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
import ray
from prometheus_client.parser import text_string_to_metric_families

from elastic_ep.cluster import ElasticEPCluster
from elastic_ep.metrics import SECONDS_BOUNDARIES
from elastic_ep.testing import small_config

pytestmark = [pytest.mark.timeout(240)]

ROOT = Path(__file__).resolve().parents[2]
SCRAPE_WAIT_S = 60.0  # Ray exports every metrics_report_interval_ms (1 s here), its agent may start late


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def metrics_ray():
    """A local Ray whose metrics agent serves Prometheus text on a known port, exporting every second."""
    if ray.is_initialized():
        ray.shutdown()
    port = _free_port()
    ray.init(
        num_cpus=4, include_dashboard=False, namespace="elastic-ep-metrics-tests", log_to_driver=False,
        _temp_dir=tempfile.mkdtemp(prefix="eepm", dir="/tmp"), _metrics_export_port=port,
        _system_config={"metrics_report_interval_ms": 1000},
        runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT),
                                                                              os.environ.get("PYTHONPATH")]))}},
    )
    try:
        yield f"http://127.0.0.1:{port}/metrics"
    finally:
        ray.shutdown()


def scrape(url: str) -> dict[str, list]:
    """{sample name: [(labels, value)]} of every elastic-ep sample in one scrape."""
    with urllib.request.urlopen(url, timeout=10) as resp:
        text = resp.read().decode()
    out: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if "elastic_ep" in s.name:
                out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def value(samples: dict, name: str, **labels) -> float:
    """The one sample of ``name`` (Ray adds a ``ray_`` prefix) whose labels include ``labels``."""
    rows = samples.get(f"ray_{name}", []) + samples.get(name, [])
    hits = [v for lab, v in rows if all(lab.get(k) == str(want) for k, want in labels.items())]
    assert len(hits) == 1, f"{name} {labels}: {len(hits)} samples among {rows}"
    return hits[0]


def bucket(samples: dict, name: str, le: float, **labels) -> float:
    """The cumulative count of histogram ``name`` at upper bound ``le`` for ``labels``."""
    rows = samples.get(f"ray_{name}_bucket", [])
    hits = [v for lab, v in rows
            if float(lab["le"]) == le and all(lab.get(k) == str(want) for k, want in labels.items())]
    assert len(hits) == 1, f"{name} le={le} {labels}: {len(hits)} samples among {rows}"
    return hits[0]


def scrape_until(url: str, check) -> dict:
    """Scrape until ``check(samples)`` passes (exports lag the recording by up to an interval)."""
    deadline = time.monotonic() + SCRAPE_WAIT_S
    while True:
        samples = scrape(url)
        try:
            check(samples)
            return samples
        except (AssertionError, KeyError):
            if time.monotonic() > deadline:
                raise
            time.sleep(1.0)


def test_rebalance_and_recovery_show_up_in_the_scrape(metrics_ray, small_checkpoint, tmp_path, capsys):
    cfg = small_config(small_checkpoint, tmp_path)
    cluster = ElasticEPCluster(cfg)
    cluster.start(progress=True)  # bars drawn from the controller's progress while it loads
    assert "loading experts" in capsys.readouterr().err
    with cluster:
        tag = cluster.prefix
        cluster.run_workload(batches=8, tokens_per_batch=4096, zipf_s=1.5)
        rep = cluster.rebalance()
        assert not rep.noop and rep.bytes_p2p > 0

        def after_rebalance(s):
            assert value(s, "elastic_ep_reconfigurations_total", cluster=tag, reason="rebalance",
                         outcome="committed") == 1
            assert value(s, "elastic_ep_moved_bytes_total", cluster=tag, source="peer") == rep.bytes_p2p
            assert value(s, "elastic_ep_epoch", cluster=tag) == rep.epoch_to
            assert value(s, "elastic_ep_phase_seconds_count", cluster=tag, reason="rebalance", phase="plan") == 1

        s = scrape_until(metrics_ray, after_rebalance)
        assert value(s, "elastic_ep_rank_load_imbalance", cluster=tag) == pytest.approx(rep.balance["after"])
        assert value(s, "elastic_ep_ranks", cluster=tag) == 4
        assert value(s, "elastic_ep_spares_ready", cluster=tag) == 1
        assert value(s, "elastic_ep_dead_members", cluster=tag) == 0
        # The plan's seconds fall in the bucket of the first boundary at or above them (Ray's sums are only
        # bucket midpoints).
        plan_s = rep.phases["plan"]
        upper = min(b for b in SECONDS_BOUNDARIES if b >= plan_s)
        lower = [b for b in SECONDS_BOUNDARIES if b < plan_s]
        plan = dict(cluster=tag, reason="rebalance", phase="plan")
        assert bucket(s, "elastic_ep_phase_seconds", upper, **plan) == 1
        if lower:
            assert bucket(s, "elastic_ep_phase_seconds", max(lower), **plan) == 0

        # A worker killed the way the world kills it: the spare takes over, backups refill its slots.
        pid = ray.get(cluster.worker(1).ping.remote(), timeout=30).pid
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 90
        while not any(h["reason"] == "recover" for h in cluster.status()["history"]):
            assert time.monotonic() < deadline, "the kill was never recovered"
            time.sleep(0.1)
        status = cluster.wait_healthy(timeout_s=90)
        rec = next(h for h in reversed(status["history"]) if h["reason"] == "recover")

        def after_recovery(s):
            assert value(s, "elastic_ep_reconfigurations_total", cluster=tag, reason="recover",
                         outcome="committed") == 1
            assert value(s, "elastic_ep_epoch", cluster=tag) == status["epoch"]

        s = scrape_until(metrics_ray, after_recovery)
        assert value(s, "elastic_ep_dead_members", cluster=tag) == 0
        assert value(s, "elastic_ep_ranks", cluster=tag) == 4
        if rec["bytes_from_backup"]:
            assert value(s, "elastic_ep_moved_bytes_total", cluster=tag, source="backup") == rec["bytes_from_backup"]
        assert value(s, "elastic_ep_moved_bytes_total", cluster=tag, source="peer") == (
            rep.bytes_p2p + rec["bytes_p2p"])
