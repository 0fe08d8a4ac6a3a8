"""Checkpoint and backup sources of expert tensors: HF safetensors I/O, synthetic checkpoints, fingerprints.

Experts in memory are fused as a fused-MoE kernel wants them (see ``ModelSpec``):
``w13: [2 * intermediate, hidden]`` (gate_proj rows, then up_proj rows) and
``w2: [hidden, intermediate]`` (down_proj). On disk they are HF-style per-projection
tensors, named by a ``NamingPreset``. ``layer`` is always the MoE layer index
``0 <= layer < spec.num_layers``; the checkpoint names use ``spec.first_layer + layer``.

Synthetic checkpoints encode each tensor's identity in its values, so any
misplaced expert is caught exactly (see ``expected_expert``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import operator
import os
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence, Union

import numpy as np
import torch
from safetensors import safe_open

from .config import ModelSpec
from .errors import CheckpointError, ConfigError

PathLike = Union[str, os.PathLike]
ExpertKey = tuple[int, int]  # (MoE layer, logical expert)

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
CONFIG_FILE = "config.json"

_TORCH_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
_ST_DTYPES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}
_KINDS = ("gate", "up", "down")  # tensor kind k: 0 gate, 1 up, 2 down

# Synthetic values: ((i * 7 + c) % 251) / 64 with c = layer*31 + expert*17 + kind*5.
_MOD = 251
_STEP = 7
_INV_STEP = pow(_STEP, -1, _MOD)  # shifting the base pattern by s adds 7*s to the phase

# Fingerprints: position weights (i % 65521) + 1 and an odd multiplier to mix w13 into w2.
_FP_PRIME = 65521
_FP_MIX = 0x9E3779B97F4A7C15
_FP_BLOCK = 1 << 25  # products materialised per fingerprint step (128 MiB of int32)
_U64 = (1 << 64) - 1


def torch_dtype(spec: ModelSpec) -> torch.dtype:
    """The torch dtype of ``spec.dtype``."""
    return _TORCH_DTYPES[spec.dtype]


@dataclass(frozen=True)
class NamingPreset:
    """HF tensor names of one expert; ``{L}`` is the checkpoint layer index, ``{E}`` the expert."""

    name: str
    gate: str
    up: str
    down: str

    def tensor_names(self, checkpoint_layer: int, expert: int) -> tuple[str, str, str]:
        """(gate, up, down) names of one expert at checkpoint layer ``checkpoint_layer``."""
        return tuple(f.format(L=checkpoint_layer, E=expert) for f in (self.gate, self.up, self.down))


def _hf_preset(name: str) -> NamingPreset:
    stem = "model.layers.{L}.mlp.experts.{E}."
    return NamingPreset(name, stem + "gate_proj.weight", stem + "up_proj.weight", stem + "down_proj.weight")


PRESETS: dict[str, NamingPreset] = {
    "deepseek": _hf_preset("deepseek"),
    "qwen": _hf_preset("qwen"),
    "mixtral": NamingPreset(
        "mixtral",
        "model.layers.{L}.block_sparse_moe.experts.{E}.w1.weight",
        "model.layers.{L}.block_sparse_moe.experts.{E}.w3.weight",
        "model.layers.{L}.block_sparse_moe.experts.{E}.w2.weight",
    ),
}


def _preset(preset: Union[str, NamingPreset]) -> NamingPreset:
    if isinstance(preset, NamingPreset):
        return preset
    if preset not in PRESETS:
        raise ConfigError(f"unknown naming preset {preset!r}; expected one of {sorted(PRESETS)}")
    return PRESETS[preset]


def _expert_names(spec: ModelSpec, preset: NamingPreset, key: ExpertKey) -> tuple[str, str, str]:
    return preset.tensor_names(spec.first_layer + key[0], key[1])


def _kind_shape(spec: ModelSpec, kind: int) -> tuple[int, int]:
    """Shape of one projection on disk: gate/up ``[I, H]``, down ``[H, I]``."""
    return spec.w2_shape if kind == 2 else (spec.intermediate, spec.hidden)


# ---------------------------------------------------------------------------
# Synthetic, identity-encoding values
# ---------------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def _pattern_base(n: int, dtype: torch.dtype, device: str) -> torch.Tensor:
    """``((7 * i) % 251) / 64`` for ``i < n + 251`` (never mutated; callers slice and clone)."""
    i = torch.arange(n + _MOD, dtype=torch.int64, device=device)
    return ((i * _STEP) % _MOD).to(torch.float32).div_(64).to(dtype)


def _kind_tensor(spec: ModelSpec, layer: int, expert: int, kind: int, device: str = "cpu") -> torch.Tensor:
    """One synthetic projection ``[rows, cols]``: identity prefix, then the shifted pattern."""
    rows, cols = _kind_shape(spec, kind)
    n = rows * cols
    phase = (layer * 31 + expert * 17 + kind * 5) % _MOD
    shift = (phase * _INV_STEP) % _MOD
    flat = _pattern_base(n, torch_dtype(spec), str(device))[shift : shift + n].clone()
    for i, ident in enumerate((layer, expert, kind)[:n]):
        flat[i] = ident
    return flat.view(rows, cols)


def expected_expert(
    spec: ModelSpec, layer: int, expert: int, device: str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """The synthetic (w13 ``[2I, H]``, w2 ``[H, I]``) of MoE layer ``layer``, expert ``expert``.

    Each projection (kind 0 gate, 1 up, 2 down) holds, flattened: ``[0] = layer``,
    ``[1] = expert``, ``[2] = kind`` (so ``w13[0, :3]`` and ``w2[0, :3]`` when
    ``hidden >= 3``), and at every other ``i``
    ``((i * 7 + layer * 31 + expert * 17 + kind * 5) % 251) / 64``.
    Values k/64 with k < 256 are exact in every dtype; ids are exact up to 255 in
    bfloat16 (2048 in float16). Beyond that the ids round, but the pattern's phase
    still separates (layer, expert) pairs unless ``31*dlayer + 17*dexpert`` is a
    multiple of 251 while both rounded ids coincide. No RNG: cheap and deterministic.
    """
    if not (0 <= layer < spec.num_layers and 0 <= expert < spec.num_experts):
        raise ValueError(
            f"(layer, expert)=({layer}, {expert}) outside spec's {spec.num_layers} layers x {spec.num_experts} experts"
        )
    gate, up, down = (_kind_tensor(spec, layer, expert, k, device) for k in range(3))
    return torch.cat([gate, up], dim=0), down


def _shard_layers(spec: ModelSpec, num_shards: int) -> list[list[int]]:
    """MoE layers of each shard: contiguous, sizes differing by at most one."""
    return [chunk.tolist() for chunk in np.array_split(np.arange(spec.num_layers), num_shards)]


_TensorSource = tuple[str, Callable[[], torch.Tensor], tuple[int, int]]  # (name, make, [rows, cols])


def _write_safetensors(
    path: Path, tensors: list[_TensorSource], spec: ModelSpec, on_bytes: Callable[[int], None]
) -> int:
    """Stream tensors of spec's dtype into one safetensors file (via a .tmp rename); returns data bytes.

    Only one tensor is in memory at a time; the header is computed from the spec up front.
    """
    if sys.byteorder != "little":
        raise RuntimeError("safetensors files are little-endian; big-endian hosts are not supported")
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, _, shape in tensors:
        size = shape[0] * shape[1] * spec.dtype_bytes
        header[name] = {"dtype": _ST_DTYPES[spec.dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # safetensors aligns the data buffer to 8 bytes
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for _, make, shape in tensors:
            t = make().contiguous().cpu()
            assert tuple(t.shape) == shape and t.dtype == torch_dtype(spec), (t.shape, shape, t.dtype)
            f.write(t.view(torch.uint8).numpy())
            on_bytes(t.numel() * t.element_size())
    os.replace(tmp, path)
    return offset


def write_synthetic_checkpoint(
    folder: PathLike,
    spec: ModelSpec,
    preset: str = "deepseek",
    num_shards: int = 2,
    progress: bool = False,
    device: str = "cpu",
) -> Path:
    """Write an HF-style sharded checkpoint of ``expected_expert`` values; returns the folder.

    ``device="cuda"`` generates the values on the GPU (much faster for tens of GB).

    Files: ``model-0000k-of-0000N.safetensors`` (layers split contiguously over
    shards) plus ``model.safetensors.index.json``, or a single ``model.safetensors``
    when ``num_shards == 1``; and ``config.json`` with the spec's fields and
    ``"elastic_ep_preset"`` (read back by ``read_spec``). Written tensor by tensor,
    never more than one projection in memory.
    """
    naming = _preset(preset)
    if not isinstance(num_shards, int) or not 1 <= num_shards <= spec.num_layers:
        raise ConfigError(f"num_shards must be an int in 1..num_layers={spec.num_layers}, got {num_shards!r}")
    from tqdm.auto import tqdm

    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    total = spec.num_layers * spec.num_experts * spec.expert_bytes
    weight_map: dict[str, str] = {}
    with tqdm(total=total, unit="B", unit_scale=True, desc=f"writing {root.name}", disable=not progress) as bar:
        for s, layers in enumerate(_shard_layers(spec, num_shards)):
            file = SINGLE_FILE if num_shards == 1 else f"model-{s + 1:05d}-of-{num_shards:05d}.safetensors"
            tensors = []
            for layer in layers:
                for expert in range(spec.num_experts):
                    for kind, name in enumerate(_expert_names(spec, naming, (layer, expert))):
                        make = functools.partial(_kind_tensor, spec, layer, expert, kind, device)
                        tensors.append((name, make, _kind_shape(spec, kind)))
                        weight_map[name] = file
            _write_safetensors(root / file, tensors, spec, bar.update)
    if num_shards > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (root / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True))
    config = {**dataclasses.asdict(spec), "elastic_ep_preset": naming.name}
    (root / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    return root


# ---------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------


class CheckpointReader:
    """Reads single experts from an HF safetensors checkpoint, touching only the tensors asked for.

    On construction: the folder exists, the index (``model.safetensors.index.json``,
    else a lone ``model.safetensors``) parses, and every file it names is a regular
    file inside the folder (no absolute paths, no ``..``, no symlink escaping it).
    ``bytes_read`` counts tensor bytes read so far.
    """

    def __init__(self, folder: PathLike, spec: ModelSpec, preset: Union[str, NamingPreset] = "deepseek"):
        self.spec = spec
        self.preset = _preset(preset)
        self.dtype = torch_dtype(spec)
        self.bytes_read = 0
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise CheckpointError(f"checkpoint folder {str(self.folder)!r} does not exist or is not a directory")
        self.root = self.folder.resolve()
        self.weight_map = self._load_weight_map()  # tensor name -> file name (as listed)
        self.paths = {file: self._checked_path(file) for file in sorted(set(self.weight_map.values()))}

    # -- construction helpers ------------------------------------------------

    def _load_weight_map(self) -> dict[str, str]:
        index = self.folder / INDEX_FILE
        if index.exists():
            try:
                data = json.loads(index.read_text())
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise CheckpointError(f"index {str(index)!r} is not valid JSON: {exc}") from exc
            weight_map = data.get("weight_map") if isinstance(data, dict) else None
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"index {str(index)!r} has no 'weight_map' object")
            for name, file in weight_map.items():
                if not isinstance(file, str) or not file:
                    raise CheckpointError(f"index {str(index)!r} maps {name!r} to {file!r}, not a file name")
            return dict(weight_map)
        single = self.folder / SINGLE_FILE
        if single.exists():
            path = self._checked_path(SINGLE_FILE)
            with self._file_errors(SINGLE_FILE):
                with safe_open(str(path), framework="pt", device="cpu") as f:
                    return {name: SINGLE_FILE for name in f.keys()}
        raise CheckpointError(f"{str(self.folder)!r} has neither {INDEX_FILE} nor {SINGLE_FILE}")

    def _checked_path(self, file: str) -> Path:
        """Resolve a weight-map file name; it must be a regular file inside the folder."""
        rel = Path(file)
        if rel.is_absolute() or ".." in rel.parts:
            raise CheckpointError(
                f"weight map entry {file!r} is absolute or contains '..'; it must stay in {str(self.root)!r}"
            )
        path = (self.root / rel).resolve()
        if not path.is_relative_to(self.root):
            raise CheckpointError(f"weight map entry {file!r} resolves to {str(path)!r}, outside {str(self.root)!r}")
        if not path.is_file():
            raise CheckpointError(f"shard file {file!r} named by the weight map is missing from {str(self.root)!r}")
        return path

    @contextlib.contextmanager
    def _file_errors(self, file: str) -> Iterator[None]:
        """Turn a safetensors/OS failure on ``file`` (truncated, corrupted, unreadable) into CheckpointError."""
        try:
            yield
        except (CheckpointError, MemoryError, torch.cuda.OutOfMemoryError):
            raise
        except Exception as exc:
            raise CheckpointError(
                f"cannot read shard {file!r} in {str(self.root)!r} (truncated or corrupted?): "
                f"{type(exc).__name__}: {exc}"
            ) from exc

    # -- reading ---------------------------------------------------------------

    def _check_key(self, key: Sequence[int]) -> ExpertKey:
        try:
            layer, expert = (operator.index(v) for v in key)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"expert key {key!r} is not a (layer, expert) pair of ints") from exc
        if not (0 <= layer < self.spec.num_layers and 0 <= expert < self.spec.num_experts):
            raise ValueError(
                f"expert key {(layer, expert)} outside {self.spec.num_layers} layers x {self.spec.num_experts} experts"
            )
        return layer, expert

    def _read(self, keys: Iterable[ExpertKey], device: str,
              place: Callable[[ExpertKey, int, torch.Tensor], None]) -> None:
        """Read every projection of ``keys`` (deduplicated), opening each shard once; ``place`` takes each."""
        by_file: dict[str, list[tuple[ExpertKey, int, str]]] = {}
        for key in dict.fromkeys(keys):
            for kind, name in enumerate(_expert_names(self.spec, self.preset, key)):
                file = self.weight_map.get(name)
                if file is None:
                    raise CheckpointError(
                        f"tensor {name!r} ({_KINDS[kind]} of layer {key[0]}, expert {key[1]}) "
                        f"is not in the checkpoint at {str(self.root)!r}"
                    )
                by_file.setdefault(file, []).append((key, kind, name))
        for file in sorted(by_file):
            with self._file_errors(file):
                handle = safe_open(str(self.paths[file]), framework="pt", device=str(device))
            with handle as f:
                with self._file_errors(file):
                    present = set(f.keys())
                for key, kind, name in by_file[file]:
                    if name not in present:
                        raise CheckpointError(f"tensor {name!r} is listed in the index but missing from {file!r}")
                    expected = _kind_shape(self.spec, kind)
                    with self._file_errors(file):
                        shape = tuple(f.get_slice(name).get_shape())
                    if shape != expected:
                        raise CheckpointError(f"tensor {name!r} in {file!r} has shape {shape}, expected {expected}")
                    with self._file_errors(file):
                        tensor = f.get_tensor(name)
                    if tensor.dtype != self.dtype:
                        raise CheckpointError(
                            f"tensor {name!r} in {file!r} has dtype {tensor.dtype}, expected {self.dtype}"
                        )
                    self.bytes_read += tensor.numel() * tensor.element_size()
                    place(key, kind, tensor)

    def read_experts(
        self, keys: Iterable[Sequence[int]], device: str = "cpu"
    ) -> dict[ExpertKey, tuple[torch.Tensor, torch.Tensor]]:
        """{(layer, expert): (w13 ``[2I, H]``, w2 ``[H, I]``)} for ``keys``, read on ``device``."""
        checked = [self._check_key(k) for k in keys]
        parts: dict[ExpertKey, list] = {k: [None, None, None] for k in checked}

        def place(key: ExpertKey, kind: int, tensor: torch.Tensor) -> None:
            parts[key][kind] = tensor

        self._read(checked, device, place)
        return {k: (torch.cat([g, u], dim=0), d) for k, (g, u, d) in parts.items()}

    def read_layer_slots(
        self, layer: int, experts: Sequence[int], device: str = "cpu"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Stacked (w13 ``[n, 2I, H]``, w2 ``[n, H, I]``) of ``experts`` (repeats allowed) in ``layer``.

        Each distinct expert is read once and copied into every row that names it.
        """
        keys = [self._check_key((layer, e)) for e in experts]
        spec, n = self.spec, len(keys)
        w13 = torch.empty((n, *spec.w13_shape), dtype=self.dtype, device=device)
        w2 = torch.empty((n, *spec.w2_shape), dtype=self.dtype, device=device)
        rows: dict[ExpertKey, list[int]] = {}
        for j, key in enumerate(keys):
            rows.setdefault(key, []).append(j)
        inter = spec.intermediate

        def place(key: ExpertKey, kind: int, tensor: torch.Tensor) -> None:
            for j in rows[key]:
                dst = (w13[j, :inter], w13[j, inter:], w2[j])[kind]
                dst.copy_(tensor)

        self._read(keys, device, place)
        return w13, w2

    def validate(self) -> None:
        """Check that every expert tensor the spec needs is in the weight map (no data read)."""
        missing = [
            name
            for layer in range(self.spec.num_layers)
            for expert in range(self.spec.num_experts)
            for name in _expert_names(self.spec, self.preset, (layer, expert))
            if name not in self.weight_map
        ]
        if missing:
            raise CheckpointError(
                f"{len(missing)} expert tensors missing from the checkpoint at {str(self.root)!r} "
                f"(preset {self.preset.name!r}), e.g. {missing[:10]}"
            )


# ---------------------------------------------------------------------------
# Geometry from config.json
# ---------------------------------------------------------------------------


def _require(config: dict, path: Path, *names: str) -> list[int]:
    missing = [n for n in names if n not in config]
    if missing:
        raise CheckpointError(f"{str(path)!r} lacks {missing} needed to tell the expert geometry")
    return [config[n] for n in names]


def read_spec(folder: PathLike) -> tuple[ModelSpec, str]:
    """(ModelSpec, preset name) from a checkpoint's ``config.json``.

    Reads what ``write_synthetic_checkpoint`` writes, and, best effort, HF configs of
    DeepSeek-V2/V3 (``n_routed_experts``), Qwen-MoE (``num_experts``) and Mixtral
    (``num_local_experts``). Raises CheckpointError when the geometry cannot be told.
    """
    path = Path(folder) / CONFIG_FILE
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise CheckpointError(f"no {CONFIG_FILE} in {str(folder)!r}") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{str(path)!r} is not valid JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise CheckpointError(f"{str(path)!r} is not a JSON object")
    dtype = config.get("torch_dtype", config.get("dtype", "bfloat16"))
    dtype = dtype if dtype in _TORCH_DTYPES else "bfloat16"
    if "quantization_config" in config:
        quant = config["quantization_config"]
        method = quant.get("quant_method") if isinstance(quant, dict) else quant
        raise CheckpointError(
            f"{str(path)!r} describes a quantized checkpoint ({method!r}); only {sorted(_TORCH_DTYPES)} are read"
        )

    if "elastic_ep_preset" in config:
        names = {f.name for f in dataclasses.fields(ModelSpec)}
        fields = {k: v for k, v in config.items() if k in names}
        preset = config["elastic_ep_preset"]
    elif "n_routed_experts" in config:  # DeepSeek-V2 / V3
        experts, inter, hidden, layers = _require(
            config, path, "n_routed_experts", "moe_intermediate_size", "hidden_size", "num_hidden_layers")
        first = config.get("first_k_dense_replace", 0) or 0
        if config.get("moe_layer_freq", 1) != 1:
            raise CheckpointError(
                f"{str(path)!r}: moe_layer_freq={config['moe_layer_freq']} (interleaved MoE layers) is not supported"
            )
        fields = dict(num_layers=layers - first, num_experts=experts, hidden=hidden, intermediate=inter,
                      first_layer=first, num_groups=config.get("n_group") or 1, dtype=dtype)
        preset = "deepseek"
    elif "num_local_experts" in config:  # Mixtral
        experts, inter, hidden, layers = _require(
            config, path, "num_local_experts", "intermediate_size", "hidden_size", "num_hidden_layers")
        fields = dict(num_layers=layers, num_experts=experts, hidden=hidden, intermediate=inter, dtype=dtype)
        preset = "mixtral"
    elif "num_experts" in config and "moe_intermediate_size" in config:  # Qwen2-MoE / Qwen3-MoE
        experts, inter, hidden, layers = _require(
            config, path, "num_experts", "moe_intermediate_size", "hidden_size", "num_hidden_layers")
        if config.get("decoder_sparse_step", 1) != 1 or config.get("mlp_only_layers"):
            raise CheckpointError(
                f"{str(path)!r}: decoder_sparse_step={config.get('decoder_sparse_step')} / "
                f"mlp_only_layers={config.get('mlp_only_layers')} (non-contiguous MoE layers) is not supported"
            )
        fields = dict(num_layers=layers, num_experts=experts, hidden=hidden, intermediate=inter, dtype=dtype)
        preset = "qwen"
    else:
        raise CheckpointError(
            f"cannot tell the expert geometry from {str(path)!r} (model_type={config.get('model_type')!r})"
        )
    if preset not in PRESETS:
        raise CheckpointError(f"{str(path)!r} names unknown preset {preset!r}; expected one of {sorted(PRESETS)}")
    try:
        return ModelSpec(**fields), preset
    except (ConfigError, TypeError) as exc:
        raise CheckpointError(f"{str(path)!r} gives an impossible geometry: {exc}") from exc


# ---------------------------------------------------------------------------
# Fingerprints
# ---------------------------------------------------------------------------

_INT_VIEWS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _position_weights(stop: int, device: torch.device) -> torch.Tensor:
    """``(i % 65521) + 1`` for i in [0, stop), int32, cached per device (grown on demand)."""
    key = str(device)
    have = _WEIGHTS.get(key)
    if have is None or have.numel() < stop:
        size = max(stop, 0 if have is None else 2 * have.numel())
        have = torch.arange(size, dtype=torch.int64, device=device).remainder_(_FP_PRIME).add_(1).to(torch.int32)
        _WEIGHTS[key] = have
    return have[:stop]


_WEIGHTS: dict[str, torch.Tensor] = {}


def _weighted_bit_sums(bits: torch.Tensor) -> torch.Tensor:
    """Per row of raw bits ``[n, m]`` (any strides): sum of bits x ((column % 65521) + 1), int64 ``[n]``.

    The int64 sum wraps on overflow (exact and order-independent modulo 2**64). For
    1- and 2-byte bits the products are exact in int32 (|bits| <= 2**15, weight <
    2**16), which halves the memory traffic; wider bits multiply in int64. Works in
    column blocks so at most ~_FP_BLOCK products exist at once.
    """
    n, m = bits.shape
    total = torch.zeros(n, dtype=torch.int64, device=bits.device)
    if n == 0 or m == 0:
        return total
    narrow = bits.element_size() <= 2
    weights = _position_weights(m, bits.device)
    block = max(1, _FP_BLOCK // n)
    for start in range(0, m, block):
        stop = min(m, start + block)
        if narrow:
            prod = bits[:, start:stop] * weights[start:stop]  # promotes to int32
        else:
            prod = bits[:, start:stop].to(torch.int64) * weights[start:stop].to(torch.int64)
        total += prod.sum(dim=1, dtype=torch.int64)
    return total


def _as_bits(t: torch.Tensor) -> torch.Tensor:
    """A tensor's raw bits, same shape, as the signed integer type of its element size."""
    return t.detach().view(_INT_VIEWS[t.element_size()])


def _mix(s13: list[int], s2: list[int]) -> list[int]:
    out = []
    for a, b in zip(s13, s2):
        h = ((a & _U64) * _FP_MIX + (b & _U64)) & _U64  # odd multiplier: a change in either sum survives
        out.append(h - (1 << 64) if h >= 1 << 63 else h)  # signed, so it fits numpy int64
    return out


def fingerprint_stacked(w13: torch.Tensor, w2: torch.Tensor) -> list[int]:
    """Fingerprint of each row of (w13 ``[n, 2I, H]``, w2 ``[n, H, I]``): ``fingerprint`` per expert.

    Exact and device independent; any single-element (bit) change alters it.
    """
    if w13.dim() != 3 or w2.dim() != 3 or w13.shape[0] != w2.shape[0]:
        raise ValueError(f"expected w13 [n, 2I, H] and w2 [n, H, I], got {tuple(w13.shape)} and {tuple(w2.shape)}")
    n = w13.shape[0]
    s13 = _weighted_bit_sums(_as_bits(w13).reshape(n, -1)).tolist()
    s2 = _weighted_bit_sums(_as_bits(w2).reshape(n, -1)).tolist()
    return _mix(s13, s2)


def fingerprint_sums(a13: torch.Tensor, a2: torch.Tensor) -> torch.Tensor:
    """Weighted bit sums of experts given as rows, ``a13: [n, 2I*H]`` and ``a2: [n, H*I]`` (any strides).

    Returns int64 ``[2, n]``, queued on the current stream without waiting for it, so
    fingerprinting can overlap other copies; ``fingerprints_from_sums`` finishes it.
    """
    if a13.dim() != 2 or a2.dim() != 2 or a13.shape[0] != a2.shape[0]:
        raise ValueError(f"expected a13 [n, m13] and a2 [n, m2], got {tuple(a13.shape)} and {tuple(a2.shape)}")
    return torch.stack([_weighted_bit_sums(_as_bits(a13)), _weighted_bit_sums(_as_bits(a2))])


def fingerprints_from_sums(sums: torch.Tensor) -> list[int]:
    """Fingerprints from ``fingerprint_sums``' ``[2, n]`` result (waits for it); equal to ``fingerprint_stacked``."""
    s13, s2 = sums.tolist()
    return _mix(s13, s2)


def fingerprint(w13: torch.Tensor, w2: torch.Tensor) -> int:
    """Fingerprint of one expert (w13 ``[2I, H]``, w2 ``[H, I]``) as a signed 64-bit Python int.

    Sums the tensors' raw bits (viewed as int16 for 2-byte dtypes, int32 for float32)
    times position weights ``(i % 65521) + 1``, on the tensors' device.
    """
    return fingerprint_stacked(w13.unsqueeze(0), w2.unsqueeze(0))[0]


def expected_fingerprints(spec: ModelSpec, device: str = "cpu") -> np.ndarray:
    """int64 ``[num_layers, num_experts]`` fingerprints of the synthetic experts of ``spec``."""
    out = np.empty((spec.num_layers, spec.num_experts), dtype=np.int64)
    for layer in range(spec.num_layers):
        for expert in range(spec.num_experts):
            out[layer, expert] = fingerprint(*expected_expert(spec, layer, expert, device))
    return out
