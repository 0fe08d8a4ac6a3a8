"""The executor's row primitives on the CPU: wide integer views, packing and commit, on aligned and odd geometries."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from elastic_ep.config import ModelSpec
from elastic_ep.executor import ExpertWeights, StagedUpdate, _pack, _row_index, _wide, commit, warm_up

# (hidden, intermediate, quant): bf16 rows, odd geometry, and an FP8 bundle whose scales share the row
GEOMETRIES = [(8, 4, "none"), (3, 5, "none"), (32, 16, "fp8")]


def _weights(layers: int, spr: int, hidden: int, inter: int, quant: str, offset: int = 0) -> ExpertWeights:
    """Every 4-byte word distinct (weights and scales alike), so a misplaced byte shows."""
    spec = ModelSpec(hidden=hidden, intermediate=inter, quant=quant, block=(8, 8))
    w = ExpertWeights.zeros(spec.expert_format, layers, spr, "cpu")
    words = w.rows.view(torch.int32)
    words.copy_(torch.arange(words.numel(), dtype=torch.int32).view(words.shape) + offset)
    w.experts[:] = np.arange(layers * spr, dtype=np.int64).reshape(layers, spr)
    return w


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


@pytest.mark.parametrize("hidden,inter,quant", GEOMETRIES)
def test_pack_gathers_each_experts_whole_row(hidden, inter, quant):
    w = _weights(3, 4, hidden, inter, quant)
    layers, slots = np.array([2, 0, 1, 2]), np.array([3, 1, 0, 0])
    flat = _pack(w, _row_index(w, layers, slots))
    data = flat.view(len(layers), w.row_bytes)
    for i, (layer, slot) in enumerate(zip(layers, slots)):
        assert torch.equal(data[i], w.rows[layer, slot])
        for name in w.format.names:  # every tensor of the bundle, scales included, came along
            got = data[i][w.format.offsets[w.format.names.index(name)]:][: w.format.tensor(name).nbytes]
            assert torch.equal(got, w.rows[layer, slot][w.format.offsets[w.format.names.index(name)]:]
                               [: w.format.tensor(name).nbytes])


@pytest.mark.parametrize("hidden,inter,quant", GEOMETRIES)
def test_commit_writes_current_rows_of_batches_and_loose_slots(hidden, inter, quant):
    live = _weights(2, 3, hidden, inter, quant)
    src = _weights(2, 3, hidden, inter, quant, offset=10**6)
    staged = StagedUpdate(epoch=1, row_bytes=live.row_bytes)
    # batch of three experts into (layer, slot) (0,1), (1,2), (1,0)
    staged.add_batch(_pack(src, _row_index(src, np.array([1, 0, 0]), np.array([1, 2, 0]))),
                     np.array([[0, 1, 50], [1, 2, 51], [1, 0, 52]]))
    # a later loose copy supersedes the batch's (1, 2): the batch row must not be committed over it
    staged.slots[(1, 2)] = (src.rows[0, 0].clone(), 53)
    before = live.rows.clone()
    commit(live, staged)
    expect = {(0, 1): (1, 1, 50), (1, 2): (0, 0, 53), (1, 0): (0, 0, 52)}
    for layer in range(2):
        for slot in range(3):
            if (layer, slot) in expect:
                sl, ss, expert = expect[(layer, slot)]
                assert torch.equal(live.rows[layer, slot], src.rows[sl, ss])
                for name in live.format.names:
                    assert torch.equal(live.tensor(name)[layer, slot].view(torch.uint8),
                                       src.tensor(name)[sl, ss].view(torch.uint8))
                assert live.experts[layer, slot] == expert
            else:
                assert torch.equal(live.rows[layer, slot], before[layer, slot])


@pytest.mark.parametrize("hidden,inter,quant", GEOMETRIES)
def test_staged_fingerprints_cover_scales(hidden, inter, quant):
    w = _weights(1, 2, hidden, inter, quant)
    staged = StagedUpdate(epoch=1, row_bytes=w.row_bytes)
    staged.add_batch(_pack(w, _row_index(w, np.array([0]), np.array([1]))), np.array([[0, 0, 7]]))
    clean = staged.fingerprints()[0][3]
    last = w.format.names[-1]  # w2's scale in the FP8 bundle, w2 itself otherwise
    staged.slots[(0, 0)][0][w.format.offsets[-1]] ^= 1  # one bit of the bundle's last tensor
    staged.batches[0].sums = None
    assert staged.fingerprints()[0][3] != clean, last


@pytest.mark.parametrize("hidden,inter,quant", GEOMETRIES)
def test_warm_up_leaves_weights_and_slot_owners_as_they_were(hidden, inter, quant):
    w = _weights(2, 3, hidden, inter, quant)
    w.experts[0, 0] = -1  # a spare's empty slot
    before = w.rows.clone(), w.experts.copy()
    warm_up(w)
    assert torch.equal(w.rows, before[0])
    assert np.array_equal(w.experts, before[1])
