"""``elastic-ep make-checkpoint``: folders transformers loads (config and experts), FP8 experts, and defaults that work
together."""

from __future__ import annotations

import pytest
import torch

from elastic_ep.checkpoint import (FAMILIES, CheckpointReader, expected_bundle, expected_fingerprints, read_spec,
                                   to_row)
from elastic_ep.cli import _FAMILY_PRESET, main
from elastic_ep.serving.weights import layer_weights

transformers = pytest.importorskip("transformers")


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


def _assert_transformers_loads_the_experts(folder, spec) -> None:
    """from_pretrained builds the family's model from the folder, and its experts hold the written ones, bit-exact
    (transformers' own dequant of MXFP4; FP8 loading needs accelerate and is left to the config check)."""
    kw = {"quantization_config": transformers.Mxfp4Config(dequantize=True)} if spec.quant == "mxfp4" else {}
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, **kw)
    layers = [layer.mlp.experts for layer in model.model.layers if hasattr(layer.mlp, "experts")]
    assert len(layers) == spec.num_layers
    for layer, experts in enumerate(layers):
        bundles = [expected_bundle(spec, layer, e) for e in range(spec.num_experts)]
        if spec.quant == "mxfp4":  # dequantized as served: gate/up interleaved as held, then reordered
            rows = torch.stack([to_row(b, spec.expert_format) for b in bundles])
            w = layer_weights(rows, spec.expert_format, spec.dtype, interleaved=True)
            inter = torch.stack([torch.stack(x.chunk(2), dim=1).reshape(x.shape) for x in w["w13"]])
            want = {"gate_up_proj": inter, "down_proj": w["w2"]}
        else:
            want = {"gate_up_proj": torch.stack([b["w13"] for b in bundles]),
                    "down_proj": torch.stack([b["w2"] for b in bundles])}
        if spec.bias:  # gpt-oss: [E, H, 2I] / [E, I, H], gate at even columns and up at odd
            want = {k: v.transpose(1, 2) for k, v in want.items()}
            if spec.quant == "none":
                w13 = want["gate_up_proj"]
                want["gate_up_proj"] = torch.stack([w13[..., : spec.intermediate], w13[..., spec.intermediate:]],
                                                   dim=-1).flatten(-2)
        for name, value in want.items():
            assert torch.equal(_bits(getattr(experts, name).detach()), _bits(value)), (layer, name)


def test_make_checkpoint_lists_the_families_it_writes():
    assert sorted(_FAMILY_PRESET) == sorted(FAMILIES)


@pytest.mark.parametrize("args, model_type, first, preset", [
    (["--family", "mixtral"], "mixtral", 0, "mixtral"),
    (["--preset", "mixtral"], "mixtral", 0, "mixtral"),  # the family follows the naming; first layer 0
    (["--family", "qwen3_moe"], "qwen3_moe", 0, "qwen"),
    ([], "deepseek_v3", 1, "deepseek"),
    (["--quant", "fp8"], "deepseek_v3", 1, "deepseek"),
    (["--family", "gpt_oss", "--quant", "mxfp4", "--intermediate", "64"], "gpt_oss", 0, "gpt-oss"),
    (["--family", "gpt_oss"], "gpt_oss", 0, "gpt-oss"),
])
def test_make_checkpoint_defaults_work_and_transformers_loads_the_config(tmp_path, capsys, args, model_type, first,
                                                                         preset):
    folder = tmp_path / "ckpt"
    # 2 layers: fewer than the default 4 shards would need
    assert main(["make-checkpoint", str(folder), "--layers", "2", "--experts", "4", "--hidden", "64",
                 "--intermediate", "32", *args]) == 0
    assert f"preset {preset}" in capsys.readouterr().out
    config = transformers.AutoConfig.from_pretrained(folder)
    assert config.model_type == model_type
    spec, got_preset = read_spec(folder)
    assert spec.first_layer == first and got_preset == preset
    assert len(list(folder.glob("*.safetensors"))) == 2
    assert (CheckpointReader(folder, spec, preset).fingerprints() == expected_fingerprints(spec)).all()
    if "fp8" in args:
        assert spec.quant == "fp8" and spec.block == (32, 32)
        assert config.quantization_config["weight_block_size"] == [32, 32]
    else:
        _assert_transformers_loads_the_experts(folder, spec)


def test_make_checkpoint_bad_format_is_a_usage_error(tmp_path, capsys):
    code = main(["make-checkpoint", str(tmp_path / "c"), "--quant", "mxfp4", "--intermediate", "88",
                 "--layers", "2"])
    assert code == 2 and "does not divide 88" in capsys.readouterr().err
