"""Expert geometry from a checkpoint's config.json (and its tensor names): ModelSpec and naming preset; pure.

Families (``model_type``): Mixtral, Qwen2/3-MoE (``num_experts`` or transformers 5's
``num_local_experts``), Qwen3-Next, DeepSeek-V2/V3 and Kimi-K2 (FP8 ``quantization_config``,
MTP layers), GLM-4-MoE, gpt-oss (MXFP4, biases), Llama-4 (text, or multimodal with
``text_config``), OLMoE, ERNIE-4.5-MoE, HunYuan-MoE, Jamba, LFM2-MoE, AFMoE, EXAONE-MoE,
GraniteMoE (and -Shared, -Hybrid), JetMoE, DBRX (``ffn_config``), and what ``write_checkpoint``
writes (``elastic_ep`` key). MoE layers come from the family's rule (``first_k_dense_replace``,
``moe_layer_freq``, ``mlp_only_layers``, ``decoder_sparse_step``, ``num_dense_layers``,
``mlp_layer_types``, ``moe_layer_start_index``/``end``/``interval``,
``interleave_moe_layer_step``/``moe_layers``, ``expert_layer_period``/``offset``). Parts of
a layer outside its routed experts stay with the serving engine: shared experts (counted in
``shared_experts``), JetMoE's per-layer output bias. Reads JSON only: the index, or a lone
shard's header.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Callable, Optional

from ..config import ModelSpec
from ..errors import CheckpointError, ConfigError
from .formats import FLOAT_DTYPES
from .hub import PathLike, resolve_checkpoint
from .layouts import PRESETS, Layout, choose_variant

CONFIG_FILE = "config.json"


def tensor_names(folder: Path) -> set[str]:
    """Every tensor name of a checkpoint: from its index, else from a lone shard's header (JSON only)."""
    index = folder / "model.safetensors.index.json"
    try:
        if index.exists():
            weight_map = json.loads(index.read_text()).get("weight_map", {})
            return set(weight_map) if isinstance(weight_map, dict) else set()
        single = folder / "model.safetensors"
        if single.exists():
            with open(single, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                return set(json.loads(f.read(min(n, 100 << 20)))) - {"__metadata__"}
    except (OSError, ValueError, AttributeError, struct.error):
        pass  # the reader reports a broken index or shard, naming it
    return set()


class _Config:
    """config.json values with errors that name the missing or bad key."""

    def __init__(self, data: dict, path: str):
        self.data, self.path = data, path

    def has(self, key: str) -> bool:
        return self.data.get(key) is not None

    def get(self, key: str, default=None):
        value = self.data.get(key)
        return default if value is None else value

    def int(self, *keys: str) -> int:
        for key in keys:
            value = self.data.get(key)
            if value is not None:
                if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                    raise CheckpointError(f"{self.path}: {key}={value!r} is not a non-negative int")
                return value
        raise CheckpointError(f"{self.path} lacks {' or '.join(keys)}, needed to tell the expert geometry")


def _moe_layers(c: _Config, family: str, num_layers: int) -> list[int]:
    """Checkpoint indices of the MoE layers among ``num_layers`` decoder layers (family rule)."""
    rng = range(num_layers)
    if family in ("deepseek", "glm4"):
        first, freq = c.int("first_k_dense_replace") if c.has("first_k_dense_replace") else 0, c.get("moe_layer_freq", 1)
        return [i for i in rng if i >= first and i % max(1, freq) == 0]
    if family == "qwen":
        sparse_step, dense = c.get("decoder_sparse_step", 1), set(c.get("mlp_only_layers", []) or [])
        return [i for i in rng if i not in dense and (i + 1) % max(1, sparse_step) == 0]
    if family == "num_dense":  # LFM2-MoE, AFMoE
        return [i for i in rng if i >= c.get("num_dense_layers", 0)]
    if family == "exaone":  # mlp_layer_types wins over first_k_dense_replace (transformers' default 1)
        types = c.get("mlp_layer_types")
        if isinstance(types, list):
            return [i for i in rng if i < len(types) and types[i] == "sparse"]
        return [i for i in rng if i >= c.get("first_k_dense_replace", 1)]
    if family == "ernie":
        start, end = c.get("moe_layer_start_index", 0), c.get("moe_layer_end_index", num_layers - 1)
        start, end = (min(start) if isinstance(start, list) else start), (max(end) if isinstance(end, list) else end)
        end = num_layers - 1 if end < 0 else end
        return [i for i in rng if (i + 1) % max(1, c.get("moe_layer_interval", 1)) == 0 and start <= i <= end]
    if family == "llama4":
        if isinstance(c.get("moe_layers"), list):
            return sorted(int(i) for i in c.get("moe_layers"))
        step = max(1, c.get("interleave_moe_layer_step", 1))
        return list(range(step - 1, num_layers, step))
    if family == "jamba":
        period, offset = c.get("expert_layer_period", 1), c.get("expert_layer_offset", 0)
        return [i for i in rng if i % max(1, period) == offset]
    return list(rng)


# model_type -> (family rule, preset, experts key(s), intermediate key(s), shared experts)
_FAMILIES: dict[str, tuple[str, str, tuple[str, ...], tuple[str, ...], Callable[[_Config], int]]] = {}


def _family(types: tuple[str, ...], rule: str, preset: str, experts: tuple[str, ...], inter: tuple[str, ...],
            shared: Callable[[_Config], int] = lambda c: 0) -> None:
    for t in types:
        _FAMILIES[t] = (rule, preset, experts, inter, shared)


_family(("mixtral", "minimax"), "all", "mixtral", ("num_local_experts",), ("intermediate_size",))
_family(("qwen2_moe", "qwen3_moe", "qwen3_next"), "qwen", "qwen", ("num_experts", "num_local_experts"),
        ("moe_intermediate_size",), lambda c: int(c.get("shared_expert_intermediate_size", 0) > 0))
_family(("deepseek_v2", "deepseek_v3", "kimi_k2"), "deepseek", "deepseek", ("n_routed_experts",),
        ("moe_intermediate_size",), lambda c: c.get("n_shared_experts", 0))
_family(("glm4_moe",), "glm4", "deepseek", ("n_routed_experts",), ("moe_intermediate_size",),
        lambda c: c.get("n_shared_experts", 0))
_family(("gpt_oss",), "all", "gpt-oss", ("num_local_experts",), ("intermediate_size",))
_family(("llama4_text", "llama4"), "llama4", "llama4", ("num_local_experts",), ("intermediate_size",), lambda c: 1)
_family(("olmoe",), "all", "deepseek", ("num_experts",), ("intermediate_size",))
_family(("ernie4_5_moe",), "ernie", "deepseek", ("moe_num_experts",), ("moe_intermediate_size",),
        lambda c: c.get("moe_num_shared_experts", 0))
_family(("hunyuan_v1_moe",), "all", "deepseek", ("num_experts",), ("intermediate_size",),
        lambda c: c.get("num_shared_expert", 0) if c.get("use_mixed_mlp_moe") else 0)
_family(("jamba",), "jamba", "jamba", ("num_experts",), ("intermediate_size",))
_family(("lfm2_moe",), "num_dense", "lfm2", ("num_experts",), ("moe_intermediate_size",))
_family(("afmoe",), "num_dense", "deepseek", ("num_experts",), ("moe_intermediate_size",),
        lambda c: c.get("num_shared_experts", 0))
_family(("exaone_moe",), "exaone", "deepseek", ("num_experts",), ("moe_intermediate_size",),
        lambda c: c.get("num_shared_experts", 0))
_family(("granitemoe", "granitemoeshared", "granitemoehybrid"), "all", "granitemoe", ("num_local_experts",),
        ("intermediate_size",), lambda c: int(c.get("shared_intermediate_size", 0) > 0))
_family(("jetmoe",), "all", "jetmoe", ("num_local_experts",), ("intermediate_size",))
_family(("dbrx",), "all", "dbrx", ("moe_num_experts",), ("ffn_hidden_size",))


def _quant(c: _Config) -> dict:
    """ModelSpec fields of the checkpoint's ``quantization_config`` (none, fp8, mxfp4, int4)."""
    q = c.get("quantization_config")
    if q is None:
        return {}
    method = q.get("quant_method") if isinstance(q, dict) else q
    where = f"{c.path}: quantization_config"
    if method == "fp8":
        block = q.get("weight_block_size")
        if not (isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
            raise CheckpointError(f"{where}.weight_block_size={block!r} is not two positive ints (per-tensor FP8 "
                                  f"is not supported)")
        return {"quant": "fp8", "block": tuple(block)}
    if method == "mxfp4":
        return {"quant": "mxfp4"}
    if method == "compressed-tensors":
        if q.get("format") != "pack-quantized":
            raise CheckpointError(f"{where}.format={q.get('format')!r}: only 'pack-quantized' is read")
        weights = [g.get("weights") or {} for g in (q.get("config_groups") or {}).values() if isinstance(g, dict)]
        if not weights or any(w.get("num_bits") != 4 for w in weights):
            raise CheckpointError(f"{where}.config_groups: only 4-bit pack-quantized weights are read, got "
                                  f"{[w.get('num_bits') for w in weights]}")
        return {"quant": "int4", "group_size": int(weights[0].get("group_size") or 128)}
    raise CheckpointError(f"{where}.quant_method={method!r} is unknown; expected fp8, mxfp4 or compressed-tensors")


def _mtp_layers(c: _Config, names: set[str], layout: Layout, start: int) -> list[int]:
    """DeepSeek's multi-token-prediction layers after the decoder ones, where the checkpoint holds their experts."""
    out = []
    for i in range(start, start + c.get("num_nextn_predict_layers", 0)):
        if choose_variant(layout, names, i).first_name(i) in names:
            out.append(i)
    return out


def read_config(folder: Path) -> dict:
    """A checkpoint's config.json as a dict; CheckpointError when missing or malformed."""
    path = folder / CONFIG_FILE
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise CheckpointError(f"no {CONFIG_FILE} in {str(folder)!r}") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{str(path)!r} is not valid JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise CheckpointError(f"{str(path)!r} is not a JSON object")
    return config


def read_spec(checkpoint: PathLike) -> tuple[ModelSpec, str]:
    """(ModelSpec, preset name) of a checkpoint folder or hub repo id, from its config.json.

    Raises CheckpointError naming the key when the geometry cannot be told.
    """
    folder = resolve_checkpoint(checkpoint)
    data = read_config(folder)
    path = repr(str(folder / CONFIG_FILE))
    if isinstance(data.get("text_config"), dict) and "model_type" in data["text_config"]:  # multimodal (Llama-4)
        outer = {k: data.get(k) for k in ("dtype", "torch_dtype", "quantization_config")}
        data = {**outer, **{k: v for k, v in data["text_config"].items() if v is not None}}
    if isinstance(data.get("ffn_config"), dict):  # DBRX: expert keys nested
        data = {**data["ffn_config"], **data}
    c = _Config(data, path)
    dtype = c.get("torch_dtype", c.get("dtype", "bfloat16"))
    dtype = dtype if dtype in FLOAT_DTYPES else "bfloat16"
    if isinstance(c.get("elastic_ep"), dict):  # written by write_checkpoint: the spec itself
        fields = dict(c.get("elastic_ep"))
        preset = fields.pop("preset", "deepseek")
        fields = {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}
        return _spec(fields, path), preset
    model_type = c.get("model_type")
    if model_type is None:  # older or hand-written configs: tell the family by its keys
        model_type = next((t for key, t in (("n_routed_experts", "deepseek_v3"), ("num_local_experts", "mixtral"),
                                            ("moe_intermediate_size", "qwen3_moe")) if c.has(key)), None)
    if model_type not in _FAMILIES:
        raise CheckpointError(f"cannot tell the expert geometry from {path}: model_type={model_type!r} is not one "
                              f"of {sorted(_FAMILIES)}")
    rule, preset, experts_keys, inter_keys, shared = _FAMILIES[model_type]
    experts, inter = c.int(*experts_keys), c.int(*inter_keys)
    hidden, decoder_layers = c.int("hidden_size", "d_model"), c.int("num_hidden_layers", "n_layers")
    layers = _moe_layers(c, rule, decoder_layers)
    if rule == "deepseek":
        layers += _mtp_layers(c, tensor_names(folder), PRESETS[preset], decoder_layers)
    if not layers:
        raise CheckpointError(f"{path}: no MoE layer among {decoder_layers} layers under model_type={model_type!r}'s "
                              f"rule; check {list(inter_keys)} and the layer keys")
    fields = dict(num_layers=len(layers), num_experts=experts, hidden=hidden, intermediate=inter, dtype=dtype,
                  first_layer=layers[0], num_groups=c.get("n_group", 1) if experts % c.get("n_group", 1) == 0 else 1,
                  shared_experts=int(shared(c)), bias=model_type == "gpt_oss", **_quant(c))
    if layers != list(range(layers[0], layers[0] + len(layers))):
        fields["moe_layers"] = tuple(layers)
    return _spec(fields, path), preset


def _spec(fields: dict, path: str) -> ModelSpec:
    try:
        return ModelSpec(**fields)
    except (ConfigError, TypeError) as exc:
        raise CheckpointError(f"{path} gives an impossible expert geometry: {exc}") from exc


def spec_or_none(checkpoint: Optional[PathLike]) -> Optional[tuple[ModelSpec, str]]:
    """``read_spec`` of a checkpoint that has a config.json, else None."""
    if checkpoint is None:
        return None
    folder = resolve_checkpoint(checkpoint)
    return read_spec(folder) if (folder / CONFIG_FILE).exists() else None
