"""Layerwise rebalances in the controller's state machine, without Ray (tests/unit/fake_workers.py): one commit per
step, each a complete layout the workers serve; a controller or worker death mid-way leaves a committed partial
layout that the next reconfiguration plans from."""

import numpy as np
import pytest

from actors.reconfigure import Reconfiguration
from elastic_ep.decide import Request
from elastic_ep.errors import TransferError
from elastic_ep.faults import Step
from elastic_ep.migration import plan_migration, staged_bytes
from elastic_ep.plan import plan_transfers
from elastic_ep.report import RESUMED_NOTE
from elastic_ep.testing import SMALL, small_config

from test_controller_steps import ControllerDied, _controller, _served, checkpoint, world_and_cfg  # noqa: F401

LOAD = np.arange(SMALL.num_layers * SMALL.num_experts, dtype=float).reshape(SMALL.num_layers, -1) ** 2


def _started(world_and_cfg):
    world, cfg = world_and_cfg
    c = _controller(world, cfg)
    c.start()
    return world, cfg, c


def _until_commits(r: Reconfiguration, commits: int) -> None:
    while r.att.rep.commits < commits:
        r.advance()


def test_each_step_commits_a_complete_layout_the_workers_serve(world_and_cfg):
    world, cfg, c = _started(world_and_cfg)
    old = c.layout
    r = Reconfiguration(c, Request("rebalance"), attempt=1, load_override=LOAD, layers_per_step=1)
    for _ in range(3):
        r.advance()  # detect, decide, plan
    sched, target = r.att.schedule, r.att.target
    assert sched is not None and sched.num_steps == SMALL.num_layers and sched.old == old
    for k in range(sched.num_steps):
        assert r.att.step is Step.COMMUNICATORS and r.att.plan is r.att.step_plans[k]
        while r.att.step is not Step.COMMIT:
            r.advance()
        assert c.layout == sched.layouts[k] and c.epoch == k + 1 and c.pending_commit is not None  # decided
        r.advance()  # commit: every worker serves the step's layout, nothing pending
        assert c.pending_commit is None and r.att.rep.commits == k + 1
        _served(c)
        c.layout.validate()
        assert set(map(int, np.flatnonzero((c.layout.phy2log != old.phy2log).any(axis=1)))) == \
            {layer for step in sched.steps[:k + 1] for layer in step}
    assert r.att.step is Step.REPLENISH and r.run().epoch_to == SMALL.num_layers
    rep = r.att.rep
    assert c.layout == target and rep.migration_steps == rep.commits == SMALL.num_layers
    whole = staged_bytes(plan_transfers(old, target, old.ranks, expert_bytes=SMALL.expert_bytes))
    assert rep.plan["max_rank_bytes_staged"] == max(whole.values())
    assert max(rep.staging_peak_bytes.values()) < max(whole.values())  # one layer's slots at a time
    assert all(rep.staging_peak_bytes[rank] <= whole[rank] for rank in whole)
    assert c.verify()["ok"]


def test_whole_model_is_one_step_and_reports_its_staging(world_and_cfg):
    world, cfg, c = _started(world_and_cfg)
    old = c.layout
    rep = c.rebalance(LOAD)  # layers_per_step defaults to the config's 0: the whole model at once
    whole = staged_bytes(plan_transfers(old, c.layout, old.ranks, expert_bytes=SMALL.expert_bytes))
    assert rep.migration_steps == rep.commits == 1 and rep.epoch_to == 1
    assert rep.staging_peak_bytes == whole and max(whole.values()) > 0
    _served(c)


@pytest.mark.parametrize("phase", ["communicators", "transfer", "verify", "persist", "commit"])
def test_controller_death_in_the_second_step_keeps_a_committed_layout_and_a_retry_converges(world_and_cfg, phase):
    world, cfg, c = _started(world_and_cfg)
    old = c.layout
    r = Reconfiguration(c, Request("rebalance"), attempt=1, load_override=LOAD, layers_per_step=1)
    _until_commits(r, 1)
    sched = r.att.schedule
    c.arm_controller_fault(phase)
    with pytest.raises(ControllerDied):
        r.run()
    c2 = _controller(world, cfg)  # the restart: the state file and the worker processes remain
    forward = phase == "commit"  # the second step's decision was written: it rolls forward
    assert c2.epoch == (2 if forward else 1) and c2.layout == sched.layouts[1 if forward else 0]
    assert c2.pending_commit is None and all(p.staged is None for p in world.procs.values() if p.alive)
    [entry] = c2.history  # one entry for the move, updated commit by commit, on record through the restart
    assert entry["reason"] == "rebalance" and entry["epoch_to"] == c2.epoch == entry["commits"]
    assert entry["finished_at"] is None and entry["notes"][-1] == RESUMED_NOTE
    _served(c2)
    assert c2.verify()["ok"]
    rep = c2.rebalance(LOAD, layers_per_step=1)  # plans from the partial layout and finishes the move
    assert rep.epoch_from == c2.epoch - rep.commits and rep.commits == rep.migration_steps >= 1
    assert c2.layout != old and c2.layout.rank_loads(LOAD).max() <= old.rank_loads(LOAD).max()
    _served(c2)
    assert c2.verify()["ok"] and c2.rebalance(LOAD, layers_per_step=1)["noop"]  # converged


def test_worker_death_in_the_second_step_leaves_the_first_committed_and_the_retry_heals(world_and_cfg):
    world, cfg, c = _started(world_and_cfg)
    r = Reconfiguration(c, Request("rebalance"), attempt=1, load_override=LOAD, layers_per_step=1)
    _until_commits(r, 1)
    first = r.att.schedule.layouts[0]
    sender = int(r.att.plan.transfers[0, 2])
    victim = c.workers.members[sender]
    c.workers.kill(victim)
    with pytest.raises(TransferError):
        while not r.done:
            r.advance()
    assert c.layout == first and c.epoch == 1  # the first step stays committed: a complete, valid layout
    c.discard_all()
    live = {rank: wid for rank, wid in c.workers.members.items() if wid != victim}
    for rank, wid in live.items():
        assert np.array_equal(world.procs[wid].experts, first.experts_of(rank))
    rep = c.rebalance(LOAD, layers_per_step=1)  # heals the dead rank and rebalances, the whole model at once
    assert rep.replaced == {sender: "w4"} and rep.migration_steps == 1 and rep.epoch_from == 1
    assert any("changes membership" in n for n in rep.notes)
    _served(c)
    assert c.verify()["ok"]


def test_recoveries_move_the_whole_model_even_when_the_config_asks_for_layers(world_and_cfg, tmp_path):
    world, cfg = world_and_cfg
    cfg = small_config(cfg.checkpoint, cfg.state_dir.rsplit("/", 1)[0], keep_backups=False, auto_recover=False,
                       num_spares=1, layers_per_step=1)
    c = _controller(world, cfg)
    c.start()
    c.workers.kill(c.workers.members[1])
    rep = c.recover()
    assert rep.migration_steps == rep.commits == 1 and rep.notes == ()
    _served(c)
    rep = c.rebalance(LOAD)  # the config's layers_per_step applies to rebalances
    assert rep.commits == rep.migration_steps > 1
    _served(c)


def test_layers_per_step_is_checked():
    with pytest.raises(ValueError, match="layers_per_step"):
        small_config("/nonexistent", "/tmp", layers_per_step=-1)


def test_schedule_of_the_controller_is_the_pure_one(world_and_cfg):
    world, cfg, c = _started(world_and_cfg)
    r = Reconfiguration(c, Request("rebalance"), attempt=1, load_override=LOAD, layers_per_step=2)
    for _ in range(3):
        r.advance()
    expected = plan_migration(c.layout, r.att.target, 2)
    assert r.att.schedule.steps == expected.steps == ((0, 1), (2,))
    assert all(a == b for a, b in zip(r.att.schedule.layouts, expected.layouts))
