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


def test_chaos_writes_its_summary_to_a_file(tmp_path):
    target = tmp_path / "chaos.json"
    out = _run(["chaos", "--kills", "2", "--seed", "5", "--workdir", str(tmp_path / "work"), "--json", str(target)],
               tmp_path)
    summary = json.loads(target.read_text())
    assert target.with_suffix(".png").stat().st_size > 0  # the serving stream's timeline beside the JSON
    assert json.loads(out) == summary  # stdout is the summary alone: no Ray notice of a deliberate kill in it
    assert summary["ok"] is True
    assert summary["kills"] >= 2 and summary["kills_survived"] == summary["kills"]
    assert summary["hangs"] == 0 and summary["corrupted_slots"] == 0 and summary["lost_experts"] == 0


def test_bad_arguments_exit_with_usage(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, "-m", "elastic_ep.cli", "chaos", "--kills", "zero"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "invalid int value" in proc.stderr
