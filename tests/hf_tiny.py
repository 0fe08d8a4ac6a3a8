"""Tiny real MoE models written by transformers (Mixtral, Qwen3-MoE, DeepSeek-V3, gpt-oss; DBRX and multimodal
Llama-4 builders) and their own expert blocks; a gpt-oss one re-saved with MXFP4 experts in the released layout."""

from __future__ import annotations

from pathlib import Path

import torch

FAMILIES = ("mixtral", "qwen3_moe", "deepseek_v3")


def tiny_config(family: str):
    """A tiny config of ``family``: hidden 32, 8 routed experts of intermediate 16, top-2 (DeepSeek: 1 dense layer)."""
    import transformers

    common = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                  vocab_size=64, num_experts_per_tok=2)
    if family == "mixtral":
        return transformers.MixtralConfig(num_local_experts=8, intermediate_size=16, **common)
    if family == "qwen3_moe":
        return transformers.Qwen3MoeConfig(num_experts=8, moe_intermediate_size=16, intermediate_size=48,
                                           norm_topk_prob=True, **common)
    if family == "deepseek_v3":
        return transformers.DeepseekV3Config(
            n_routed_experts=8, moe_intermediate_size=16, intermediate_size=48, first_k_dense_replace=1,
            n_group=2, topk_group=1, n_shared_experts=1, kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8,
            qk_nope_head_dim=8, v_head_dim=8, **common)
    raise ValueError(family)


def tiny_dbrx(hidden: int, layers: int, experts: int, intermediate: int):
    """A tiny DbrxForCausalLM: its expert keys sit in ``ffn_config``, its attention's in ``attn_config``."""
    import transformers

    config = transformers.DbrxConfig(
        d_model=hidden, n_heads=2, n_layers=layers, vocab_size=64, max_seq_len=64,
        ffn_config=dict(moe_num_experts=experts, ffn_hidden_size=intermediate, moe_top_k=2),
        attn_config=dict(kv_n_heads=1, rope_theta=10000.0))  # 5.25's attention needs rope_theta given
    return transformers.DbrxForCausalLM(config)


def tiny_llama4_multimodal(**text):
    """A Llama4ForConditionalGeneration (text model from ``text``, a one-layer vision tower of width 16): saved
    with its text model's names under ``language_model.`` and its config under ``text_config``."""
    import transformers

    vision = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, image_size=28,
                  patch_size=14, projector_input_dim=32, projector_output_dim=32, vision_output_dim=32,
                  pixel_shuffle_ratio=0.5)
    return transformers.Llama4ForConditionalGeneration(transformers.Llama4Config(text_config=text,
                                                                                 vision_config=vision))


def write_tiny_model(family: str, folder, seed: int = 0) -> Path:
    """Save a randomly initialised tiny ``family`` model in bfloat16 with save_pretrained; returns the folder."""
    import transformers

    torch.manual_seed(seed)
    cls = {"mixtral": transformers.MixtralForCausalLM, "qwen3_moe": transformers.Qwen3MoeForCausalLM,
           "deepseek_v3": transformers.DeepseekV3ForCausalLM}[family]
    model = cls(tiny_config(family))
    with torch.no_grad():  # init std 0.02 gives outputs near bf16's floor; widen the experts' spread
        for name, p in model.named_parameters():
            if ".experts." in name:
                p.normal_(0.0, 0.2)
    model.to(torch.bfloat16).save_pretrained(str(folder))
    return Path(folder)


def write_tiny_gpt_oss(folder, mxfp4: bool = False, seed: int = 0) -> Path:
    """A tiny gpt-oss (hidden 64, 8 experts of intermediate 32, biases) saved by transformers in bfloat16; with
    ``mxfp4`` its experts re-saved as the released checkpoints hold them (``*_blocks [E, rows, cols/32, 16]``,
    ``*_scales [E, rows, cols/32]`` E8M0, ``quantization_config.quant_method = mxfp4``), biases kept."""
    import json

    import transformers
    from safetensors.torch import load_file, save_file

    torch.manual_seed(seed)
    cfg = transformers.GptOssConfig(hidden_size=64, intermediate_size=32, num_local_experts=8, num_experts_per_tok=2,
                                    num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                                    vocab_size=64, layer_types=["full_attention"] * 2)
    model = transformers.GptOssForCausalLM(cfg)
    with torch.no_grad():  # init std 0.02 gives outputs near bf16's floor; widen the experts' spread
        for name, p in model.named_parameters():
            if ".experts." in name:
                p.normal_(0.0, 0.3)
    model.to(torch.bfloat16).save_pretrained(str(folder))
    folder = Path(folder)
    if mxfp4:
        shard = folder / "model.safetensors"
        tensors = load_file(str(shard))
        for name in [n for n in tensors if n.endswith((".gate_up_proj", ".down_proj"))]:
            blocks, scales = quantize_mxfp4(tensors.pop(name).transpose(1, 2))  # stored [E, cols, rows]
            tensors[f"{name}_blocks"], tensors[f"{name}_scales"] = blocks, scales
        save_file(tensors, str(shard), metadata={"format": "pt"})
        config = json.loads((folder / "config.json").read_text())
        config["quantization_config"] = {"quant_method": "mxfp4"}
        (folder / "config.json").write_text(json.dumps(config))
    return folder


_E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def quantize_mxfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[E, rows, cols] -> (blocks [E, rows, cols/32, 16] uint8, scales [E, rows, cols/32] uint8): OCP MXFP4,
    scale 2^(floor(log2 amax) - 2) per 32 values (6 = 1.5 * 2^2 is E2M1's largest), nearest code, low nibble first."""
    g = w.float().unflatten(-1, (-1, 32))
    exp = torch.floor(torch.log2(g.abs().amax(-1).clamp_min(2.0 ** -126))) - 2
    codes = (g / torch.exp2(exp).unsqueeze(-1)).unsqueeze(-1).sub(torch.tensor(_E2M1)).abs().argmin(-1)
    codes = codes.to(torch.uint8)
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).contiguous(), (exp + 127).to(torch.uint8).contiguous()


def load_moe_blocks(folder, dtype: torch.dtype) -> list:
    """The model's own sparse-MoE blocks, one per MoE layer in order (``.gate`` or ``.router`` routes, ``.experts``
    computes). An MXFP4 gpt-oss folder is loaded as transformers does without its kernels: dequantized to ``dtype``."""
    import transformers

    kw = {}
    if "quantization_config" in transformers.AutoConfig.from_pretrained(str(folder)).to_dict():
        kw["quantization_config"] = transformers.Mxfp4Config(dequantize=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, **kw)
    return [layer.mlp for layer in model.model.layers if hasattr(layer.mlp, "experts")]


def block_experts(block, hidden: torch.Tensor, topk_ids, topk_weights) -> torch.Tensor:
    """The block's own routed-experts computation for given router decisions: [T, H] in the block's dtype.

    Every family's sparse-MoE block in transformers 5 calls ``self.experts(hidden, top_k_index, top_k_weights)``
    after its router; calling it with our decisions skips only the router (and DeepSeek's shared experts).
    """
    with torch.no_grad():
        return block.experts(hidden.to(block.experts.down_proj.dtype), torch.as_tensor(topk_ids),
                             torch.as_tensor(topk_weights).to(torch.float32))


def block_route(block, hidden: torch.Tensor):
    """The block's own router decisions for ``hidden``: (topk_ids [T, k] int64, topk_weights [T, k] fp32)."""
    with torch.no_grad():
        router = block.gate if hasattr(block, "gate") else block.router  # gpt-oss: router
        _, weights, ids = router(hidden.to(block.experts.down_proj.dtype))
    return ids.to(torch.int64).numpy(), weights.float().numpy()


def hf_spec(family: str, folder):
    """(ModelSpec, naming preset) of a saved tiny model, from transformers' own reading of its config.

    Not ``storage.read_spec``: transformers 5.25 writes ``num_local_experts`` into Qwen3-MoE
    configs too, which read_spec takes for Mixtral (reported to the integrator).
    """
    import transformers

    from elastic_ep.config import ModelSpec

    cfg = transformers.AutoConfig.from_pretrained(str(folder))
    first = getattr(cfg, "first_k_dense_replace", 0) or 0
    inter = cfg.intermediate_size if family == "mixtral" else cfg.moe_intermediate_size
    spec = ModelSpec(num_layers=cfg.num_hidden_layers - first, num_experts=cfg.num_local_experts,
                     hidden=cfg.hidden_size, intermediate=inter, dtype="bfloat16", first_layer=first,
                     num_groups=getattr(cfg, "n_group", None) or 1)
    return spec, {"mixtral": "mixtral", "qwen3_moe": "qwen", "deepseek_v3": "deepseek"}[family]
