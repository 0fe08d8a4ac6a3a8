"""A seeded random schedule of kills over every phase: which scenarios it picks (the run itself is
``tests/integration/test_cli.py``'s chaos test, through the console entry point)."""

from elastic_ep.chaos import SCENARIOS, schedule

# test_faults.py runs every scenario of SCENARIOS once on its own (21 kills); the CLI's chaos test checks that
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
