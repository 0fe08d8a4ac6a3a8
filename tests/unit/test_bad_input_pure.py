"""Bad input to the pure parts (no Ray): each is a typed error that names the bad value."""

import pickle

import numpy as np
import pytest

from elastic_ep.balance import rebalance_experts
from elastic_ep.config import ClusterConfig, ModelSpec
from elastic_ep.errors import (
    CapacityError,
    ConfigError,
    ElasticEPError,
    ExpertsLostError,
    LayoutError,
    LoadStatsError,
)
from elastic_ep.faults import CONTROLLER_PHASES, WORKER_PHASES, FaultInjector
from elastic_ep.layout import ExpertLayout
from elastic_ep.testing import SMALL
from elastic_ep.workload import LoadWindow, check_counts


# -- layouts -------------------------------------------------------------------------------


def test_layout_that_misses_an_expert_does_not_validate():
    # 2 ranks x 3 slots, 4 experts: expert 3 of layer 1 is nowhere.
    phy2log = np.array([[0, 1, 2, 3, 0, 1], [0, 1, 2, 0, 1, 2]])
    layout = ExpertLayout(phy2log, 3, 4, (0, 1), (0, 0))
    with pytest.raises(LayoutError, match=r"1 \(layer, expert\) pairs have no replica .* \[\(1, 3\)\]"):
        layout.validate()


def test_layout_that_loses_an_expert_with_a_dead_rank_does_not_validate():
    phy2log = np.array([[0, 1, 2, 3, 0, 1]])
    layout = ExpertLayout(phy2log, 3, 4, (0, 1), (0, 0))
    layout.validate()
    with pytest.raises(LayoutError, match=r"\[\(0, 2\)\]"):
        layout.validate(live_ranks=[1])  # rank 0 died: expert 2 had its only replica there
    with pytest.raises(LayoutError, match="no live rank"):
        layout.validate(live_ranks=[])


@pytest.mark.parametrize("phy2log, match", [
    ([[0, 1, 7, 3]], r"phy2log\[0, 2\] = 7 is not a logical expert id"),
    ([[0, 1, -1, 3]], r"phy2log\[0, 2\] = -1"),
    ([[0, 0, 1, 2]], "rank 0 holds two replicas of expert 0 in layer 0"),
    ([0, 1, 2, 3], "phy2log must be"),
])
def test_malformed_layouts(phy2log, match):
    with pytest.raises(LayoutError, match=match):
        ExpertLayout(np.array(phy2log), 2, 4, (0, 1), (0, 0))


# -- capacity ------------------------------------------------------------------------------


def test_too_few_slots_is_a_capacity_error():
    load = np.ones((SMALL.num_layers, SMALL.num_experts))
    with pytest.raises(CapacityError, match="12"):
        rebalance_experts(load, [0, 1], 4, policy="eplb")  # 8 slots for 12 experts
    with pytest.raises(CapacityError):
        rebalance_experts(load, [], 4, policy="eplb")


# -- configuration -------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_ranks=0), "num_ranks must be >= 1, got 0"),
    (dict(num_ranks=-2), "num_ranks must be >= 1, got -2"),
    (dict(slots_per_rank=0), "slots_per_rank must be >= 1, got 0"),
    (dict(num_ranks=3, num_nodes=2), "num_nodes=2 must divide num_ranks=3"),
    (dict(num_ranks=2, slots_per_rank=5), r"2 ranks x 5 slots = 10 slots cannot hold 12"),
    (dict(num_spares=-1), "num_spares must be >= 0, got -1"),
    (dict(num_nodes=0), "num_nodes must be >= 1, got 0"),
    (dict(policy="random"), "policy must be 'sticky' or 'eplb', got 'random'"),
    (dict(device="tpu"), "device must be 'cpu' or 'cuda', got 'tpu'"),
    (dict(transfer_timeout_s=0), "transfer_timeout_s must be > 0, got 0"),
    (dict(call_timeout_s=-1.0), "call_timeout_s must be > 0"),
    (dict(load_window=0), "load_window must be >= 1, got 0"),
    (dict(preset="llama"), "preset must be"),
])
def test_impossible_cluster_configs(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        ClusterConfig(model=SMALL, **kwargs)


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_experts=0), "num_experts must be a positive int, got 0"),
    (dict(num_experts=12, num_groups=5), "num_groups=5 must divide num_experts=12"),
    (dict(dtype="int8"), "dtype must be one of"),
    (dict(first_layer=-1), "first_layer must be >= 0, got -1"),
])
def test_impossible_model_specs(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        ModelSpec(**kwargs)


def test_cluster_needs_a_config():
    from elastic_ep.cluster import ElasticEPCluster

    with pytest.raises(ConfigError, match="config must be a ClusterConfig, got dict"):
        ElasticEPCluster({"num_ranks": 4})


# -- load statistics -----------------------------------------------------------------------


@pytest.mark.parametrize("make, match", [
    (lambda a: a.__setitem__((1, 2), np.nan) or a, r"load\[1, 2\] = nan is not finite"),
    (lambda a: a.__setitem__((0, 5), np.inf) or a, r"load\[0, 5\] = inf is not finite"),
    (lambda a: a.__setitem__((2, 0), -3.0) or a, r"load\[2, 0\] = -3.0 is negative"),
    (lambda a: a[:, :5], r"load must have shape \[3, 12\], got \[3, 5\]"),
    (lambda a: a.astype(str), "load must be numeric"),
])
def test_bad_load_statistics(make, match):
    good = np.ones((SMALL.num_layers, SMALL.num_experts))
    window = LoadWindow(SMALL.num_layers, SMALL.num_experts, 4)
    with pytest.raises(LoadStatsError, match=match):
        window.add(make(good.copy()))
    assert len(window) == 0  # nothing recorded
    check_counts(good, good.shape, "load")


# -- fault injection -----------------------------------------------------------------------


def test_fault_injector_rejects_unknown_phases_and_negative_delays():
    faults = FaultInjector(WORKER_PHASES)
    with pytest.raises(ValueError, match="unknown fault phase 'commit'"):
        faults.arm("commit")
    with pytest.raises(ValueError, match="delay_s must be >= 0, got -1"):
        faults.arm("staged", -1)
    faults.arm("staged")
    assert faults.armed() == ["staged"]
    faults.disarm()
    faults.hit("staged")  # disarmed: nothing happens
    assert "persist" in CONTROLLER_PHASES and "commit" in CONTROLLER_PHASES


# -- errors cross actor boundaries ---------------------------------------------------------


def test_experts_lost_error_survives_pickling():
    err = ExpertsLostError("3 experts lost", [(0, 1), (2, 5)])
    back = pickle.loads(pickle.dumps(err))
    assert isinstance(back, ExpertsLostError) and isinstance(back, ElasticEPError)
    assert back.lost == [(0, 1), (2, 5)] and str(back) == "3 experts lost"
