"""Tiny real MoE models written by transformers (Mixtral, Qwen3-MoE, DeepSeek-V3) and their own expert blocks."""

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


def load_moe_blocks(folder, dtype: torch.dtype) -> list:
    """The model's own sparse-MoE blocks, one per MoE layer in order (``.gate`` routes, ``.experts`` computes)."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype)
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
        _, weights, ids = block.gate(hidden.to(block.experts.down_proj.dtype))
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
