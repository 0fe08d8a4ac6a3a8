"""ExpertLayout: construction checks, derived maps (logcnt, log2phy), coverage checks, persistence."""

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from elastic_ep.errors import CapacityError, ElasticEPError, LayoutError
from elastic_ep.layout import ExpertLayout


def _layout(rows, spr=2, num_experts=4, ranks=None, nodes=None) -> ExpertLayout:
    arr = np.asarray(rows, dtype=np.int64)
    num_ranks = arr.shape[1] // spr
    ranks = tuple(range(num_ranks)) if ranks is None else tuple(ranks)
    nodes = (0,) * len(ranks) if nodes is None else tuple(nodes)
    return ExpertLayout(arr, spr, num_experts, ranks, nodes)


# A small valid layout: 2 layers, 4 experts, 3 ranks (ids 7, 3, 9) x 2 slots, nodes 0, 0, 1.
ROWS = [[0, 1, 2, 3, 0, 2], [3, 2, 1, 0, 1, 3]]
RANKS = (7, 3, 9)
NODES = (0, 0, 1)


@pytest.fixture
def small() -> ExpertLayout:
    return _layout(ROWS, spr=2, num_experts=4, ranks=RANKS, nodes=NODES)


# ---------------------------------------------------------------------------
# Construction validation
# ---------------------------------------------------------------------------


def test_valid_layout_properties(small: ExpertLayout):
    assert small.num_layers == 2
    assert small.num_slots == 6
    assert small.num_ranks == 3
    assert small.slots_per_rank == 2
    assert small.num_experts == 4
    assert small.ranks == RANKS
    assert small.rank_nodes == NODES
    assert small.phy2log.dtype == np.int64
    assert small.phy2log.tolist() == ROWS


def test_layout_errors_are_value_errors():
    assert issubclass(LayoutError, ValueError)
    assert issubclass(LayoutError, ElasticEPError)


@pytest.mark.parametrize("shape", [(6,), (1, 2, 3), ()])
def test_wrong_ndim_names_shape(shape):
    arr = np.zeros(shape, dtype=np.int64)
    with pytest.raises(LayoutError, match=r"\[num_layers, num_slots\]") as err:
        ExpertLayout(arr, 2, 4, (0, 1, 2), (0, 0, 0))
    assert str(tuple(shape)) in str(err.value)


@pytest.mark.parametrize("dtype", [np.float64, np.float32, bool, np.complex128])
def test_non_integer_dtype_names_dtype(dtype):
    arr = np.zeros((1, 4), dtype=dtype)
    with pytest.raises(LayoutError, match="integers") as err:
        ExpertLayout(arr, 2, 4, (0, 1), (0, 0))
    assert str(np.dtype(dtype)) in str(err.value)


def test_other_integer_dtypes_become_int64():
    for dtype in (np.int8, np.int32, np.uint16):
        lay = ExpertLayout(np.array([[0, 1, 2, 3]], dtype=dtype), 2, 4, (0, 1), (0, 0))
        assert lay.phy2log.dtype == np.int64
        assert lay.phy2log.tolist() == [[0, 1, 2, 3]]


def test_accepts_nested_lists():
    lay = ExpertLayout([[0, 1, 2, 3]], 2, 4, [5, 6], [0, 1])
    assert lay.ranks == (5, 6) and lay.rank_nodes == (0, 1)
    assert isinstance(lay.ranks, tuple) and isinstance(lay.rank_nodes, tuple)


def test_slots_not_multiple_of_slots_per_rank():
    with pytest.raises(LayoutError, match="num_slots=5 is not a multiple of slots_per_rank=2"):
        ExpertLayout(np.array([[0, 1, 2, 3, 0]]), 2, 4, (0, 1), (0, 0))


def test_rank_count_mismatch_names_counts():
    with pytest.raises(LayoutError, match="3 rank ids given for 2 rank positions"):
        ExpertLayout(np.array([[0, 1, 2, 3]]), 2, 4, (0, 1, 2), (0, 0, 0))
    with pytest.raises(LayoutError, match="1 rank ids given for 2 rank positions"):
        ExpertLayout(np.array([[0, 1, 2, 3]]), 2, 4, (0,), (0,))


def test_node_count_mismatch():
    with pytest.raises(LayoutError, match="1 node ids given for 2 ranks"):
        ExpertLayout(np.array([[0, 1, 2, 3]]), 2, 4, (0, 1), (0,))


def test_duplicate_rank_ids_listed():
    with pytest.raises(LayoutError, match=r"rank ids must be unique, got \[4, 4\]"):
        ExpertLayout(np.array([[0, 1, 2, 3]]), 2, 4, (4, 4), (0, 0))


def test_expert_id_out_of_range_names_position_and_value():
    rows = np.array([[0, 1, 2, 3], [0, 1, 9, 3]])
    with pytest.raises(LayoutError, match=r"phy2log\[1, 2\] = 9 is not a logical expert id in \[0, 4\)"):
        ExpertLayout(rows, 2, 4, (0, 1), (0, 0))


def test_expert_id_equal_to_num_experts_rejected():
    with pytest.raises(LayoutError, match=r"phy2log\[0, 3\] = 4"):
        ExpertLayout(np.array([[0, 1, 2, 4]]), 2, 4, (0, 1), (0, 0))


def test_negative_expert_id_names_value():
    with pytest.raises(LayoutError, match=r"phy2log\[0, 1\] = -1 is not a logical expert id"):
        ExpertLayout(np.array([[0, -1, 2, 3]]), 2, 4, (0, 1), (0, 0))


def test_duplicate_expert_on_one_rank_names_rank_expert_layer():
    rows = np.array([[0, 1, 2, 3], [0, 1, 3, 3]])
    with pytest.raises(LayoutError, match="rank 8 holds two replicas of expert 3 in layer 1"):
        ExpertLayout(rows, 2, 4, (5, 8), (0, 0))


def test_same_expert_on_two_ranks_is_fine():
    lay = ExpertLayout(np.array([[0, 1, 0, 2, 3, 1]]), 2, 4, (0, 1, 2), (0, 0, 0))
    assert lay.logcnt.tolist() == [[2, 2, 1, 1]]


@pytest.mark.parametrize("spr", [0, -1])
def test_bad_slots_per_rank(spr):
    with pytest.raises(LayoutError, match=f"slots_per_rank must be >= 1, got {spr}"):
        ExpertLayout(np.zeros((1, 4), dtype=np.int64), spr, 4, (0, 1), (0, 0))


@pytest.mark.parametrize("num_experts", [0, -3])
def test_bad_num_experts(num_experts):
    with pytest.raises(LayoutError, match=f"num_experts must be >= 1, got {num_experts}"):
        ExpertLayout(np.zeros((1, 4), dtype=np.int64), 2, num_experts, (0, 1), (0, 0))


def test_zero_layers_rejected():
    with pytest.raises(LayoutError, match="at least one layer"):
        ExpertLayout(np.zeros((0, 4), dtype=np.int64), 2, 4, (0, 1), (0, 0))


def test_phy2log_is_a_read_only_copy():
    src = np.array([[0, 1, 2, 3]], dtype=np.int64)
    lay = ExpertLayout(src, 2, 4, (0, 1), (0, 0))
    src[0, 0] = 3  # the caller's array is not aliased
    assert lay.phy2log[0, 0] == 0
    with pytest.raises(ValueError):
        lay.phy2log[0, 0] = 1
    with pytest.raises(Exception):
        lay.num_experts = 5  # frozen dataclass


def test_construction_does_not_require_coverage():
    # Coverage is validate()'s job: a layout missing expert 3 still constructs.
    lay = ExpertLayout(np.array([[0, 1, 2, 0]]), 2, 4, (0, 1), (0, 0))
    with pytest.raises(LayoutError, match=r"\(0, 3\)"):
        lay.validate()


# ---------------------------------------------------------------------------
# validate(live_ranks)
# ---------------------------------------------------------------------------


def test_validate_all_live_passes(small: ExpertLayout):
    small.validate()
    small.validate(RANKS)
    small.validate([7, 3])  # rank 9 holds only experts that 7 and 3 also hold


def test_validate_missing_pairs_listed(small: ExpertLayout):
    # Without rank 7: layer 0 loses expert 1 and layer 1 loses expert 2 (only rank 7 holds them).
    with pytest.raises(LayoutError) as err:
        small.validate([3, 9])
    msg = str(err.value)
    assert "2 (layer, expert) pairs have no replica on a live rank" in msg
    assert "[(0, 1), (1, 2)]" in msg


def test_validate_lists_at_most_ten_pairs_but_counts_all():
    rows = np.tile(np.arange(12), (3, 1))  # 3 layers, 12 experts, ranks 0..5 x 2 slots
    lay = ExpertLayout(rows, 2, 12, tuple(range(6)), (0,) * 6)
    with pytest.raises(LayoutError) as err:
        lay.validate([0])  # only experts 0, 1 survive: 10 missing per layer
    msg = str(err.value)
    assert msg.startswith("30 (layer, expert) pairs")
    assert "[(0, 2), (0, 3), (0, 4), (0, 5), (0, 6), (0, 7), (0, 8), (0, 9), (0, 10), (0, 11)]" in msg


def test_validate_no_live_rank(small: ExpertLayout):
    with pytest.raises(LayoutError, match="no live rank among"):
        small.validate([])
    with pytest.raises(LayoutError, match=r"no live rank among \[7, 3, 9\]"):
        small.validate([100, 101])


def test_validate_ignores_unknown_live_ids(small: ExpertLayout):
    small.validate([7, 3, 9, 42])


# ---------------------------------------------------------------------------
# logcnt / log2phy
# ---------------------------------------------------------------------------


def test_logcnt_hand_checked(small: ExpertLayout):
    assert small.logcnt.tolist() == [[2, 1, 2, 1], [1, 2, 1, 2]]
    assert small.logcnt.dtype == np.int64


def test_log2phy_hand_checked(small: ExpertLayout):
    assert small.log2phy.tolist() == [
        [[0, 4], [1, -1], [2, 5], [3, -1]],
        [[3, -1], [2, 4], [1, -1], [0, 5]],
    ]


def test_docstring_worked_example():
    # Layer 3, slot 45 (rank position 2, local slot 5) holds expert 7, as does slot 61.
    num_layers, num_experts, spr, num_ranks = 4, 64, 20, 4
    row = np.arange(80) % 64  # slots 64..79 hold experts 0..15 again
    phy2log = np.tile(row, (num_layers, 1))
    phy2log[3, [7, 45]] = [45, 7]  # rank positions 0 and 2 trade experts 7 and 45
    phy2log[3, [61, 71]] = [7, 61]  # within rank position 3: expert 7 moves to slot 61
    lay = ExpertLayout(phy2log, spr, num_experts, tuple(range(num_ranks)), (0,) * num_ranks)
    assert lay.phy2log[3, 45] == 7
    assert 45 // spr == 2 and 45 % spr == 5
    assert lay.logcnt[3, 7] == 2
    assert lay.log2phy[3, 7, :2].tolist() == [45, 61]


def _check_maps(lay: ExpertLayout) -> None:
    cnt, l2p = lay.logcnt, lay.log2phy
    assert cnt.shape == (lay.num_layers, lay.num_experts)
    assert (cnt.sum(axis=1) == lay.num_slots).all()
    assert l2p.shape == (lay.num_layers, lay.num_experts, max(1, int(cnt.max())))
    for layer in range(lay.num_layers):
        seen = []
        for e in range(lay.num_experts):
            row = l2p[layer, e]
            slots = row[row >= 0]
            # filled entries first, then -1 padding
            assert (row[: cnt[layer, e]] >= 0).all() and (row[cnt[layer, e] :] == -1).all()
            assert len(slots) == cnt[layer, e]
            assert list(slots) == sorted(slots)  # slot order
            assert (lay.phy2log[layer, slots] == e).all()
            seen.extend(slots.tolist())
        assert sorted(seen) == list(range(lay.num_slots))  # every slot exactly once


@st.composite
def layouts(draw):
    """Random valid layouts: every expert covered, 1..num_ranks replicas, none twice on a rank."""
    num_layers = draw(st.integers(1, 3))
    num_experts = draw(st.integers(1, 10))
    spr = draw(st.integers(1, num_experts))
    min_ranks = -(-num_experts // spr)
    num_ranks = draw(st.integers(min_ranks, min_ranks + 3))
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    num_slots = num_ranks * spr
    phy2log = np.empty((num_layers, num_slots), dtype=np.int64)
    for layer in range(num_layers):
        cnt = np.ones(num_experts, dtype=np.int64)
        for _ in range(num_slots - num_experts):
            cnt[rng.choice(np.nonzero(cnt < num_ranks)[0])] += 1
        experts = np.repeat(np.arange(num_experts), cnt)  # runs of <= num_ranks copies
        # column-major fill: item i goes to rank i % R, so a run lands on distinct ranks
        grid = experts.reshape(spr, num_ranks).T.copy()
        for r in range(num_ranks):
            rng.shuffle(grid[r])
        phy2log[layer] = grid[rng.permutation(num_ranks)].ravel()
    ranks = tuple(draw(st.permutations(list(range(10, 10 + num_ranks)))))
    nodes = tuple(draw(st.lists(st.integers(0, 2), min_size=num_ranks, max_size=num_ranks)))
    return ExpertLayout(phy2log, spr, num_experts, ranks, nodes)


@settings(max_examples=80, deadline=None)
@given(layouts())
def test_maps_consistent_with_phy2log(lay: ExpertLayout):
    _check_maps(lay)
    lay.validate()


def test_maps_with_single_replicas():
    lay = _layout([[3, 1, 0, 2]], spr=2, num_experts=4)
    assert lay.log2phy.shape == (1, 4, 1)
    assert lay.log2phy[0, :, 0].tolist() == [2, 1, 3, 0]
    _check_maps(lay)


# ---------------------------------------------------------------------------
# round_robin
# ---------------------------------------------------------------------------


def test_round_robin_exact():
    lay = ExpertLayout.round_robin(2, 4, [5, 6, 7], 2, rank_nodes=[0, 1, 1])
    assert lay.phy2log.tolist() == [[0, 1, 2, 3, 0, 1]] * 2
    assert lay.ranks == (5, 6, 7) and lay.rank_nodes == (0, 1, 1)
    assert lay.logcnt.tolist() == [[2, 2, 1, 1]] * 2
    lay.validate()


def test_round_robin_default_nodes_are_zero():
    lay = ExpertLayout.round_robin(1, 4, [0, 1], 2)
    assert lay.rank_nodes == (0, 0)
    assert lay.phy2log.tolist() == [[0, 1, 2, 3]]


@pytest.mark.parametrize("num_experts,ranks,spr", [(8, 4, 2), (8, 3, 3), (5, 5, 1), (6, 2, 4)])
def test_round_robin_valid(num_experts, ranks, spr):
    lay = ExpertLayout.round_robin(3, num_experts, list(range(ranks)), spr)
    lay.validate()
    _check_maps(lay)


def test_round_robin_capacity_error_has_numbers():
    with pytest.raises(CapacityError, match="3 ranks x 2 slots = 6 slots cannot hold 8 logical experts"):
        ExpertLayout.round_robin(1, 8, [0, 1, 2], 2)


def test_round_robin_duplicate_on_rank_is_layout_error():
    # 3 experts, 1 rank x 4 slots: expert 0 would sit twice on rank 0.
    with pytest.raises(LayoutError, match="two replicas of expert 0"):
        ExpertLayout.round_robin(1, 3, [0], 4)


# ---------------------------------------------------------------------------
# Persistence and equality
# ---------------------------------------------------------------------------


def test_to_dict_from_dict_round_trip(small: ExpertLayout):
    data = small.to_dict()
    assert data == {
        "phy2log": ROWS,
        "slots_per_rank": 2,
        "num_experts": 4,
        "ranks": [7, 3, 9],
        "rank_nodes": [0, 0, 1],
    }
    back = ExpertLayout.from_dict(json.loads(json.dumps(data)))
    assert back == small
    assert hash(back) == hash(small)
    assert back.phy2log.dtype == np.int64


@settings(max_examples=50, deadline=None)
@given(layouts())
def test_round_trip_property(lay: ExpertLayout):
    back = ExpertLayout.from_dict(json.loads(json.dumps(lay.to_dict())))
    assert back == lay
    assert hash(back) == hash(lay)
    assert np.array_equal(back.log2phy, lay.log2phy)


def test_from_dict_validates():
    data = {"phy2log": [[0, 0, 1, 2]], "slots_per_rank": 2, "num_experts": 3, "ranks": [0, 1], "rank_nodes": [0, 0]}
    with pytest.raises(LayoutError, match="rank 0 holds two replicas of expert 0 in layer 0"):
        ExpertLayout.from_dict(data)


def test_equality_considers_every_field(small: ExpertLayout):
    same = _layout(ROWS, spr=2, num_experts=4, ranks=RANKS, nodes=NODES)
    assert small == same
    assert small != _layout(ROWS, spr=2, num_experts=5, ranks=RANKS, nodes=NODES)
    assert small != _layout(ROWS, spr=2, num_experts=4, ranks=(7, 9, 3), nodes=NODES)
    assert small != _layout(ROWS, spr=2, num_experts=4, ranks=RANKS, nodes=(0, 1, 1))
    other = [r[:] for r in ROWS]
    other[1][0], other[1][1] = other[1][1], other[1][0]
    assert small != _layout(other, spr=2, num_experts=4, ranks=RANKS, nodes=NODES)
    assert small != "not a layout"
    assert len({small, same}) == 1


# ---------------------------------------------------------------------------
# Rank views
# ---------------------------------------------------------------------------


def test_position_experts_of_node_of(small: ExpertLayout):
    assert [small.position(r) for r in RANKS] == [0, 1, 2]
    assert small.position(np.int64(9)) == 2
    assert small.experts_of(7).tolist() == [[0, 1], [3, 2]]
    assert small.experts_of(3).tolist() == [[2, 3], [1, 0]]
    assert small.experts_of(9).tolist() == [[0, 2], [1, 3]]
    assert [small.node_of(r) for r in RANKS] == [0, 0, 1]
    assert small.rank_view().shape == (2, 3, 2)
    assert small.rank_view()[1, 2].tolist() == [1, 3]


def test_unknown_rank_names_it(small: ExpertLayout):
    with pytest.raises(LayoutError, match=r"rank 4 is not in this layout \(ranks \[7, 3, 9\]\)"):
        small.position(4)
    with pytest.raises(LayoutError, match="rank 5"):
        small.experts_of(5)
    with pytest.raises(LayoutError, match="rank 6"):
        small.node_of(6)


# ---------------------------------------------------------------------------
# rank_loads
# ---------------------------------------------------------------------------


def test_rank_loads_hand_checked(small: ExpertLayout):
    load = np.array([[10.0, 20.0, 30.0, 40.0], [1.0, 2.0, 3.0, 4.0]])
    # layer 0 cnt [2,1,2,1]: per replica [5,20,15,40]; ranks [0,1]=25, [2,3]=55, [0,2]=20
    # layer 1 cnt [1,2,1,2]: per replica [1,1,3,2]; ranks [3,2]=5, [1,0]=2, [1,3]=3
    assert small.rank_loads(load).tolist() == [[25.0, 55.0, 20.0], [5.0, 2.0, 3.0]]


@settings(max_examples=50, deadline=None)
@given(layouts(), st.integers(0, 2**31 - 1))
def test_rank_loads_conserve_total(lay: ExpertLayout, seed: int):
    load = np.random.default_rng(seed).exponential(10.0, (lay.num_layers, lay.num_experts))
    per_rank = lay.rank_loads(load)
    assert per_rank.shape == (lay.num_layers, lay.num_ranks)
    covered = lay.logcnt > 0
    np.testing.assert_allclose(per_rank.sum(axis=1), (load * covered).sum(axis=1))


def test_rank_loads_zero_load(small: ExpertLayout):
    assert small.rank_loads(np.zeros((2, 4))).tolist() == [[0.0] * 3] * 2
