"""The controller's reconfiguration state machine, driven one Step at a time without Ray against an
in-process worker group (tests/unit/fake_workers.py), with a controller death at every state."""

import numpy as np
import pytest

from actors.controller import Controller
from actors.reconfigure import Reconfiguration
from elastic_ep.decide import Request
from elastic_ep.errors import CapacityError, TransferError
from elastic_ep.faults import CONTROLLER_PHASES, ROLLED_FORWARD, Step
from elastic_ep.layout import ExpertLayout
from elastic_ep.report import RESUMED_NOTE
from elastic_ep.storage import write_synthetic_checkpoint
from elastic_ep.testing import SMALL, small_config

from fake_workers import FakeWorld


class ControllerDied(BaseException):
    """What os._exit is to the real controller: nothing after it runs, only the state file remains."""


def _die():
    raise ControllerDied()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_synthetic_checkpoint(tmp_path_factory.mktemp("ckpt"), SMALL, num_shards=2)


@pytest.fixture()
def world_and_cfg(checkpoint, tmp_path):
    cfg = small_config(checkpoint, tmp_path, keep_backups=False, auto_recover=False, num_spares=1)
    probe = Controller(cfg, str(tmp_path / "probe"), "probe", runtime=FakeWorld(SMALL, 4, None).runtime)
    world = FakeWorld(SMALL, cfg.slots_per_rank, probe._checkpoint_fingerprints())
    return world, cfg


def _controller(world, cfg):
    return Controller(cfg, cfg.state_dir, "t", runtime=world.runtime, fire=_die)


def _served(c: Controller) -> None:
    """Every live member's committed slots hold exactly what the layout says, with the checkpoint's weights."""
    world = c.workers.world
    for rank, wid in c.workers.members.items():
        proc = world.procs[wid]
        assert proc.alive and proc.rank == rank
        assert np.array_equal(proc.experts, c.layout.experts_of(rank)), rank
        assert np.array_equal(proc.fps, np.take_along_axis(world.ckpt_fp, proc.experts, axis=1)), rank


def test_recovery_one_step_at_a_time(world_and_cfg):
    world, cfg = world_and_cfg
    c = _controller(world, cfg)
    c.start()
    old, spare = c.layout, c.workers.spares[0]
    c.workers.kill(c.workers.members[1])
    r = Reconfiguration(c, Request("recover"), attempt=1)
    assert r.advance() is Step.DECIDE and c.workers.dead == {"w1"}  # detect: the silent worker is marked dead
    assert r.advance() is Step.PLAN and r.att.decision.replaced == {1: spare}
    assert r.advance() is Step.COMMUNICATORS and r.att.plan.fetches.size + r.att.plan.transfers.size > 0
    assert r.advance() is Step.TRANSFER and r.att.group is not None
    assert r.advance() is Step.VERIFY
    assert world.procs[spare].staged is not None and c.layout is old  # staged only: the old layout is live
    assert r.advance() is Step.PERSIST and r.att.rep.slots_verified > 0
    assert r.advance() is Step.COMMIT and c.epoch == 1 and c.pending_commit is not None  # the decision
    assert world.procs[spare].rank is None  # nobody has committed yet
    assert r.advance() is Step.REPLENISH and c.pending_commit is None
    _served(c)
    assert c.workers.spares == [] and r.advance() is Step.DONE
    assert len(c.workers.live(c.workers.spares)) == cfg.num_spares  # the pool refilled
    assert set(r.att.rep.phases) == {s.value for s in Step if s is not Step.DONE}
    assert c.verify().ok


@pytest.mark.parametrize("phase", CONTROLLER_PHASES)
def test_controller_death_at_every_state_leaves_one_layout_and_a_retry_converges(world_and_cfg, phase):
    world, cfg = world_and_cfg
    c = _controller(world, cfg)
    c.start()
    old, victim = c.layout, c.workers.members[2]
    c.workers.kill(victim)
    c.arm_controller_fault(phase)
    with pytest.raises(ControllerDied):
        c.recover()
    planned = c.layout  # what the dead controller had installed (the old one before PERSIST)
    c2 = _controller(world, cfg)  # the restart: only the state file and the worker processes remain
    if phase in ROLLED_FORWARD:
        assert c2.epoch == 1 and c2.layout == planned and c2.workers.members[2] != victim  # the spare took it
        _served(c2)  # the restart finished the commit
        [entry] = c2.history  # the committed recovery is on record, though its controller never returned
        assert entry["reason"] == "recover" and entry["epoch_to"] == 1 and entry["commits"] == 1
        assert entry["replaced"] == {"2": c2.workers.members[2]} and entry["finished_at"] is None
        assert entry["notes"][-1] == RESUMED_NOTE
    else:
        assert c2.history == []  # nothing was committed: nothing on record
        assert c2.epoch == 0 and c2.layout == old and c2.workers.members[2] == victim
        assert all(p.staged is None for p in world.procs.values() if p.alive)  # staging dropped
        live = {r: w for r, w in c2.workers.members.items() if not c2.workers.is_dead(w)}
        assert sorted(live) == [0, 1, 3]
    rep = c2.recover()  # the retry converges
    assert not c2.workers.is_dead(c2.workers.members[2]) and sorted(c2.workers.members) == [0, 1, 2, 3]
    assert rep.epoch_to == c2.epoch and c2.pending_commit is None
    assert c2.history[-1] == rep.to_dict() and len(c2.history) == (2 if phase in ROLLED_FORWARD else 1)
    _served(c2)
    assert c2.verify().ok and len(c2.workers.live(c2.workers.spares)) == cfg.num_spares


def test_worker_death_mid_transfer_fails_the_attempt_and_the_old_layout_stays_live(world_and_cfg):
    world, cfg = world_and_cfg
    c = _controller(world, cfg)
    c.start()
    old = c.layout
    load = np.arange(SMALL.num_layers * SMALL.num_experts, dtype=float).reshape(SMALL.num_layers, -1) ** 2
    r = Reconfiguration(c, Request("rebalance"), attempt=1, load_override=load)
    while r.att.step is not Step.TRANSFER:
        r.advance()
    sender = int(r.att.plan.transfers[0, 2])
    c.workers.kill(c.workers.members[sender])
    with pytest.raises(TransferError):
        r.advance()
    assert c.layout is old and c.epoch == 0
    rep = c.rebalance(load)  # heals the dead sender and rebalances in one reconfiguration
    assert rep.replaced == {sender: "w4"} and c.epoch == 1
    _served(c)
    assert c.verify().ok


def _started_with_3_slots(world_and_cfg, **overrides):
    """A started controller whose ranks have 3 slots each (4 ranks hold the 12 experts exactly)."""
    world, cfg = world_and_cfg
    cfg = small_config(cfg.checkpoint, cfg.state_dir.rsplit("/", 1)[0], keep_backups=False, auto_recover=False,
                       slots_per_rank=3, **overrides)
    world.slots_per_rank = 3
    c = _controller(world, cfg)
    c.start()
    return world, c


def test_cold_replacement_when_no_spare_and_no_room(world_and_cfg):
    world, c = _started_with_3_slots(world_and_cfg, num_spares=1)
    c.workers.kill(c.workers.spares[0])
    c.workers.kill(c.workers.members[3])
    rep = c.recover()
    assert rep.replaced[3].endswith("(cold)") and rep.dropped == ()
    assert rep.bytes_from_checkpoint > 0  # nobody else held rank 3's experts
    _served(c)
    assert len(c.workers.live(c.workers.spares)) == 1


def test_drain_releases_the_worker_and_refusals_name_the_numbers(world_and_cfg):
    world, c = _started_with_3_slots(world_and_cfg, num_spares=1, num_ranks=5)
    wid = c.workers.members[4]
    rep = c.drain(4)
    assert rep.dropped == (4,) and rep.released == (wid,) and rep.safe_to_terminate_at is not None
    assert not world.procs[wid].alive and sorted(c.workers.members) == [0, 1, 2, 3]
    assert c.workers.records[wid].state.value == "released" and wid not in c.workers.dead
    _served(c)
    with pytest.raises(CapacityError, match=r"draining rank 0 would leave 3 ranks x 3 slots = 9 slots cannot hold 12"):
        c.drain(0)


def test_state_round_trips_as_one_list_of_records(world_and_cfg):
    world, cfg = world_and_cfg
    c = _controller(world, cfg)
    c.start()
    c2 = _controller(world, cfg)
    assert c2.workers.records == c.workers.records and c2.restarts == 1
    assert ExpertLayout.from_dict(c2.status().layout) == c.layout
    assert c2.status().rank_nodes == {0: 0, 1: 0, 2: 0, 3: 0}


def test_no_room_on_ray_refuses_a_grow_at_once_but_never_the_replacement_of_a_dead_worker(world_and_cfg):
    world, c = _started_with_3_slots(world_and_cfg, num_spares=0)
    world.free = {"GPU": 0.0}  # every GPU is taken, the dead worker's too until "Ray" notices its death
    started = c.workers.next_worker
    with pytest.raises(CapacityError, match=r"1 workers must be started \(ranks \[4\]\) but only 0 may be "
                                            r"\(Ray has 0 GPU free: room for 0 more workers asking 1 GPU each\)"):
        c.grow(1)
    assert c.workers.next_worker == started and c.epoch == 0  # nothing was started, nothing moved
    c.workers.kill(c.workers.members[2])  # 4 ranks x 3 slots hold the 12 experts exactly: a cold start is needed
    rep = c.recover()  # the dead worker's share counts as freed: its replacement is not refused
    assert rep.replaced[2].endswith("(cold)") and c.epoch == 1
    _served(c)
