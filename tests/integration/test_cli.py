"""The console entry point as users run it, in its own process: the demo and a short chaos run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

ROOT = Path(__file__).resolve().parents[2]


def _run(args, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, "-m", "elastic_ep.cli", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=260)
    assert proc.returncode == 0, f"exit {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr[-4000:]}"
    return proc.stdout


# The demo's every step (checkpoint, start, serve, rebalance, SIGKILL under a serving stream, verify) on a
# smaller model and workload than its defaults (12 layers x 64 experts, 20 slots a rank, 8 x 256 tokens,
# 1.5 s of steady serving around each event): the same code path, a fraction of the CI time.
SMALL_DEMO = ["--layers", "3", "--experts", "16", "--slots", "6", "--batches", "2", "--tokens", "64",
              "--steady-s", "0.5"]


def test_demo_verifies_every_slot(tmp_path):
    out = _run(["demo", *SMALL_DEMO, "--workdir", str(tmp_path / "work")], tmp_path)
    assert "all slots verified" in out and "FAILED" not in out
    assert " 0 wrong outputs of " in out and "tokens served" in out  # the demo serves, checked on a sample


def test_chaos_survives_its_seeded_schedule_and_writes_its_summary_to_a_file(tmp_path):
    """The seeded schedule of tests/unit/test_chaos_schedule.py (deaths that overlap: a spare killed while it takes over,
    the controller mid-rebalance, a rank during another's recovery) on one cluster, with a serving stream throughout."""
    from tests.unit.test_chaos_schedule import KILLS, SEED

    target = tmp_path / "chaos.json"
    out = _run(["chaos", "--kills", str(KILLS), "--seed", str(SEED), "--workdir", str(tmp_path / "work"),
                "--json", str(target)], tmp_path)
    summary = json.loads(target.read_text())
    assert target.with_suffix(".png").stat().st_size > 0  # the serving stream's timeline beside the JSON
    assert json.loads(out) == summary  # stdout is the summary alone: no Ray notice of a deliberate kill in it
    assert summary["ok"] is True, summary["failures"]
    assert summary["kills"] >= KILLS and summary["kills_survived"] == summary["kills"]
    assert summary["hangs"] == 0 and summary["corrupted_slots"] == 0 and summary["lost_experts"] == 0
    assert summary["recovery_s"]["max"] is not None and summary["recovery_s"]["p50"] <= summary["recovery_s"]["max"]
    assert summary["epochs"][1] > summary["epochs"][0]
    served = summary["serving"]
    assert served["calls"] > 0 and served["wrong_outputs"] == 0 and served["checked_calls"] == served["calls"]
    assert served["failed_calls"] == 0  # the checkpoint and backups remain: every token is served in the end


def test_bad_arguments_exit_with_usage(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, "-m", "elastic_ep.cli", "chaos", "--kills", "zero"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "invalid int value" in proc.stderr
