"""A seeded random schedule of kills over every phase, on one cluster, through ``run_chaos``."""

import pytest

from elastic_ep.chaos import SCENARIOS, run_chaos, schedule

pytestmark = pytest.mark.timeout(300)

SEED = 2024
KILLS = 14  # with test_faults.py (21 kills) and test_node_loss.py, over 30 kills per CI run


def test_schedule_is_seeded_and_covers_every_scenario():
    assert schedule(SEED, KILLS) == schedule(SEED, KILLS)
    assert schedule(SEED, KILLS) != schedule(SEED + 1, KILLS)
    names = schedule(0, sum(SCENARIOS.values()))
    assert sorted(names) == sorted(SCENARIOS)  # one full round holds each scenario once
    assert sum(SCENARIOS[n] for n in schedule(SEED, KILLS)) >= KILLS


def test_random_kills_are_survived(ray_local, tmp_path):
    out = run_chaos(kills=KILLS, seed=SEED, workdir=str(tmp_path), progress=False)
    assert out["ok"], out["failures"]
    assert out["kills"] >= KILLS and out["kills_survived"] == out["kills"]
    assert out["hangs"] == 0 and out["corrupted_slots"] == 0 and out["lost_experts"] == 0
    assert out["recovery_s"]["max"] is not None and out["recovery_s"]["p50"] <= out["recovery_s"]["max"]
    assert out["epochs"][1] > out["epochs"][0]
