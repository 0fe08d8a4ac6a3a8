"""Checkpoint I/O on real safetensors files: round trips, identity values, rejection of bad files, fingerprints."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from elastic_ep.config import ModelSpec
from elastic_ep.errors import CheckpointError, ConfigError
from elastic_ep.checkpoint import (
    INDEX_FILE,
    PRESETS,
    CheckpointReader,
    expected_bundle,
    expected_expert,
    expected_fingerprints,
    fingerprint_row,
    fingerprint_rows,
    read_spec,
    tensor_view,
    to_row,
    torch_dtype,
    write_synthetic_checkpoint,
)


def _pair(rows: torch.Tensor, spec: ModelSpec = None):
    """(w13, w2) typed views of byte rows of an unquantized spec."""
    fmt = (spec or SPEC).expert_format
    return tensor_view(rows, fmt, "w13"), tensor_view(rows, fmt, "w2")


def fingerprint(w13: torch.Tensor, w2: torch.Tensor, spec: ModelSpec = None) -> int:
    """Fingerprint of an unquantized expert given as its two tensors."""
    return fingerprint_row(to_row({"w13": w13, "w2": w2}, (spec or SPEC).expert_format))

SPEC = ModelSpec(num_layers=3, num_experts=6, hidden=16, intermediate=8, first_layer=1)


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    return write_synthetic_checkpoint(tmp_path / "ckpt", SPEC, preset="deepseek", num_shards=2)


def _index(folder: Path) -> dict:
    return json.loads((folder / INDEX_FILE).read_text())


def _write_index(folder: Path, index: dict) -> None:
    (folder / INDEX_FILE).write_text(json.dumps(index))


def _shards(folder: Path) -> list[Path]:
    return sorted(folder.glob("model-*.safetensors"))


# ---------------------------------------------------------------------------
# Round trips and layout on disk
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_round_trip_every_preset(tmp_path, preset):
    folder = write_synthetic_checkpoint(tmp_path / preset, SPEC, preset=preset, num_shards=2)
    reader = CheckpointReader(folder, SPEC, preset)
    reader.validate()
    keys = [(0, 0), (1, 5), (2, 3)]
    got = reader.read_experts(keys)
    assert sorted(got) == sorted(keys)
    for (layer, expert), row in got.items():
        w13, w2 = _pair(row)
        want13, want2 = expected_expert(SPEC, layer, expert)
        assert w13.shape == SPEC.w13_shape and w2.shape == SPEC.w2_shape
        assert w13.dtype == torch.bfloat16
        assert torch.equal(w13, want13) and torch.equal(w2, want2)


def test_preset_names_use_checkpoint_layer_index(ckpt):
    names = set(_index(ckpt)["weight_map"])
    assert "model.layers.1.mlp.experts.0.gate_proj.weight" in names  # first_layer=1
    assert "model.layers.3.mlp.experts.5.down_proj.weight" in names
    assert not any(n.startswith("model.layers.0.") for n in names)
    assert PRESETS["mixtral"].tensor_names(2, 7) == (
        "model.layers.2.block_sparse_moe.experts.7.w1.weight",
        "model.layers.2.block_sparse_moe.experts.7.w3.weight",
        "model.layers.2.block_sparse_moe.experts.7.w2.weight",
    )


def test_shards_and_index(tmp_path):
    spec = ModelSpec(num_layers=4, num_experts=4, hidden=16, intermediate=8)
    folder = write_synthetic_checkpoint(tmp_path / "c", spec, num_shards=3)
    shards = _shards(folder)
    assert [p.name for p in shards] == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    index = _index(folder)
    weight_map = index["weight_map"]
    assert len(weight_map) == spec.num_layers * spec.num_experts * 3
    assert index["metadata"]["total_size"] == spec.num_layers * spec.num_experts * spec.expert_bytes
    # every tensor sits in the file the index names; each layer lives in exactly one shard
    from safetensors import safe_open

    layers_of = {}
    for shard in shards:
        with safe_open(str(shard), framework="pt") as f:
            for name in f.keys():
                assert weight_map[name] == shard.name
                layers_of.setdefault(shard.name, set()).add(int(name.split(".")[2]))
    assert sorted(layers_of.values(), key=min) == [{0, 1}, {2}, {3}]


def test_single_file_without_index(tmp_path):
    folder = write_synthetic_checkpoint(tmp_path / "one", SPEC, num_shards=1)
    assert not (folder / INDEX_FILE).exists() and (folder / "model.safetensors").is_file()
    reader = CheckpointReader(folder, SPEC)
    reader.validate()
    w13, w2 = _pair(reader.read_experts([(2, 4)])[(2, 4)])
    assert torch.equal(w13, expected_expert(SPEC, 2, 4)[0]) and torch.equal(w2, expected_expert(SPEC, 2, 4)[1])


def test_bad_writer_arguments(tmp_path):
    with pytest.raises(ConfigError, match="num_shards"):
        write_synthetic_checkpoint(tmp_path / "a", SPEC, num_shards=SPEC.num_layers + 1)
    with pytest.raises(ConfigError, match="'llama'"):
        write_synthetic_checkpoint(tmp_path / "b", SPEC, preset="llama")


def test_float32_round_trip(tmp_path):
    spec = ModelSpec(num_layers=2, num_experts=4, hidden=16, intermediate=8, dtype="float32")
    folder = write_synthetic_checkpoint(tmp_path / "f32", spec, preset="qwen")
    row = CheckpointReader(folder, spec, "qwen").read_experts([(1, 3)])[(1, 3)]
    got = _pair(row, spec)
    assert got[0].dtype == torch.float32 == torch_dtype(spec)
    assert all(torch.equal(a, b) for a, b in zip(got, expected_expert(spec, 1, 3)))
    assert fingerprint_row(row) == expected_fingerprints(spec)[1, 3]


# ---------------------------------------------------------------------------
# Identity-encoding values
# ---------------------------------------------------------------------------


def test_values_encode_identity():
    for layer in range(SPEC.num_layers):
        for expert in range(SPEC.num_experts):
            for k, t in enumerate(expected_bundle(SPEC, layer, expert).values()):
                assert t.reshape(-1)[:3].tolist() == [layer, expert, k]
    fps = expected_fingerprints(SPEC)
    assert fps.shape == (SPEC.num_layers, SPEC.num_experts) and fps.dtype == np.int64
    assert len(np.unique(fps)) == fps.size  # distinct (layer, expert) -> distinct tensors
    a, b = expected_expert(SPEC, 0, 1), expected_expert(SPEC, 1, 0)
    assert not torch.equal(a[0], b[0]) and not torch.equal(a[1], b[1])


def test_ids_past_bfloat16_exact_range_still_differ():
    spec = ModelSpec(num_layers=1, num_experts=300, hidden=4, intermediate=2)
    a, b = expected_expert(spec, 0, 256), expected_expert(spec, 0, 257)
    assert a[0][0, 1] == b[0][0, 1]  # 257 rounds to 256 in bfloat16 ...
    assert not torch.equal(a[0], b[0])  # ... but the pattern's phase differs


def test_expected_expert_rejects_out_of_range():
    with pytest.raises(ValueError, match=r"\(3, 0\)"):
        expected_expert(SPEC, 3, 0)


# ---------------------------------------------------------------------------
# Reading only what is needed
# ---------------------------------------------------------------------------


def test_bytes_read_counts_only_requested_experts(ckpt):
    reader = CheckpointReader(ckpt, SPEC)
    assert reader.bytes_read == 0
    reader.read_experts([(0, 0), (2, 5), (2, 5)])  # duplicate read once
    assert reader.bytes_read == 2 * SPEC.expert_bytes
    reader.read_layer_slots(1, [3])
    assert reader.bytes_read == 3 * SPEC.expert_bytes


def test_other_shards_are_not_opened(ckpt):
    first, second = _shards(ckpt)
    second.write_bytes(b"\xff" * 64)  # layer 2 lives here; reading layers 0-1 must not touch it
    reader = CheckpointReader(ckpt, SPEC)
    got = reader.read_experts([(0, 2), (1, 4)])
    assert torch.equal(_pair(got[(1, 4)])[1], expected_expert(SPEC, 1, 4)[1])
    with pytest.raises(CheckpointError, match=second.name):
        reader.read_experts([(2, 0)])


def test_read_layer_slots_stacks_and_repeats(ckpt):
    reader = CheckpointReader(ckpt, SPEC)
    experts = [4, 0, 4, 1]
    rows = reader.read_layer_slots(2, experts)
    w13, w2 = _pair(rows)
    assert w13.shape == (4, *SPEC.w13_shape) and w2.shape == (4, *SPEC.w2_shape)
    for row, expert in enumerate(experts):
        want13, want2 = expected_expert(SPEC, 2, expert)
        assert torch.equal(w13[row], want13) and torch.equal(w2[row], want2)
    assert reader.bytes_read == 3 * SPEC.expert_bytes
    assert fingerprint_rows(rows) == [expected_fingerprints(SPEC)[2, e] for e in experts]


def test_bad_keys_are_value_errors(ckpt):
    reader = CheckpointReader(ckpt, SPEC)
    with pytest.raises(ValueError, match=r"\(0, 6\)"):
        reader.read_experts([(0, 6)])
    with pytest.raises(ValueError, match="-1"):
        reader.read_layer_slots(-1, [0])


# ---------------------------------------------------------------------------
# Rejected checkpoints
# ---------------------------------------------------------------------------


def test_missing_folder_and_bad_index(tmp_path, ckpt):
    with pytest.raises(CheckpointError, match="nope"):
        CheckpointReader(tmp_path / "nope", SPEC)
    (ckpt / INDEX_FILE).write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        CheckpointReader(ckpt, SPEC)
    _write_index(ckpt, {"metadata": {}})
    with pytest.raises(CheckpointError, match="weight_map"):
        CheckpointReader(ckpt, SPEC)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="neither"):
        CheckpointReader(empty, SPEC)


def _point_one_entry_at(folder: Path, file: str) -> None:
    index = _index(folder)
    index["weight_map"]["model.layers.1.mlp.experts.0.up_proj.weight"] = file
    _write_index(folder, index)


@pytest.mark.parametrize("how", ["dotdot", "absolute", "symlink"])
def test_weight_map_cannot_escape_folder(tmp_path, ckpt, how):
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes(_shards(ckpt)[0].read_bytes())  # a valid file, just in the wrong place
    if how == "dotdot":
        entry = "../outside.safetensors"
    elif how == "absolute":
        entry = str(outside)
    else:
        entry = "link.safetensors"
        os.symlink(outside, ckpt / entry)
    _point_one_entry_at(ckpt, entry)
    with pytest.raises(CheckpointError, match=entry.replace(".", r"\.")):
        CheckpointReader(ckpt, SPEC)


def test_symlink_inside_folder_is_allowed(ckpt):
    first = _shards(ckpt)[0]
    os.rename(first, ckpt / "real.bin")
    os.symlink("real.bin", first)
    reader = CheckpointReader(ckpt, SPEC)
    assert torch.equal(_pair(reader.read_experts([(0, 1)])[(0, 1)])[0], expected_expert(SPEC, 0, 1)[0])


def test_missing_shard_file(ckpt):
    second = _shards(ckpt)[1]
    second.unlink()
    with pytest.raises(CheckpointError, match=second.name):
        CheckpointReader(ckpt, SPEC)


def test_truncated_shard(ckpt):
    first = _shards(ckpt)[0]
    size = first.stat().st_size
    with open(first, "r+b") as f:
        f.truncate(size // 2)
    reader = CheckpointReader(ckpt, SPEC)
    with pytest.raises(CheckpointError, match=first.name) as info:
        reader.read_experts([(0, 0)])
    assert info.value.__cause__ is not None  # the safetensors error is kept


def test_corrupted_header(ckpt):
    first = _shards(ckpt)[0]
    with open(first, "r+b") as f:
        f.write(b"\xde\xad\xbe\xef\x00\x11\x22\x33{")
    reader = CheckpointReader(ckpt, SPEC)
    with pytest.raises(CheckpointError, match=first.name):
        reader.read_layer_slots(0, [0])


def test_corrupted_single_file_fails_at_open(tmp_path):
    folder = write_synthetic_checkpoint(tmp_path / "one", SPEC, num_shards=1)
    (folder / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00garbage!")
    with pytest.raises(CheckpointError, match="model.safetensors"):
        CheckpointReader(folder, SPEC)


def test_expert_missing_from_index(ckpt):
    name = "model.layers.2.mlp.experts.3.down_proj.weight"
    index = _index(ckpt)
    del index["weight_map"][name]
    _write_index(ckpt, index)
    reader = CheckpointReader(ckpt, SPEC)
    with pytest.raises(CheckpointError, match=r"1 expert tensors missing.*" + name.replace(".", r"\.")):
        reader.validate()
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
        reader.read_experts([(1, 3)])


def test_validate_lists_at_most_ten(ckpt):
    total = SPEC.num_layers * SPEC.num_experts * 3
    with pytest.raises(CheckpointError, match=rf"^{total} expert tensors missing") as info:
        CheckpointReader(ckpt, SPEC, "mixtral").validate()  # deepseek names, mixtral preset
    assert str(info.value).count("block_sparse_moe") == 10


def test_tensor_in_index_but_not_in_file(tmp_path):
    folder = tmp_path / "hand"
    folder.mkdir()
    names = PRESETS["qwen"].tensor_names(0, 0)
    save_file({names[0]: torch.zeros(8, 16, dtype=torch.bfloat16)}, str(folder / "a.safetensors"))
    _write_index(folder, {"weight_map": {n: "a.safetensors" for n in names}})
    spec = ModelSpec(num_layers=1, num_experts=1, hidden=16, intermediate=8)
    with pytest.raises(CheckpointError, match=names[1].replace(".", r"\.") + ".*a\\.safetensors"):
        CheckpointReader(folder, spec, "qwen").read_experts([(0, 0)])


def test_wrong_shape_and_dtype(ckpt):
    wider = ModelSpec(num_layers=3, num_experts=6, hidden=32, intermediate=8, first_layer=1)
    with pytest.raises(CheckpointError, match=r"gate_proj.*shape \(8, 16\), the model spec needs \(8, 32\)"):
        CheckpointReader(ckpt, wider).read_experts([(0, 0)])
    f32 = ModelSpec(num_layers=3, num_experts=6, hidden=16, intermediate=8, first_layer=1, dtype="float32")
    with pytest.raises(CheckpointError, match=r"dtype BF16, the model spec needs F32"):
        CheckpointReader(ckpt, f32).read_experts([(0, 0)])


# ---------------------------------------------------------------------------
# read_spec
# ---------------------------------------------------------------------------


def test_read_spec_round_trip(tmp_path):
    spec = ModelSpec(num_layers=2, num_experts=8, hidden=16, intermediate=8, first_layer=1, num_groups=2)
    folder = write_synthetic_checkpoint(tmp_path / "c", spec, preset="mixtral")
    assert read_spec(folder) == (spec, "mixtral")


@pytest.mark.parametrize(
    "config, want, preset",
    [
        (
            {"model_type": "deepseek_v3", "n_routed_experts": 256, "moe_intermediate_size": 2048, "hidden_size": 7168,
             "num_hidden_layers": 61, "first_k_dense_replace": 3, "n_group": 8, "torch_dtype": "bfloat16"},
            ModelSpec(num_layers=58, num_experts=256, hidden=7168, intermediate=2048, first_layer=3, num_groups=8),
            "deepseek",
        ),
        (
            {"model_type": "qwen3_moe", "num_experts": 128, "moe_intermediate_size": 768, "hidden_size": 2048,
             "num_hidden_layers": 48, "torch_dtype": "bfloat16", "decoder_sparse_step": 1, "mlp_only_layers": []},
            ModelSpec(num_layers=48, num_experts=128, hidden=2048, intermediate=768),
            "qwen",
        ),
        (
            {"model_type": "mixtral", "num_local_experts": 8, "intermediate_size": 14336, "hidden_size": 4096,
             "num_hidden_layers": 32, "torch_dtype": "float16"},
            ModelSpec(num_layers=32, num_experts=8, hidden=4096, intermediate=14336, dtype="float16"),
            "mixtral",
        ),
    ],
)
def test_read_spec_hf_configs(tmp_path, config, want, preset):
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert read_spec(tmp_path) == (want, preset)


def test_read_spec_failures(tmp_path):
    with pytest.raises(CheckpointError, match="config.json"):
        read_spec(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 4096}))
    with pytest.raises(CheckpointError, match="'llama'"):
        read_spec(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"n_routed_experts": 8, "hidden_size": 16}))
    with pytest.raises(CheckpointError, match="moe_intermediate_size"):
        read_spec(tmp_path)
    fp8 = {"n_routed_experts": 8, "moe_intermediate_size": 8, "hidden_size": 16, "num_hidden_layers": 2,
           "quantization_config": {"quant_method": "awq"}}
    (tmp_path / "config.json").write_text(json.dumps(fp8))
    with pytest.raises(CheckpointError, match="quant_method='awq' is unknown"):
        read_spec(tmp_path)


# ---------------------------------------------------------------------------
# Fingerprints (over each expert's whole byte row)
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("quant", ["none", "fp8", "mxfp4", "int4"])
def test_fingerprint_detects_every_single_bit_change_in_any_tensor(quant):
    spec = ModelSpec(hidden=64, intermediate=32, quant=quant, block=(16, 16), group_size=16, bias=quant == "mxfp4")
    row = to_row(expected_bundle(spec, 1, 2), spec.expert_format)
    base = fingerprint_row(row)
    for i in range(0, row.numel(), 7):  # every tensor, scales and biases included, and the padding
        for bit in (0, 7):
            changed = row.clone()
            changed[i] ^= 1 << bit
            assert fingerprint_row(changed) != base, (i, bit)


def test_fingerprint_distinguishes_swapped_elements_and_signed_zero():
    w13 = torch.zeros(16, 16, dtype=torch.bfloat16)
    w2 = torch.zeros(16, 8, dtype=torch.bfloat16)
    w13[0, 0], w13[0, 1] = 1.0, 2.0
    swapped = w13.clone()
    swapped[0, 0], swapped[0, 1] = 2.0, 1.0
    assert fingerprint(w13, w2) != fingerprint(swapped, w2)
    neg = w2.clone()
    neg[3, 3] = -0.0
    assert fingerprint(w13, w2) != fingerprint(w13, neg)


def test_weighted_sums_match_the_definition_at_the_extremes():
    from elastic_ep.checkpoint import weighted_bit_sums

    n = 70000  # past the position-weight period
    bits = torch.full((2, n), -(1 << 15), dtype=torch.int16)
    bits[1] = (1 << 15) - 1
    weights = (torch.arange(n) % 65521 + 1).to(torch.int64)
    want = [int((bits[r].to(torch.int64) * weights).sum()) for r in range(2)]
    assert weighted_bit_sums(bits).tolist() == want


def test_fingerprint_sums_equal_rows_on_packed_and_strided_rows():
    from elastic_ep.checkpoint import fingerprint_sums, fingerprints_from_sums

    rows = torch.randint(0, 256, (5, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    wide = torch.zeros(5, 96, dtype=torch.uint8)
    wide[:, 16:80] = rows
    strided = wide[:, 16:80]
    assert fingerprints_from_sums(fingerprint_sums(strided)) == fingerprint_rows(rows)
    assert fingerprint_rows(rows) == [fingerprint_row(r) for r in rows]
