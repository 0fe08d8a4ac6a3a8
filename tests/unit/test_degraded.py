"""Degraded routing: hand-worked tokens, invariants under hypothesis (sums kept, untouched rows bit-exact), bad input."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from elastic_ep.degraded import RoutingError, degrade_routing
from elastic_ep.errors import ElasticEPError


def test_worked_example():
    ids = np.array([[0, 1], [2, 3], [1, 2], [1, 3], [0, 2]])
    w = np.array([[0.75, 0.25], [0.5, 0.5], [0.5, 0.25], [0.0, 1.0], [1.0, 0.0]], dtype=np.float32)
    lost = np.array([False, True, False, True])  # experts 1 and 3 have no live replica
    r = degrade_routing(ids, w, unavailable=lost)
    expected = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 0.75], [0.0, 0.0], [1.0, 0.0]], dtype=np.float32)
    np.testing.assert_array_equal(r.topk_weights, expected)
    assert r.topk_weights.dtype == np.float32
    # token 0: 0.75 kept, rescaled to 1.0; token 1: 0.5 kept, rescaled to 1.0; token 2: 0.25 kept,
    # rescaled to 0.75; token 3: every expert lost; token 4 is untouched (its zero weight stays)
    assert r.degraded_tokens.tolist() == [0, 1, 2] and r.unservable_tokens.tolist() == [3]
    assert (r.num_degraded, r.num_unservable) == (3, 1)
    assert r.kept.tolist() == [[True, False], [True, False], [False, True], [False, False], [True, True]]


def test_kept_experts_with_zero_weight_cannot_carry_a_dropped_one():
    # token 0 keeps expert 0 at weight 0 while its weight-1 expert is lost: unservable
    # token 1's weights are all zero: dropping one changes nothing, so it is degraded with sum 0
    r = degrade_routing(np.array([[0, 1], [0, 1]]), np.array([[0.0, 1.0], [0.0, 0.0]]), unavailable=np.array([False, True]))
    assert r.unservable_tokens.tolist() == [0] and r.degraded_tokens.tolist() == [1]
    np.testing.assert_array_equal(r.topk_weights, [[0.0, 0.0], [0.0, 0.0]])


def test_per_entry_availability_and_a_read_only_result():
    avail = np.array([[True, False, True]])
    r = degrade_routing(np.array([[4, 4, 7]]), np.array([[0.25, 0.5, 0.25]]), available=avail)
    np.testing.assert_array_equal(r.topk_weights, [[0.5, 0.0, 0.5]])
    assert r.degraded_tokens.tolist() == [0]
    with pytest.raises(ValueError):
        r.topk_weights[0, 0] = 3.0
    avail[0, 0] = False  # the caller's mask stays writable and the result does not alias it
    assert r.kept[0, 0]


def test_nothing_lost_returns_the_weights_bit_exact():
    w = np.random.default_rng(0).random((64, 8)).astype(np.float16)
    r = degrade_routing(np.zeros((64, 8), dtype=np.int64), w, unavailable=np.zeros(3, dtype=bool))
    assert r.topk_weights.tobytes() == w.tobytes() and r.num_degraded == r.num_unservable == 0


@pytest.mark.parametrize("kwargs, match", [
    (dict(ids=[[0, 1]], w=[[0.5]], unavailable=[False, False]), r"\[1, 2\] and \[1, 1\]"),
    (dict(ids=[[0, 5]], w=[[0.5, 0.5]], unavailable=[False, False]), r"topk_ids\[0, 1\] = 5 is not an expert id in 0..1"),
    (dict(ids=[[0, -1]], w=[[0.5, 0.5]], unavailable=[False, False]), r"topk_ids\[0, 1\] = -1"),
    (dict(ids=[[0, 1]], w=[[0.5, np.nan]], unavailable=[False, False]), r"topk_weights\[0, 1\] = nan"),
    (dict(ids=[[0, 1]], w=[[-0.5, 0.5]], unavailable=[False, False]), r"topk_weights\[0, 0\] = -0.5"),
    (dict(ids=[[0.0, 1.0]], w=[[0.5, 0.5]], unavailable=[False, False]), "topk_ids must be integers"),
    (dict(ids=[[0, 1]], w=[[1, 0]], unavailable=[False, False]), "floating point"),
    (dict(ids=[[0, 1]], w=[[0.5, 0.5]], unavailable=[0, 1]), "bool mask"),
    (dict(ids=[[0, 1]], w=[[0.5, 0.5]], available=[[True]]), r"available must be a \[tokens, k\] = \[1, 2\]"),
    (dict(ids=[[0, 1]], w=[[0.5, 0.5]]), "exactly one of"),
    (dict(ids=[[0, 1]], w=[[0.5, 0.5]], unavailable=[False, False], available=[[True, True]]), "exactly one of"),
])
def test_bad_input_is_a_typed_error_naming_the_value(kwargs, match):
    ids, w = np.array(kwargs.pop("ids")), np.array(kwargs.pop("w"))
    kwargs = {k: np.array(v) for k, v in kwargs.items()}
    with pytest.raises(RoutingError, match=match) as info:
        degrade_routing(ids, w, **kwargs)
    assert isinstance(info.value, ElasticEPError) and isinstance(info.value, ValueError)


@st.composite
def routing(draw):
    t, k, e = draw(st.integers(0, 40)), draw(st.integers(1, 8)), draw(st.integers(1, 16))
    dtype = draw(st.sampled_from([np.float16, np.float32, np.float64]))
    ids = draw(hnp.arrays(np.int64, (t, k), elements=st.integers(0, e - 1)))
    # zeros or normal float16 numbers (representable in every dtype; subnormals lose the relative precision checked below)
    w = draw(hnp.arrays(dtype, (t, k), elements=st.just(0.0) | st.floats(2 ** -8, 4, width=16)))
    lost = draw(hnp.arrays(np.bool_, (e,)))
    return ids, w, lost


@settings(max_examples=300, deadline=None)
@given(routing())
def test_invariants(case):
    ids, w, lost = case
    r = degrade_routing(ids, w, unavailable=lost)
    kept = ~lost[ids]
    np.testing.assert_array_equal(r.kept, kept)
    assert r.topk_weights.dtype == w.dtype and r.topk_weights.shape == w.shape
    w64, out64 = w.astype(np.float64), r.topk_weights.astype(np.float64)
    touched = ~kept.all(axis=1)
    # untouched tokens: bit-exact
    assert r.topk_weights[~touched].tobytes() == w[~touched].tobytes()
    # dropped entries are 0, everywhere
    assert (r.topk_weights[~kept] == 0).all()
    # counts: every touched token is exactly one of degraded and unservable
    deg, uns = set(r.degraded_tokens.tolist()), set(r.unservable_tokens.tolist())
    assert not deg & uns and deg | uns == set(np.flatnonzero(touched).tolist())
    expect_uns = {t for t in range(len(w)) if not kept[t].any() or (w64[t][kept[t]].sum() == 0 and w64[t][~kept[t]].sum() > 0)}
    assert uns == expect_uns
    # degraded tokens keep their original sum (to the dtype's rounding), in proportion
    eps = float(np.finfo(w.dtype).eps)
    for t in deg:
        assert kept[t].any()
        assert out64[t].sum() == pytest.approx(w64[t].sum(), rel=4 * eps * ids.shape[1], abs=1e-12)
        scale = w64[t].sum() / w64[t][kept[t]].sum() if w64[t][kept[t]].sum() > 0 else 1.0
        np.testing.assert_allclose(out64[t][kept[t]], w64[t][kept[t]] * scale, rtol=2 * eps)
    # the same answer from the per-entry mask
    r2 = degrade_routing(ids, w, available=kept)
    assert r2.topk_weights.tobytes() == r.topk_weights.tobytes()
    assert r2.degraded_tokens.tolist() == r.degraded_tokens.tolist()
