"""The executor's row primitives on the CPU: wide integer views, packing and commit, on aligned and odd geometries."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from elastic_ep.executor import ExpertWeights, StagedUpdate, _halves, _pack, _row_index, _wide, commit, warm_up

# (hidden, intermediate): a row size divisible by 8 bytes, and one that is not even 4-byte aligned in w2
GEOMETRIES = [(8, 4), (3, 5)]


def _weights(layers: int, spr: int, hidden: int, inter: int, offset: float = 0.0) -> ExpertWeights:
    """Every element distinct, so a misplaced byte shows."""
    n13, n2 = 2 * inter * hidden, hidden * inter
    per = n13 + n2
    base = torch.arange(layers * spr * per, dtype=torch.float32).view(layers, spr, per) + offset
    w13 = base[..., :n13].reshape(layers, spr, 2 * inter, hidden).to(torch.bfloat16)
    w2 = base[..., n13:].reshape(layers, spr, hidden, inter).to(torch.bfloat16)
    experts = np.arange(layers * spr, dtype=np.int64).reshape(layers, spr)
    return ExpertWeights(w13=w13.contiguous(), w2=w2.contiguous(), experts=experts)


def test_wide_views_share_bits_and_widen_to_int64():
    rows = torch.arange(64, dtype=torch.int16).view(torch.bfloat16).view(4, 16)
    (wide,) = _wide(rows)
    assert wide.dtype == torch.int64 and wide.shape == (4, 4)
    assert wide.data_ptr() == rows.data_ptr()
    assert torch.equal(wide.view(torch.bfloat16), rows)


def test_wide_takes_the_widest_type_every_tensor_allows():
    a = torch.zeros(2, 16, dtype=torch.bfloat16)
    b = torch.zeros(2, 6, dtype=torch.bfloat16)  # 12-byte rows: int32 yes, int64 no
    wa, wb = _wide(a, b)
    assert wa.dtype == wb.dtype == torch.int32


@pytest.mark.parametrize("make", [
    lambda: torch.zeros(3, 5, dtype=torch.bfloat16),  # 10-byte rows
    lambda: torch.zeros(4, 9, dtype=torch.bfloat16)[:, 1:],  # not contiguous rows
    lambda: torch.zeros(33, dtype=torch.bfloat16)[1:].view(2, 16),  # offset by 2 bytes
    lambda: torch.zeros(2, 8, dtype=torch.int64),  # already 8 bytes wide
])
def test_wide_leaves_tensors_it_cannot_view_unchanged(make):
    t = make()
    (out,) = _wide(t)
    assert out is t


@pytest.mark.parametrize("hidden,inter", GEOMETRIES)
def test_pack_gathers_each_expert_into_the_two_halves(hidden, inter):
    w = _weights(3, 4, hidden, inter)
    layers, slots = np.array([2, 0, 1, 2]), np.array([3, 1, 0, 0])
    n13 = 2 * inter * hidden
    flat = _pack(w, _row_index(w, layers, slots), n13)
    a13, a2 = _halves(flat, len(layers), n13)
    for i, (layer, slot) in enumerate(zip(layers, slots)):
        assert torch.equal(a13[i], w.w13[layer, slot].reshape(-1))
        assert torch.equal(a2[i], w.w2[layer, slot].reshape(-1))


@pytest.mark.parametrize("hidden,inter", GEOMETRIES)
def test_commit_writes_current_rows_of_batches_and_loose_slots(hidden, inter):
    live = _weights(2, 3, hidden, inter)
    src = _weights(2, 3, hidden, inter, offset=1e4)
    n13 = 2 * inter * hidden
    shape13, shape2 = tuple(live.w13.shape[2:]), tuple(live.w2.shape[2:])
    staged = StagedUpdate(epoch=1, n13=n13)
    # batch of three experts into (layer, slot) (0,1), (1,2), (1,0)
    staged.add_batch(_pack(src, _row_index(src, np.array([1, 0, 0]), np.array([1, 2, 0])), n13),
                     np.array([[0, 1, 50], [1, 2, 51], [1, 0, 52]]), shape13, shape2)
    # a later loose copy supersedes the batch's (1, 2): the batch row must not be committed over it
    staged.slots[(1, 2)] = (src.w13[0, 0].clone(), src.w2[0, 0].clone(), 53)
    before = live.w13.clone(), live.w2.clone()
    commit(live, staged)
    expect = {(0, 1): (1, 1, 50), (1, 2): (0, 0, 53), (1, 0): (0, 0, 52)}
    for layer in range(2):
        for slot in range(3):
            if (layer, slot) in expect:
                sl, ss, expert = expect[(layer, slot)]
                assert torch.equal(live.w13[layer, slot], src.w13[sl, ss])
                assert torch.equal(live.w2[layer, slot], src.w2[sl, ss])
                assert live.experts[layer, slot] == expert
            else:
                assert torch.equal(live.w13[layer, slot], before[0][layer, slot])
                assert torch.equal(live.w2[layer, slot], before[1][layer, slot])


@pytest.mark.parametrize("hidden,inter", GEOMETRIES)
def test_warm_up_leaves_weights_and_slot_owners_as_they_were(hidden, inter):
    w = _weights(2, 3, hidden, inter)
    w.experts[0, 0] = -1  # a spare's empty slot
    before = w.w13.clone(), w.w2.clone(), w.experts.copy()
    warm_up(w)
    assert torch.equal(w.w13, before[0]) and torch.equal(w.w2, before[1])
    assert np.array_equal(w.experts, before[2])
