"""``elastic-ep make-checkpoint``: configs transformers loads, FP8 experts, and defaults that work together."""

from __future__ import annotations

import pytest

from elastic_ep.checkpoint import CheckpointReader, expected_fingerprints, read_spec
from elastic_ep.cli import main

transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("args, model_type, first, preset", [
    (["--family", "mixtral"], "mixtral", 0, "mixtral"),
    (["--preset", "mixtral"], "mixtral", 0, "mixtral"),  # the family follows the naming; first layer 0
    (["--family", "qwen3_moe"], "qwen3_moe", 0, "qwen"),
    ([], "deepseek_v3", 1, "deepseek"),
    (["--quant", "fp8"], "deepseek_v3", 1, "deepseek"),
    (["--family", "gpt_oss", "--quant", "mxfp4", "--intermediate", "64"], "gpt_oss", 0, "gpt-oss"),
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


def test_make_checkpoint_bad_format_is_a_usage_error(tmp_path, capsys):
    code = main(["make-checkpoint", str(tmp_path / "c"), "--quant", "mxfp4", "--intermediate", "88",
                 "--layers", "2"])
    assert code == 2 and "does not divide 88" in capsys.readouterr().err
