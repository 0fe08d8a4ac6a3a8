"""CheckpointReader: reads experts' bundles from HF safetensors, touching only the tensors (and fused slices) asked for."""

from __future__ import annotations

import contextlib
import json
import operator
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence, Union

import numpy as np
import torch
from safetensors import safe_open

from ..config import ModelSpec
from ..errors import CheckpointError
from .bundle import TORCH_DTYPES, empty_rows, tensor_view
from .fingerprints import fingerprint_rows
from .formats import DTYPES, TensorSpec
from .hub import PathLike, allowed_roots, checked_path, resolve_checkpoint
from .layouts import Layout, Source, choose_variant, resolve_layout

ExpertKey = tuple[int, int]  # (MoE layer, logical expert)
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def load_weight_map(folder: Path, roots: tuple[Path, ...]) -> dict[str, str]:
    """Tensor name -> shard file, from the index, else from a lone ``model.safetensors``."""
    index = folder / INDEX_FILE
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
    if (folder / SINGLE_FILE).exists():
        path = checked_path(folder, roots, SINGLE_FILE)
        with file_errors(SINGLE_FILE, roots[0]):
            with safe_open(str(path), framework="pt", device="cpu") as f:
                return {name: SINGLE_FILE for name in f.keys()}
    raise CheckpointError(f"{str(folder)!r} has neither {INDEX_FILE} nor {SINGLE_FILE}")


@contextlib.contextmanager
def file_errors(file: str, root: Path) -> Iterator[None]:
    """Turn a safetensors/OS failure on ``file`` (truncated, corrupted, unreadable) into CheckpointError."""
    try:
        yield
    except (CheckpointError, MemoryError, torch.cuda.OutOfMemoryError):
        raise
    except Exception as exc:
        raise CheckpointError(
            f"cannot read shard {file!r} in {str(root)!r} (truncated or corrupted?): {type(exc).__name__}: {exc}"
        ) from exc


def part_shape(t: TensorSpec, src: Source) -> tuple[int, ...]:
    """One expert's shape in each of ``src``'s tensors (gate's or up's half when they are apart), as stored."""
    if len(src.names) == 1:
        shape = t.shape
    elif t.part == "shape":
        shape = t.shape[1:]
    else:
        shape = (t.shape[0] // 2, *t.shape[1:])
    return (shape[1], shape[0], *shape[2:]) if src.transposed else shape


def disk_shape(t: TensorSpec, src: Source, num_experts: int) -> tuple[int, ...]:
    """Shape each of ``src``'s tensors must have on disk for bundle tensor ``t``."""
    shape = part_shape(t, src)
    if not src.fused:
        return shape
    return (num_experts * shape[0], *shape[1:]) if src.flat else (num_experts, *shape)


def expert_slice(sl, t: TensorSpec, src: Source):
    """``src.expert``'s part of a fused tensor's safetensors slice, as ``[1, ...]``."""
    e = src.expert
    if src.flat:
        rows = part_shape(t, src)[0]
        return sl[e * rows: (e + 1) * rows][None]
    return sl[e: e + 1]


def assemble(t: TensorSpec, src: Source, parts: list[torch.Tensor]) -> torch.Tensor:
    """Bundle tensor ``t`` of one expert from its disk tensors (fused ones already sliced to ``[1, ...]``)."""
    if src.fused:
        parts = [p[0].transpose(0, 1) if src.transposed else p[0] for p in parts]
    if t.part == "shape":
        parts = [p.to(torch.int64) for p in parts]
    if len(parts) == 1:
        x = parts[0]
    else:
        x = torch.stack(parts) if t.part == "shape" else torch.cat(parts, dim=0)
    return torch.cat([x[0::2], x[1::2]], dim=0) if src.interleaved else x


class CheckpointReader:
    """Reads single experts' bundles from an HF safetensors checkpoint.

    On construction: the folder (or hub repo id) resolves, the index parses, and every
    file it names is a regular file inside the folder (or, for a hub cache snapshot,
    the cached repo's blobs). ``layout`` is the preset as this checkpoint uses it
    (per-expert or fused names). ``bytes_read`` counts tensor bytes read so far.
    """

    def __init__(self, folder: PathLike, spec: ModelSpec, preset: Union[str, Layout] = "deepseek"):
        self.spec = spec
        self.format = spec.expert_format
        self.folder = resolve_checkpoint(folder)
        self.root = self.folder.resolve()
        self.roots = allowed_roots(self.folder)
        self.bytes_read = 0
        self.weight_map = load_weight_map(self.folder, self.roots)
        self.paths = {f: checked_path(self.folder, self.roots, f) for f in sorted(set(self.weight_map.values()))}
        self.preset = choose_variant(resolve_layout(preset), self.weight_map, spec.checkpoint_layers[0])

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

    def sources(self, key: ExpertKey) -> list[tuple[TensorSpec, Source]]:
        """Where each bundle tensor of expert ``key`` lives, in format order."""
        ckpt_layer = self.spec.checkpoint_layers[key[0]]
        quantized = self.spec.quant != "none"
        return [(t, self.preset.source(t, ckpt_layer, key[1], quantized)) for t in self.format.tensors]

    def _file_of(self, name: str, t: TensorSpec, key: ExpertKey) -> str:
        file = self.weight_map.get(name)
        if file is None:
            raise CheckpointError(
                f"tensor {name!r} ({t.name} of MoE layer {key[0]}, expert {key[1]}, preset {self.preset.name!r}) "
                f"is not in the checkpoint at {str(self.root)!r}"
            )
        return file

    def _check_header(self, f, file: str, name: str, t: TensorSpec, src: Source) -> None:
        with file_errors(file, self.root):
            sl = f.get_slice(name)
            shape, dtype = tuple(sl.get_shape()), sl.get_dtype()
        want = disk_shape(t, src, self.spec.num_experts)
        rows = part_shape(t, src)[0] if src.flat else 1
        if src.fused and shape and shape[0] != self.spec.num_experts * rows:
            raise CheckpointError(f"fused tensor {name!r} in {file!r} holds {shape[0] / rows:g} experts (shape "
                                  f"{shape}{f', {rows} rows each' if src.flat else ''}); "
                                  f"the model has {self.spec.num_experts}")
        if shape != want:
            raise CheckpointError(f"tensor {name!r} in {file!r} has shape {shape}, the model spec needs {want} "
                                  f"for bundle tensor {t.name}")
        if t.part == "shape" and dtype in ("I32", "I64"):
            return  # compressed-tensors writes int64, some quantizers int32: read as int64 values
        if dtype != DTYPES[t.dtype][1]:
            raise CheckpointError(f"tensor {name!r} in {file!r} has dtype {dtype}, the model spec needs "
                                  f"{DTYPES[t.dtype][1]} ({t.dtype}) for bundle tensor {t.name}")

    def _read(self, keys: Iterable[ExpertKey], device: str, place: Callable[[ExpertKey, str, torch.Tensor], None],
              data: bool = True) -> None:
        """Read every bundle tensor of ``keys`` (deduplicated), opening each shard once; ``place`` takes each.

        ``data=False`` checks headers only (presence, shape, dtype).
        """
        wanted: list[tuple[ExpertKey, TensorSpec, Source]] = []
        by_file: dict[str, list[tuple[int, int, str]]] = {}  # file -> (item, part index, name)
        for key in dict.fromkeys(keys):
            for t, src in self.sources(key):
                for j, name in enumerate(src.names):
                    by_file.setdefault(self._file_of(name, t, key), []).append((len(wanted), j, name))
                wanted.append((key, t, src))
        got: list[list] = [[None] * len(src.names) for _, _, src in wanted]
        checked: set[str] = set()
        for file in sorted(by_file):
            with file_errors(file, self.root):
                handle = safe_open(str(self.paths[file]), framework="pt", device=str(device))
            with handle as f:
                with file_errors(file, self.root):
                    present = set(f.keys())
                for item, j, name in by_file[file]:
                    _, t, src = wanted[item]
                    if name not in present:
                        raise CheckpointError(f"tensor {name!r} is listed in the index but missing from {file!r}")
                    if name not in checked:
                        self._check_header(f, file, name, t, src)
                        checked.add(name)
                    if data:
                        with file_errors(file, self.root):
                            part = expert_slice(f.get_slice(name), t, src) if src.fused else f.get_tensor(name)
                        self.bytes_read += part.numel() * part.element_size()
                        got[item][j] = part
        if data:
            for (key, t, src), parts in zip(wanted, got):
                place(key, t.name, assemble(t, src, parts))

    def read_bundles(self, keys: Iterable[Sequence[int]], device: str = "cpu") -> dict[ExpertKey, dict]:
        """{(layer, expert): {tensor name: tensor}} for ``keys``, as the bundle holds them."""
        out: dict[ExpertKey, dict] = {self._check_key(k): {} for k in keys}
        self._read(list(out), device, lambda key, name, x: out[key].__setitem__(name, x))
        return out

    def read_experts(self, keys: Iterable[Sequence[int]], device: str = "cpu") -> dict[ExpertKey, torch.Tensor]:
        """{(layer, expert): byte row ``[row_bytes]`` uint8} for ``keys``, read on ``device``."""
        checked = [self._check_key(k) for k in keys]
        rows = empty_rows((len(set(checked)),), self.format, device)
        at = {k: i for i, k in enumerate(dict.fromkeys(checked))}
        self._read(checked, device, lambda key, name, x: tensor_view(rows[at[key]], self.format, name).copy_(x))
        return {k: rows[i] for k, i in at.items()}

    def read_layer_slots(self, layer: int, experts: Sequence[int], device: str = "cpu") -> torch.Tensor:
        """Byte rows ``[n, row_bytes]`` of ``experts`` (repeats allowed) in MoE layer ``layer``.

        Each distinct expert is read once and copied into every row that names it.
        """
        keys = [self._check_key((layer, e)) for e in experts]
        rows = empty_rows((len(keys),), self.format, device)
        where: dict[ExpertKey, list[int]] = {}
        for j, key in enumerate(keys):
            where.setdefault(key, []).append(j)

        def place(key: ExpertKey, name: str, x: torch.Tensor) -> None:
            for j in where[key]:
                tensor_view(rows[j], self.format, name).copy_(x)

        self._read(keys, device, place)
        return rows

    def validate(self) -> None:
        """Check every expert tensor the spec needs, scales included: named by the index, present in its
        shard with the expected shape and dtype (headers only, no data read). Raises CheckpointError."""
        keys = [(layer, e) for layer in range(self.spec.num_layers) for e in range(self.spec.num_experts)]
        missing = [name for key in keys for t, src in self.sources(key) for name in src.names
                   if name not in self.weight_map]
        if missing:
            raise CheckpointError(
                f"{len(missing)} expert tensors missing from the checkpoint at {str(self.root)!r} "
                f"(preset {self.preset.name!r}), e.g. {missing[:10]}"
            )
        self._read(keys, "cpu", lambda *a: None, data=False)

    def fingerprints(self, on_layer=None) -> np.ndarray:
        """int64 ``[num_layers, num_experts]``: fingerprint of every expert's bundle as the checkpoint holds it.

        ``on_layer(done, total)``, if given, is called after each layer (progress bars).
        """
        out = np.zeros((self.spec.num_layers, self.spec.num_experts), dtype=np.int64)
        for layer in range(self.spec.num_layers):
            out[layer] = fingerprint_rows(self.read_layer_slots(layer, list(range(self.spec.num_experts))))
            if on_layer is not None:
                on_layer(layer + 1, self.spec.num_layers)
        return out


__all__ = ["CheckpointReader", "INDEX_FILE", "SINGLE_FILE", "TORCH_DTYPES", "load_weight_map"]
