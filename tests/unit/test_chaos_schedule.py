"""A seeded random schedule of kills over every phase, on one cluster, through ``run_chaos``."""

import pytest

from elastic_ep.chaos import SCENARIOS, run_chaos, schedule

pytestmark = pytest.mark.timeout(300)

# test_faults.py runs every scenario of SCENARIOS once on its own (21 kills); this run checks that
# run_chaos chains scenarios on one cluster with a serving stream throughout, picking the ones where
# deaths overlap: a spare killed while it takes over a dead rank, the controller killed mid-rebalance,
# and a rank killed while the recovery from another runs (5 kills). SEED and KILLS pick that schedule.
SEED = 100
KILLS = 4


def test_schedule_is_seeded_and_covers_every_scenario():
    assert schedule(SEED, KILLS) == schedule(SEED, KILLS)
    assert schedule(SEED, KILLS) != schedule(SEED + 1, KILLS)
    names = schedule(0, sum(SCENARIOS.values()))
    assert sorted(names) == sorted(SCENARIOS)  # one full round holds each scenario once
    assert sum(SCENARIOS[n] for n in schedule(SEED, KILLS)) >= KILLS
    assert schedule(SEED, KILLS) == ["spare_takeover", "controller_plan", "during_recovery"]


def test_random_kills_are_survived(ray_local, tmp_path):
    out = run_chaos(kills=KILLS, seed=SEED, workdir=str(tmp_path), progress=False)
    assert out["ok"], out["failures"]
    assert out["kills"] >= KILLS and out["kills_survived"] == out["kills"]
    assert out["hangs"] == 0 and out["corrupted_slots"] == 0 and out["lost_experts"] == 0
    assert out["recovery_s"]["max"] is not None and out["recovery_s"]["p50"] <= out["recovery_s"]["max"]
    assert out["epochs"][1] > out["epochs"][0]
