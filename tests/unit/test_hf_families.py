"""Real checkpoints written by transformers' own save_pretrained, for every MoE family read: geometry from
config.json alone, and every expert tensor bit-exact against safetensors' own read of the files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from elastic_ep.checkpoint import CheckpointReader, read_spec
from tests.hf_tiny import tiny_dbrx, tiny_llama4_multimodal

transformers = pytest.importorskip("transformers")

H, I_MOE, I_DENSE = 32, 8, 24  # hidden, routed-expert and dense intermediate sizes (2I != H: no square ambiguity)
BASE = dict(hidden_size=H, num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=1, vocab_size=64,
            head_dim=16)
MLA = dict(kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8)

# model_type -> (config keys, checkpoint indices of its MoE layers, expert intermediate size)
FAMILIES = {
    "mixtral": (dict(num_local_experts=4, intermediate_size=I_DENSE), [0, 1, 2, 3], I_DENSE),
    "qwen2_moe": (dict(num_experts=4, moe_intermediate_size=I_MOE, intermediate_size=I_DENSE,
                       shared_expert_intermediate_size=I_DENSE, decoder_sparse_step=2), [1, 3], I_MOE),
    "qwen3_moe": (dict(num_experts=4, moe_intermediate_size=I_MOE, intermediate_size=I_DENSE,
                       mlp_only_layers=[1]), [0, 2, 3], I_MOE),
    "qwen3_next": (dict(num_experts=4, moe_intermediate_size=I_MOE, intermediate_size=I_DENSE,
                        shared_expert_intermediate_size=I_MOE, linear_num_value_heads=2, linear_num_key_heads=1,
                        linear_key_head_dim=8, linear_value_head_dim=8,
                        layer_types=["linear_attention", "full_attention"] * 2), [0, 1, 2, 3], I_MOE),
    "deepseek_v2": (dict(n_routed_experts=4, moe_intermediate_size=I_MOE, intermediate_size=I_DENSE,
                         first_k_dense_replace=1, n_shared_experts=1, n_group=2, topk_group=1, **MLA), [1, 2, 3], I_MOE),
    "deepseek_v3": (dict(n_routed_experts=4, moe_intermediate_size=I_MOE, intermediate_size=I_DENSE,
                         first_k_dense_replace=2, n_shared_experts=1, n_group=2, topk_group=1, **MLA), [2, 3], I_MOE),
    "glm4_moe": (dict(n_routed_experts=4, moe_intermediate_size=I_MOE, intermediate_size=I_DENSE,
                      first_k_dense_replace=1, n_shared_experts=1, n_group=1, topk_group=1), [1, 2, 3], I_MOE),
    "gpt_oss": (dict(num_local_experts=4, intermediate_size=I_DENSE,
                     layer_types=["sliding_attention", "full_attention"] * 2), [0, 1, 2, 3], I_DENSE),
    "llama4_text": (dict(num_local_experts=4, intermediate_size=I_DENSE, intermediate_size_mlp=40,
                         interleave_moe_layer_step=2, moe_layers=None), [1, 3], I_DENSE),
    "olmoe": (dict(num_experts=4, intermediate_size=I_DENSE), [0, 1, 2, 3], I_DENSE),
    "ernie4_5_moe": (dict(moe_num_experts=4, moe_intermediate_size=I_MOE, intermediate_size=I_DENSE,
                          moe_layer_start_index=1, moe_num_shared_experts=0), [1, 2, 3], I_MOE),
    "hunyuan_v1_moe": (dict(num_experts=4, moe_topk=2, moe_intermediate_size=I_MOE, intermediate_size=I_DENSE),
                       [0, 1, 2, 3], I_DENSE),
    "jamba": (dict(num_experts=4, intermediate_size=I_DENSE, expert_layer_period=2, expert_layer_offset=1,
                   attn_layer_period=2, attn_layer_offset=1, mamba_d_state=4, mamba_d_conv=2, mamba_expand=1),
              [1, 3], I_DENSE),
    "lfm2_moe": (dict(num_experts=4, moe_intermediate_size=I_MOE, intermediate_size=I_DENSE, num_dense_layers=1,
                      layer_types=["conv", "full_attention", "conv", "full_attention"]), [1, 2, 3], I_MOE),
    "afmoe": (dict(num_experts=4, moe_intermediate_size=I_MOE, intermediate_size=I_DENSE, num_dense_layers=1,
                   num_shared_experts=1), [1, 2, 3], I_MOE),
    "exaone_moe": (dict(num_experts=4, moe_intermediate_size=I_MOE, intermediate_size=I_DENSE,
                        mlp_layer_types=["dense", "sparse", "dense", "sparse"]), [1, 3], I_MOE),
    "granitemoe": (dict(num_local_experts=4, intermediate_size=I_DENSE), [0, 1, 2, 3], I_DENSE),
    "granitemoeshared": (dict(num_local_experts=4, intermediate_size=I_DENSE, shared_intermediate_size=I_MOE),
                         [0, 1, 2, 3], I_DENSE),
    "jetmoe": (dict(num_local_experts=4, intermediate_size=I_DENSE, kv_channels=16, num_key_value_heads=2),
               [0, 1, 2, 3], I_DENSE),
    "dbrx": (dict(), [0, 1, 2, 3], I_DENSE),
    "llama4": (dict(num_local_experts=4, intermediate_size=I_DENSE, intermediate_size_mlp=40,
                    interleave_moe_layer_step=2, moe_layers=None), [1, 3], I_DENSE),  # multimodal
}
SHARED = {"deepseek_v3": 1, "qwen2_moe": 1, "afmoe": 1, "exaone_moe": 1, "granitemoeshared": 1, "llama4": 1,
          "mixtral": 0, "granitemoe": 0, "jetmoe": 0, "dbrx": 0}


def _model(name: str, keys: dict):
    """A tiny random ``name`` model; DBRX and multimodal Llama-4 by their own builders."""
    if name == "dbrx":
        return tiny_dbrx(H, BASE["num_hidden_layers"], 4, I_DENSE)
    if name == "llama4":
        return tiny_llama4_multimodal(**{**BASE, "num_experts_per_tok": 1, **keys})
    config = transformers.AutoConfig.for_model(name, **{**BASE, "num_experts_per_tok": 2, **keys})
    return transformers.AutoModelForCausalLM.from_config(config)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """model_type -> {"original": folder, "fused": folder}: tiny random models saved sharded by transformers."""
    root = tmp_path_factory.mktemp("hf")
    out = {}
    torch.manual_seed(0)
    for name, (keys, _, _) in FAMILIES.items():
        model = _model(name, keys)
        out[name] = {}
        for label, original in (("original", True), ("fused", False)):
            folder = root / f"{name}-{label}"
            model.save_pretrained(folder, max_shard_size="20KB", save_original_format=original)
            assert len(list(folder.glob("*.safetensors"))) > 1  # really sharded
            out[name][label] = folder
    return out


def _file_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint, read whole by safetensors itself."""
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    out = {}
    for file in sorted(set(index.values())):
        with safe_open(str(folder / file), framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def _expected(files: dict, layer: int, expert: int, inter: int, name: str) -> dict[str, torch.Tensor]:
    """An expert's (w13 [2I, H], w2 [H, I], biases) taken from whole tensors, by each family's own convention."""
    dbrx = f"transformer.blocks.{layer}.ffn.experts.mlp"
    if f"{dbrx}.w1" in files:  # [E * I, H] each; w2 holds down transposed
        w1, v1, w2 = (files[f"{dbrx}.{n}"].view(-1, inter, H)[expert] for n in ("w1", "v1", "w2"))
        return {"w13": torch.cat([w1, v1]), "w2": w2.T}
    for stem, gate_up, down in (("block_sparse_moe", "input_linear.weight", "output_linear.weight"),  # GraniteMoE
                                ("mlp", "input_linear.weight", "output_linear.weight")):  # JetMoE
        if f"model.layers.{layer}.{stem}.{gate_up}" in files:  # [E, 2I, H], [E, H, I]
            return {"w13": files[f"model.layers.{layer}.{stem}.{gate_up}"][expert],
                    "w2": files[f"model.layers.{layer}.{stem}.{down}"][expert]}
    for experts in (f"model.layers.{layer}.mlp.experts", f"model.layers.{layer}.feed_forward.experts",
                    f"model.layers.{layer}.block_sparse_moe.experts",
                    f"language_model.model.layers.{layer}.feed_forward.experts"):
        fused = files.get(f"{experts}.gate_up_proj")
        if fused is not None:
            gate_up, down = fused[expert], files[f"{experts}.down_proj"][expert]
            out = {}
            if name in ("gpt_oss", "llama4_text", "llama4"):  # stored [H, 2I] / [I, H]
                gate_up, down = gate_up.T, down.T
            if name == "gpt_oss":  # gate at even columns, up at odd
                gate_up = torch.cat([gate_up[0::2], gate_up[1::2]])
                bias = files[f"{experts}.gate_up_proj_bias"][expert]
                out = {"w13_bias": torch.cat([bias[0::2], bias[1::2]]), "w2_bias": files[f"{experts}.down_proj_bias"][expert]}
            assert gate_up.shape == (2 * inter, H) and down.shape == (H, inter)
            return {"w13": gate_up, "w2": down, **out}
        for gate, up, down in (("gate_proj", "up_proj", "down_proj"), ("w1", "w3", "w2")):
            g = files.get(f"{experts}.{expert}.{gate}.weight")
            if g is not None:
                return {"w13": torch.cat([g, files[f"{experts}.{expert}.{up}.weight"]]),
                        "w2": files[f"{experts}.{expert}.{down}.weight"]}
    raise AssertionError(f"no expert {expert} of layer {layer} in the files")


@pytest.mark.parametrize("label", ["original", "fused"])
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_family_geometry_and_every_expert_bit_exact(saved, name, label):
    folder = saved[name][label]
    _, moe_layers, inter = FAMILIES[name]
    spec, preset = read_spec(folder)
    assert list(spec.checkpoint_layers) == moe_layers
    assert (spec.num_experts, spec.hidden, spec.intermediate) == (4, H, inter)
    assert spec.bias == (name == "gpt_oss")
    reader = CheckpointReader(folder, spec, preset)
    reader.validate()
    files = _file_tensors(folder)
    keys = [(layer, e) for layer in range(spec.num_layers) for e in range(spec.num_experts)]
    got = reader.read_bundles(keys)
    for layer, e in keys:
        want = _expected(files, spec.checkpoint_layers[layer], e, inter, name)
        assert sorted(got[(layer, e)]) == sorted(want)
        for tensor, value in want.items():
            assert torch.equal(got[(layer, e)][tensor].contiguous().view(torch.uint8),
                               value.contiguous().view(torch.uint8)), (layer, e, tensor)


@pytest.mark.parametrize("name", sorted(SHARED))
def test_shared_experts_are_reported_not_managed(saved, name):
    assert read_spec(saved[name]["original"])[0].shared_experts == SHARED[name]
