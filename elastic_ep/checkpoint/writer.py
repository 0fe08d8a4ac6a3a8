"""Synthetic checkpoints whose every expert tensor encodes its identity, in any layout and format, with a config.json
transformers loads.

Values (see ``expected_bundle``): bundle tensor k of (layer, expert) holds, flattened,
``[0] = layer, [1] = expert, [2] = k`` and elsewhere ``n / 64`` with ``n = (i * 7 + layer * 31
+ expert * 17 + k * 5) % 251`` (float dtypes, FP8 rounded from it; uint8 MXFP4 blocks ``n``).
Quantization parts are as a trained model's, so a folder served dequantizes to weights of
0.01-1 and finite outputs: FP8 ``*_scale_inv`` and INT4 ``*_scale`` hold ``(1 + v / 64) / 32``
(0.03-0.15) and E8M0 ``*_scales`` ``119 + v % 7`` (2^-8..2^-2) of the values v above, identity
included; INT4 ``*_packed`` ``n`` in each byte (every nibble used); ``*_shape`` the projections' shapes.
"""

from __future__ import annotations

import functools
import json
import os
import struct
import sys
from pathlib import Path
from typing import Callable, Optional, Union

import numpy as np
import torch

from ..config import ModelSpec
from ..errors import ConfigError
from .bundle import TORCH_DTYPES, to_row
from .fingerprints import fingerprint_row
from .formats import DTYPES, TensorSpec
from .hub import PathLike
from .layouts import Layout, Source, resolve_layout
from .reader import INDEX_FILE, SINGLE_FILE, disk_shape
from .geometry import CONFIG_FILE

_MOD, _STEP = 251, 7
_INV_STEP = pow(_STEP, -1, _MOD)


@functools.lru_cache(maxsize=8)
def _pattern_base(n: int, device: str) -> torch.Tensor:
    """``(7 * i) % 251`` for ``i < n + 251`` as float32 (never mutated; callers slice and convert)."""
    i = torch.arange(n + _MOD, dtype=torch.int64, device=device)
    return ((i * _STEP) % _MOD).to(torch.float32)


def _synthetic(t: TensorSpec, k: int, layer: int, expert: int, spec: ModelSpec, device: str) -> torch.Tensor:
    if t.part == "shape":
        i, h = spec.intermediate, spec.hidden
        value = [[i, h], [i, h]] if t.proj == "w13" else [h, i]
        return torch.tensor(value, dtype=TORCH_DTYPES[t.dtype], device=device)
    n = t.numel
    shift = (((layer * 31 + expert * 17 + k * 5) % _MOD) * _INV_STEP) % _MOD
    flat = _pattern_base(n, str(device))[shift: shift + n].clone()
    ident = torch.tensor([layer, expert, k][:n], dtype=torch.float32, device=device)
    if t.part == "scales":  # E8M0: 2^(s - 127) for s in 119..125, identity only in the pattern's shift
        flat[: len(ident)] = ident
        return flat.remainder_(7).add_(119).to(TORCH_DTYPES[t.dtype]).view(t.shape)
    if t.part == "packed":  # n in each byte of a non-negative int32: all eight int4 values vary
        out = flat.to(torch.int64).mul_(0x01010101).bitwise_and_(0x7FFFFFFF)
        out[: len(ident)] = ident.to(torch.int64)
        return out.to(TORCH_DTYPES[t.dtype]).view(t.shape)
    flat[: len(ident)] = ident
    if t.dtype in ("bfloat16", "float16", "float32", "float8_e4m3fn"):
        if t.part in ("scale_inv", "scale"):  # identity included: no block scaled by a layer or expert id
            flat.div_(64).add_(1).div_(32)
        else:
            flat[len(ident):] /= 64
    return flat.to(TORCH_DTYPES[t.dtype]).view(t.shape)


def expected_bundle(spec: ModelSpec, layer: int, expert: int, device: str = "cpu") -> dict[str, torch.Tensor]:
    """The synthetic bundle {tensor name: tensor} of MoE layer ``layer``, expert ``expert`` (module docstring)."""
    if not (0 <= layer < spec.num_layers and 0 <= expert < spec.num_experts):
        raise ValueError(f"(layer, expert)=({layer}, {expert}) outside spec's {spec.num_layers} layers x "
                         f"{spec.num_experts} experts")
    return {t.name: _synthetic(t, k, layer, expert, spec, device) for k, t in enumerate(spec.expert_format.tensors)}


def expected_expert(spec: ModelSpec, layer: int, expert: int, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(w13 ``[2I, H]``, w2 ``[H, I]``) of an unquantized synthetic expert."""
    b = expected_bundle(spec, layer, expert, device)
    return b["w13"], b["w2"]


def expected_row(spec: ModelSpec, layer: int, expert: int, device: str = "cpu") -> torch.Tensor:
    """The synthetic expert's byte row ``[row_bytes]``."""
    return to_row(expected_bundle(spec, layer, expert, device), spec.expert_format)


def expected_fingerprints(spec: ModelSpec, device: str = "cpu") -> np.ndarray:
    """int64 ``[num_layers, num_experts]`` fingerprints of the synthetic experts of ``spec``."""
    out = np.empty((spec.num_layers, spec.num_experts), dtype=np.int64)
    for layer in range(spec.num_layers):
        for expert in range(spec.num_experts):
            out[layer, expert] = fingerprint_row(expected_row(spec, layer, expert, device))
    return out


def _disk_part(x: torch.Tensor, t: TensorSpec, src: Source, j: int) -> torch.Tensor:
    """One expert's bundle tensor ``x`` as ``src.names[j]`` stores it (``assemble`` inverted)."""
    if src.interleaved:  # gate rows to even, up rows to odd
        x = torch.stack(x.chunk(2, dim=0), dim=1).reshape(x.shape)
    if len(src.names) > 1:
        x = x[j] if t.part == "shape" else x.chunk(2, dim=0)[j]
    return x.transpose(0, 1) if src.transposed else x


def _disk_value(spec: ModelSpec, layer: int, device: str, k: int, t: TensorSpec, src: Source, j: int,
                expert: Optional[int]) -> torch.Tensor:
    """Tensor ``src.names[j]``: one expert's part, or (``expert=None``) every expert's, stacked as fused."""
    if expert is not None:
        return _disk_part(_synthetic(t, k, layer, expert, spec, device), t, src, j)
    xs = [_disk_part(_synthetic(t, k, layer, e, spec, device), t, src, j) for e in range(spec.num_experts)]
    return torch.cat(xs) if src.flat else torch.stack(xs)


def _disk_tensors(spec: ModelSpec, layout: Layout, layer: int, device: str) -> list[tuple[str, Callable, tuple, str]]:
    """(name, make, shape, dtype) of every tensor of one MoE layer as ``layout`` stores it."""
    ckpt_layer, quantized = spec.checkpoint_layers[layer], spec.quant != "none"
    out = []
    for k, t in enumerate(spec.expert_format.tensors):
        for e in range(spec.num_experts) if layout.per_expert else (None,):
            src = layout.source(t, ckpt_layer, e or 0, quantized)
            shape = disk_shape(t, src, spec.num_experts)
            out += [(name, functools.partial(_disk_value, spec, layer, device, k, t, src, j, e), shape, t.dtype)
                    for j, name in enumerate(src.names)]
    return out


def _write_safetensors(path: Path, tensors: list[tuple[str, Callable, tuple, str]]) -> int:
    """Stream tensors into one safetensors file (via a .tmp rename), one in memory at a time; returns data bytes."""
    if sys.byteorder != "little":
        raise RuntimeError("safetensors files are little-endian; big-endian hosts are not supported")
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, _, shape, dtype in tensors:
        size = int(np.prod(shape, dtype=np.int64)) * DTYPES[dtype][0]
        header[name] = {"dtype": DTYPES[dtype][1], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # safetensors aligns the data buffer to 8 bytes
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, make, shape, dtype in tensors:
            t = make().contiguous().cpu()
            assert tuple(t.shape) == tuple(shape) and t.dtype == TORCH_DTYPES[dtype], (name, t.shape, shape, t.dtype)
            f.write(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    os.replace(tmp, path)
    return offset


FAMILIES = ("deepseek_v3", "mixtral", "qwen3_moe", "gpt_oss")


def hf_config(spec: ModelSpec, family: str) -> dict:
    """The family's config.json keys (``model_type`` and its MoE keys) for ``spec``; transformers loads it."""
    layers = spec.checkpoint_layers
    total = layers[-1] + 1
    base = {"model_type": family, "hidden_size": spec.hidden, "num_hidden_layers": total, "dtype": spec.dtype,
            "num_attention_heads": 1, "num_key_value_heads": 1, "head_dim": spec.hidden, "vocab_size": 256,
            "num_experts_per_tok": min(2, spec.num_experts)}
    contiguous = list(layers) == list(range(layers[0], total))
    if family == "deepseek_v3":
        if not contiguous:
            raise ConfigError("deepseek_v3 configs describe contiguous MoE layers after first_k_dense_replace")
        groups = spec.num_groups
        base.update(n_routed_experts=spec.num_experts, moe_intermediate_size=spec.intermediate,
                    intermediate_size=2 * spec.intermediate, first_k_dense_replace=layers[0], n_group=groups,
                    topk_group=max(1, groups // 2), n_shared_experts=spec.shared_experts, num_nextn_predict_layers=0)
        if spec.quant == "fp8":
            base["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                           "weight_block_size": list(spec.block)}
    elif family in ("mixtral", "gpt_oss"):
        if layers != tuple(range(total)):
            raise ConfigError(f"{family} configs make every layer MoE: first_layer must be 0, got {spec.first_layer}")
        base.update(num_local_experts=spec.num_experts, intermediate_size=spec.intermediate)
        if family == "gpt_oss":
            base["layer_types"] = ["full_attention"] * total
            if spec.quant == "mxfp4":
                base["quantization_config"] = {"quant_method": "mxfp4"}
    elif family == "qwen3_moe":
        base.update(num_experts=spec.num_experts, moe_intermediate_size=spec.intermediate,
                    intermediate_size=2 * spec.intermediate, decoder_sparse_step=1,
                    mlp_only_layers=[i for i in range(total) if i not in layers])
    else:
        raise ConfigError(f"unknown family {family!r}; expected one of {list(FAMILIES)}")
    return base


def write_checkpoint(
    folder: PathLike,
    spec: ModelSpec,
    preset: Union[str, Layout] = "deepseek",
    num_shards: int = 2,
    progress: bool = False,
    device: str = "cpu",
    family: Optional[str] = None,
) -> Path:
    """Write an HF-style sharded checkpoint of ``expected_bundle`` values; returns the folder.

    Files: ``model-0000k-of-0000N.safetensors`` (MoE layers split contiguously over
    shards) plus ``model.safetensors.index.json``, or one ``model.safetensors``; and
    ``config.json`` with the spec under ``"elastic_ep"`` and, given ``family``, that
    family's keys (``hf_config``). ``device="cuda"`` makes the values on the GPU.
    """
    layout = resolve_layout(preset)
    if not isinstance(num_shards, int) or not 1 <= num_shards <= spec.num_layers:
        raise ConfigError(f"num_shards must be an int in 1..num_layers={spec.num_layers}, got {num_shards!r}")
    config = hf_config(spec, family) if family is not None else {}
    from tqdm.auto import tqdm

    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    weight_map: dict[str, str] = {}
    total = 0
    chunks = np.array_split(np.arange(spec.num_layers), num_shards)
    for s, layers in enumerate(tqdm(chunks, desc=f"writing {root.name}", disable=not progress)):
        file = SINGLE_FILE if num_shards == 1 else f"model-{s + 1:05d}-of-{num_shards:05d}.safetensors"
        tensors = [x for layer in layers.tolist() for x in _disk_tensors(spec, layout, layer, device)]
        weight_map.update({name: file for name, *_ in tensors})
        total += _write_safetensors(root / file, tensors)
    if num_shards > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (root / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True))
    fields = {k: getattr(spec, k) for k in spec.__dataclass_fields__}
    if isinstance(preset, str):
        fields["preset"] = preset
    (root / CONFIG_FILE).write_text(json.dumps({**config, "elastic_ep": fields}, indent=2))
    return root


write_synthetic_checkpoint = write_checkpoint  # the name earlier releases used
