"""Quantized expert bundles in the released layouts (DeepSeek-V3 FP8, gpt-oss MXFP4, INT4 pack-quantized), the hub
cache, make-checkpoint's configs, and bad input: each a CheckpointError naming the tensor or key."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from elastic_ep.checkpoint import (PRESETS, CheckpointReader, Layout, expected_bundle, expected_fingerprints, read_spec,
                                   write_checkpoint)
from elastic_ep.config import ClusterConfig, ModelSpec
from elastic_ep.errors import CheckpointError, ConfigError

transformers = pytest.importorskip("transformers")

FP8 = ModelSpec(num_layers=3, num_experts=4, hidden=64, intermediate=32, first_layer=1, quant="fp8", block=(16, 16),
                num_groups=2)
MXFP4 = ModelSpec(num_layers=2, num_experts=4, hidden=64, intermediate=64, quant="mxfp4", bias=True)
INT4 = ModelSpec(num_layers=2, num_experts=4, hidden=64, intermediate=32, quant="int4", group_size=16)


def _all_tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in folder.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


def test_deepseek_v3_fp8_released_layout(tmp_path):
    folder = write_checkpoint(tmp_path / "v3", FP8, "deepseek", num_shards=2, family="deepseek_v3")
    config = transformers.AutoConfig.from_pretrained(folder)  # transformers loads what make-checkpoint writes
    assert config.model_type == "deepseek_v3" and config.first_k_dense_replace == 1
    assert config.quantization_config["weight_block_size"] == [16, 16]
    data = json.loads((folder / "config.json").read_text())
    del data["elastic_ep"]  # the family's keys alone tell the geometry
    (folder / "config.json").write_text(json.dumps(data))
    spec, preset = read_spec(folder)
    assert spec == FP8 and preset == "deepseek"
    files = _all_tensors(folder)
    stem = "model.layers.2.mlp.experts.3"  # MoE layer 1, expert 3
    assert files[f"{stem}.gate_proj.weight"].dtype == torch.float8_e4m3fn
    assert files[f"{stem}.gate_proj.weight_scale_inv"].shape == (2, 4)  # [I/16, H/16], float32
    got = CheckpointReader(folder, spec, preset).read_bundles([(1, 3)])[(1, 3)]
    assert torch.equal(_bits(got["w13"]), _bits(torch.cat([files[f"{stem}.gate_proj.weight"],
                                                           files[f"{stem}.up_proj.weight"]])))
    assert torch.equal(_bits(got["w13_scale_inv"]), _bits(torch.cat([files[f"{stem}.gate_proj.weight_scale_inv"],
                                                                     files[f"{stem}.up_proj.weight_scale_inv"]])))
    assert torch.equal(_bits(got["w2"]), _bits(files[f"{stem}.down_proj.weight"]))
    assert torch.equal(_bits(got["w2_scale_inv"]), _bits(files[f"{stem}.down_proj.weight_scale_inv"]))
    assert (CheckpointReader(folder, spec, preset).fingerprints() == expected_fingerprints(FP8)).all()


def test_gpt_oss_mxfp4_fused_with_biases(tmp_path):
    folder = write_checkpoint(tmp_path / "oss", MXFP4, "gpt-oss", num_shards=2, family="gpt_oss")
    assert transformers.AutoConfig.from_pretrained(folder).quantization_config["quant_method"] == "mxfp4"
    assert read_spec(folder) == (MXFP4, "gpt-oss")
    files = _all_tensors(folder)
    experts = "model.layers.1.mlp.experts"
    assert files[f"{experts}.gate_up_proj_blocks"].shape == (4, 128, 2, 16)  # [E, 2I, H/32, 16] as released
    assert files[f"{experts}.down_proj_scales"].shape == (4, 64, 2)
    reader = CheckpointReader(folder, MXFP4, "gpt-oss")
    got = reader.read_bundles([(1, 2)])[(1, 2)]
    for tensor, name in (("w13_blocks", "gate_up_proj_blocks"), ("w13_scales", "gate_up_proj_scales"),
                         ("w13_bias", "gate_up_proj_bias"), ("w2_blocks", "down_proj_blocks"),
                         ("w2_scales", "down_proj_scales"), ("w2_bias", "down_proj_bias")):
        assert torch.equal(_bits(got[tensor]), _bits(files[f"{experts}.{name}"][2])), tensor
    before = reader.bytes_read
    reader.read_experts([(1, 0)])  # a slice of each fused tensor: one expert's bytes, not the layer's
    assert reader.bytes_read - before == MXFP4.expert_format.data_bytes


def test_int4_pack_quantized_bundle(tmp_path):
    folder = write_checkpoint(tmp_path / "int4", INT4, "qwen", num_shards=1)
    files = _all_tensors(folder)
    stem = "model.layers.1.mlp.experts.0"
    assert files[f"{stem}.up_proj.weight_packed"].dtype == torch.int32
    assert files[f"{stem}.up_proj.weight_shape"].tolist() == [32, 64]
    got = CheckpointReader(folder, INT4, "qwen").read_bundles([(1, 0)])[(1, 0)]
    assert got["w13_shape"].tolist() == [[32, 64], [32, 64]] and got["w2_shape"].tolist() == [64, 32]
    assert torch.equal(got["w13_scale"], torch.cat([files[f"{stem}.gate_proj.weight_scale"],
                                                    files[f"{stem}.up_proj.weight_scale"]]))
    # some quantizers write weight_shape as int32: read as the same int64 values
    from safetensors.torch import load_file, save_file

    shard = folder / "model.safetensors"
    tensors = load_file(shard)
    tensors[f"{stem}.gate_proj.weight_shape"] = tensors[f"{stem}.gate_proj.weight_shape"].to(torch.int32)
    save_file(tensors, shard)
    again = CheckpointReader(folder, INT4, "qwen").read_bundles([(1, 0)])[(1, 0)]
    assert again["w13_shape"].dtype == torch.int64 and again["w13_shape"].tolist() == [[32, 64], [32, 64]]
    config = {"model_type": "qwen3_moe", "num_experts": 4, "moe_intermediate_size": 32, "hidden_size": 64,
              "num_hidden_layers": 2, "quantization_config": {
                  "quant_method": "compressed-tensors", "format": "pack-quantized",
                  "config_groups": {"group_0": {"weights": {"num_bits": 4, "group_size": 16}}}}}
    (folder / "config.json").write_text(json.dumps(config))
    assert read_spec(folder) == (INT4, "qwen")


def test_user_layout_with_a_prefix_is_accepted_by_cluster_config(tmp_path):
    spec = ModelSpec(num_layers=2, num_experts=4, hidden=16, intermediate=8)
    layout = Layout("vl", fused_gate_up="model.language_model.layers.{L}.mlp.experts.gate_up_proj",
                    fused_down="model.language_model.layers.{L}.mlp.experts.down_proj")
    folder = write_checkpoint(tmp_path / "vl", spec, layout)
    cfg = ClusterConfig(model=spec, checkpoint=str(folder), preset=layout, num_ranks=2, slots_per_rank=2)
    assert cfg.preset == layout
    assert (CheckpointReader(folder, spec, cfg.preset).fingerprints() == expected_fingerprints(spec)).all()


def test_cluster_config_reads_the_geometry_from_the_folder(tmp_path):
    folder = write_checkpoint(tmp_path / "v3", FP8, "deepseek", family="deepseek_v3")
    cfg = ClusterConfig(checkpoint=str(folder), num_ranks=2, slots_per_rank=2)
    assert cfg.model == FP8 and cfg.preset == "deepseek"
    assert cfg.model.expert_bytes == FP8.expert_format.row_bytes > 3 * 64 * 32  # weights plus scales


def test_deepseek_mtp_layer_experts_are_managed(tmp_path):
    spec = ModelSpec(num_layers=3, num_experts=4, hidden=16, intermediate=8, first_layer=1)
    folder = write_checkpoint(tmp_path / "mtp", spec, "deepseek", family="deepseek_v3")
    data = json.loads((folder / "config.json").read_text())
    del data["elastic_ep"]
    data.update(num_hidden_layers=3, num_nextn_predict_layers=1)  # layer 3 is the MTP layer
    (folder / "config.json").write_text(json.dumps(data))
    got, _ = read_spec(folder)
    assert got.checkpoint_layers == (1, 2, 3)


# -- the hub cache ---------------------------------------------------------------------------------


def _hub_cache(root: Path, repo: str, source: Path) -> Path:
    """A hub cache holding ``source``'s files as huggingface_hub lays them out; returns the snapshot folder."""
    cached = root / f"models--{repo.replace('/', '--')}"
    revision = "0123456789abcdef0123456789abcdef01234567"
    snapshot = cached / "snapshots" / revision
    (cached / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    (cached / "refs").mkdir()
    (cached / "refs" / "main").write_text(revision)
    for file in source.iterdir():
        blob = hashlib.sha256(file.read_bytes()).hexdigest()
        shutil.copy(file, cached / "blobs" / blob)
        os.symlink(f"../../blobs/{blob}", snapshot / file.name)
    return snapshot


def test_hub_cache_snapshot_read_as_it_is_and_repo_id_resolved(tmp_path):
    spec = ModelSpec(num_layers=2, num_experts=4, hidden=16, intermediate=8)
    source = write_checkpoint(tmp_path / "src", spec, "mixtral", family="mixtral")
    snapshot = _hub_cache(tmp_path / "hub", "tiny-org/tiny-moe", source)
    assert (CheckpointReader(snapshot, spec, "mixtral").fingerprints() == expected_fingerprints(spec)).all()
    code = ("from elastic_ep.config import ClusterConfig; c = ClusterConfig(checkpoint='tiny-org/tiny-moe', "
            "num_ranks=2, slots_per_rank=2); print(c.checkpoint); print(c.model.num_layers, c.preset)")
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == [str(snapshot.resolve()), "2", "mixtral"]


def test_hub_cache_symlink_into_another_cached_repo_is_refused(tmp_path):
    spec = ModelSpec(num_layers=2, num_experts=4, hidden=16, intermediate=8)
    source = write_checkpoint(tmp_path / "src", spec, "deepseek")
    snapshot = _hub_cache(tmp_path / "hub", "org/a", source)
    other = _hub_cache(tmp_path / "hub", "org/b", source)
    shard = "model-00001-of-00002.safetensors"
    (snapshot / shard).unlink()
    os.symlink(os.path.relpath((other / shard).resolve(), snapshot), snapshot / shard)
    with pytest.raises(CheckpointError, match=f"'{shard}' resolves to .*models--org--b.*outside"):
        CheckpointReader(snapshot, spec)


def test_unknown_repo_id_offline_is_a_checkpoint_error(tmp_path, monkeypatch):
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(CheckpointError, match="'nobody/nothing' is not a folder, not in the hub cache"):
        ClusterConfig(checkpoint="nobody/nothing")


# -- bad input: CheckpointError naming the tensor or key, before any worker starts ------------------


def _drop(folder: Path, name: str) -> None:
    index = folder / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    del data["weight_map"][name]
    index.write_text(json.dumps(data))


def test_missing_scale_tensor_is_named(tmp_path):
    folder = write_checkpoint(tmp_path / "v3", FP8, "deepseek", family="deepseek_v3")
    _drop(folder, "model.layers.3.mlp.experts.1.up_proj.weight_scale_inv")
    with pytest.raises(CheckpointError, match=r"1 expert tensors missing .*experts\.1\.up_proj\.weight_scale_inv"):
        CheckpointReader(folder, FP8).validate()


def test_misshaped_scale_tensor_is_named(tmp_path):
    folder = write_checkpoint(tmp_path / "v3", FP8, "deepseek", family="deepseek_v3")
    wrong = ModelSpec(**{**FP8.__dict__, "block": (32, 16)})  # scales of 32-row blocks expected
    with pytest.raises(CheckpointError, match=r"gate_proj\.weight_scale_inv' .* has shape \(2, 4\), the model spec "
                                              r"needs \(1, 4\)"):
        CheckpointReader(folder, wrong).validate()


def test_block_size_that_does_not_divide_the_weight(tmp_path):
    folder = write_checkpoint(tmp_path / "v3", FP8, "deepseek", family="deepseek_v3")
    data = json.loads((folder / "config.json").read_text())
    del data["elastic_ep"]
    data["quantization_config"]["weight_block_size"] = [24, 16]
    (folder / "config.json").write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="block size 24 does not divide 32"):
        read_spec(folder)
    with pytest.raises(ConfigError, match="block size 24 does not divide"):
        ModelSpec(hidden=64, intermediate=32, quant="fp8", block=(24, 16))


def test_fused_tensor_whose_expert_dimension_disagrees(tmp_path):
    spec = ModelSpec(num_layers=2, num_experts=4, hidden=64, intermediate=64, quant="mxfp4", bias=True)
    folder = write_checkpoint(tmp_path / "oss", spec, "gpt-oss", family="gpt_oss")
    data = json.loads((folder / "config.json").read_text())
    del data["elastic_ep"]
    data["num_local_experts"] = 6
    (folder / "config.json").write_text(json.dumps(data))
    six, preset = read_spec(folder)
    with pytest.raises(CheckpointError, match=r"fused tensor 'model\.layers\.0\.mlp\.experts\.gate_up_proj_blocks' "
                                              r".* holds 4 experts .* the model has 6"):
        CheckpointReader(folder, six, preset).validate()


@pytest.mark.parametrize("config, match", [
    ({"model_type": "deepseek_v3", "n_routed_experts": 8, "moe_intermediate_size": 8, "hidden_size": 16,
      "num_hidden_layers": 2, "quantization_config": {"quant_method": "bitsandbytes"}},
     r"quantization_config\.quant_method='bitsandbytes' is unknown"),
    ({"model_type": "falcon", "hidden_size": 16}, r"model_type='falcon' is not one of"),
    ({"model_type": "deepseek_v3", "n_routed_experts": 8, "moe_intermediate_size": 8, "hidden_size": 16,
      "num_hidden_layers": 2, "first_k_dense_replace": 2}, r"no MoE layer among 2 layers"),
    ({"model_type": "qwen3_moe", "num_experts": 8, "hidden_size": 16, "num_hidden_layers": 2},
     r"lacks moe_intermediate_size"),
    ({"model_type": "jamba", "num_experts": 4, "intermediate_size": 8, "hidden_size": 16,
      "num_hidden_layers": "four"}, r"num_hidden_layers='four' is not a non-negative int"),
])
def test_configs_whose_moe_layers_cannot_be_told(tmp_path, config, match):
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=match):
        read_spec(tmp_path)
    with pytest.raises(CheckpointError, match=match):
        ClusterConfig(checkpoint=str(tmp_path))  # before any worker starts


def test_presets_name_every_family_layout():
    assert PRESETS["lfm2"].tensor_names(1, 2)[0] == "model.layers.1.feed_forward.experts.2.w1.weight"
    with pytest.raises(ConfigError, match="needs {L}, {E}"):
        Layout("bad", "model.layers.{L}.gate.weight", "u.{L}.{E}.weight", "d.{L}.{E}.weight")


def test_expected_bundle_rejects_out_of_range():
    with pytest.raises(ValueError, match=r"\(3, 0\)"):
        expected_bundle(FP8, 3, 0)


@pytest.mark.parametrize("spec, preset, family", [(FP8, "deepseek", "deepseek_v3"), (MXFP4, "gpt-oss", "gpt_oss"),
                                                  (INT4, "qwen", None)])
def test_writer_made_quantized_folders_serve_finite_outputs(tmp_path, spec, preset, family):
    """The writer's scales are a trained model's: dequantized weights of 0.01-1, and the oracle's MoE outputs finite."""
    from elastic_ep.serving.oracle import CheckpointOracle

    folder = write_checkpoint(tmp_path / spec.quant, spec, preset, family=family)
    oracle = CheckpointOracle(str(folder), spec, preset)
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(16, spec.hidden, generator=g).to(torch.bfloat16)
    ids = torch.randint(0, spec.num_experts, (16, 2), generator=g).numpy()
    for layer in range(spec.num_layers):
        w = oracle.experts(layer)
        for p in ("w13", "w2"):
            mags = w[p].float().abs()
            assert torch.isfinite(mags).all(), (layer, p)
            # the bulk as trained weights are; the 3 identity values may scale one block more
            assert 0.01 <= mags.median() <= 1.0 and torch.quantile(mags.flatten()[:2 ** 24], 0.99) <= 2.0, (layer, p)
        out = oracle(layer, hidden, ids, [[0.5, 0.5]] * 16)
        assert torch.isfinite(out).all() and out.abs().max() > 0, layer


@pytest.mark.parametrize("preset", ["dbrx", "granitemoe", "jetmoe", "llama4"])
@pytest.mark.parametrize("spec", [FP8, MXFP4, INT4], ids=["fp8", "mxfp4", "int4"])
def test_quantized_bundles_round_trip_through_fused_layouts(tmp_path, spec, preset):
    """Scales, blocks and packed weights follow their weights through flat, split and transposed fused tensors."""
    folder = write_checkpoint(tmp_path / preset, spec, preset)
    reader = CheckpointReader(folder, spec, preset)
    reader.validate()
    assert (reader.fingerprints() == expected_fingerprints(spec)).all()


def test_dbrx_flat_tensor_whose_expert_count_disagrees(tmp_path):
    spec = ModelSpec(num_layers=2, num_experts=4, hidden=32, intermediate=16)
    folder = write_checkpoint(tmp_path / "dbrx", spec, "dbrx")
    six = ModelSpec(**{**spec.__dict__, "num_experts": 6})
    with pytest.raises(CheckpointError, match=r"fused tensor 'transformer\.blocks\.0\.ffn\.experts\.mlp\.w1' .* holds "
                                              r"4 experts \(shape \(64, 32\), 16 rows each\); the model has 6"):
        CheckpointReader(folder, six, "dbrx").validate()


@pytest.mark.parametrize("kw, match", [
    (dict(fused_gate="a.{L}.w1", fused_down="a.{L}.w2"), "fused_gate and fused_up must be given together"),
    (dict(fused_gate_up="a.{L}.gu", fused_gate="a.{L}.w1", fused_up="a.{L}.v1", fused_down="a.{L}.w2"),
     "not both"),
    (dict(fused_gate="a.{L}.w1", fused_up="a.{L}.v1", fused_down="a.{L}.w2", interleaved=True),
     "interleaved gate/up needs them in one fused tensor"),
    (dict(fused_gate="a.{L}.w1", fused_up="a.{L}.{E}.v1", fused_down="a.{L}.w2"), r"needs \{L\} and no \{E\}"),
    (dict(fused_gate_up="a.{L}.gu", fused_down="a.{L}.d", alternatives=("deepseek",)), "alternatives must be Layouts"),
])
def test_bad_fused_layouts_are_named(kw, match):
    with pytest.raises(ConfigError, match=match):
        Layout("bad", **kw)


def test_layout_variants_pick_what_the_checkpoint_names():
    llama4 = PRESETS["llama4"]
    multimodal = {"language_model.model.layers.1.feed_forward.experts.gate_up_proj": "x"}
    from elastic_ep.checkpoint.layouts import choose_variant
    assert choose_variant(llama4, multimodal, 1).fused_gate_up.startswith("language_model.")
    assert choose_variant(llama4, {}, 1) == llama4.variants()[0]  # nothing named: the first form
    granite = choose_variant(PRESETS["granitemoe"], {"model.layers.0.block_sparse_moe.experts.gate_up_proj": "x"}, 0)
    assert granite.fused_down == "model.layers.{L}.block_sparse_moe.experts.down_proj"
