"""Storage layouts (naming presets): where each tensor of an expert bundle lives in a checkpoint; pure.

A ``Layout`` names one expert's projections per expert (``gate``/``up``/``down``
templates ending in ``.weight``, with ``{L}`` the checkpoint layer and ``{E}`` the
expert), and/or a layer's experts fused into one tensor per projection
(``fused_gate_up``/``fused_down``, with ``{L}`` only, ``[E, ...]``). Fused weights may be
stored transposed (``[E, H, 2I]`` / ``[E, I, H]``, gpt-oss and Llama-4) and gate/up
interleaved (gpt-oss: gate at even columns, up at odd). Other parts of a bundle replace
``.weight`` by their suffix (``.weight_scale_inv``) or append one to a fused name (``_blocks``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

from ..errors import ConfigError
from .formats import TensorSpec

# part -> suffix replacing ".weight" of a per-expert name / appended to a fused name
PER_EXPERT_SUFFIX = {"weight": ".weight", "scale_inv": ".weight_scale_inv", "packed": ".weight_packed",
                     "scale": ".weight_scale", "shape": ".weight_shape", "bias": ".bias",
                     "blocks": ".weight_blocks", "scales": ".weight_scales"}
FUSED_SUFFIX = {"weight": "", "scale_inv": "_scale_inv", "blocks": "_blocks", "scales": "_scales", "bias": "_bias",
                "packed": "_packed", "scale": "_scale", "shape": "_shape"}


@dataclass(frozen=True)
class Source:
    """Where one bundle tensor of one expert is read from.

    names: the per-expert tensors concatenated along dim 0 (gate then up for w13; or
    stacked, for ``shape`` parts), or one fused tensor sliced at ``expert``.
    """

    names: tuple[str, ...]
    fused: bool
    expert: int
    transposed: bool = False  # fused weight stored [E, cols, rows]
    interleaved: bool = False  # fused gate/up rows alternate (gate even, up odd)


@dataclass(frozen=True)
class Layout:
    """Names of an expert's tensors in a checkpoint (see the module docstring)."""

    name: str
    gate: Optional[str] = None  # per-expert gate weight, e.g. "model.layers.{L}.mlp.experts.{E}.gate_proj.weight"
    up: Optional[str] = None
    down: Optional[str] = None
    fused_gate_up: Optional[str] = None  # e.g. "model.layers.{L}.mlp.experts.gate_up_proj"
    fused_down: Optional[str] = None
    transposed: bool = False
    interleaved: bool = False

    def __post_init__(self) -> None:
        per = (self.gate, self.up, self.down)
        fused = (self.fused_gate_up, self.fused_down)
        if any(t is not None for t in per) and any(t is None for t in per):
            raise ConfigError(f"layout {self.name!r}: gate, up and down must be given together")
        if any(t is not None for t in fused) and any(t is None for t in fused):
            raise ConfigError(f"layout {self.name!r}: fused_gate_up and fused_down must be given together")
        if self.gate is None and self.fused_gate_up is None:
            raise ConfigError(f"layout {self.name!r} names neither per-expert nor fused tensors")
        for t in per:
            if t is not None and ("{L}" not in t or "{E}" not in t or not t.endswith(".weight")):
                raise ConfigError(f"layout {self.name!r}: per-expert name {t!r} needs {{L}}, {{E}} and to end in .weight")
        for t in fused:
            if t is not None and ("{L}" not in t or "{E}" in t):
                raise ConfigError(f"layout {self.name!r}: fused name {t!r} needs {{L}} and no {{E}}")

    @property
    def per_expert(self) -> bool:
        return self.gate is not None

    def tensor_names(self, checkpoint_layer: int, expert: int) -> tuple[str, str, str]:
        """(gate, up, down) weight names of one expert (per-expert layouts)."""
        if not self.per_expert:
            raise ConfigError(f"layout {self.name!r} is fused: it has no per-expert names")
        return tuple(t.format(L=checkpoint_layer, E=expert) for t in (self.gate, self.up, self.down))

    def fused(self) -> "Layout":
        """This layout restricted to its fused tensors."""
        return Layout(self.name, None, None, None, self.fused_gate_up, self.fused_down, self.transposed,
                      self.interleaved)

    def source(self, t: TensorSpec, checkpoint_layer: int, expert: int, quantized: bool = False) -> Source:
        """Where bundle tensor ``t`` of ``expert`` at ``checkpoint_layer`` lives.

        Quantized bundles keep the checkpoint's row order (interleaved gate/up stays so, biases too).
        """
        if self.per_expert:
            stems = (self.gate, self.up) if t.proj == "w13" else (self.down,)
            suffix = PER_EXPERT_SUFFIX[t.part]
            names = tuple(s.format(L=checkpoint_layer, E=expert)[: -len(".weight")] + suffix for s in stems)
            return Source(names, False, expert)
        stem = self.fused_gate_up if t.proj == "w13" else self.fused_down
        name = stem.format(L=checkpoint_layer) + FUSED_SUFFIX[t.part]
        return Source((name,), True, expert, self.transposed and t.part == "weight",
                      self.interleaved and not quantized and t.proj == "w13" and t.part in ("weight", "bias"))


def _per(name: str, prefix: str, gate: str = "gate_proj", up: str = "up_proj", down: str = "down_proj",
         fused_prefix: Optional[str] = None, transposed: bool = False, interleaved: bool = False) -> Layout:
    fp = fused_prefix or prefix
    return Layout(name, f"{prefix}.{{E}}.{gate}.weight", f"{prefix}.{{E}}.{up}.weight", f"{prefix}.{{E}}.{down}.weight",
                  f"{fp}.gate_up_proj", f"{fp}.down_proj", transposed, interleaved)


_MLP = "model.layers.{L}.mlp.experts"
_FF = "model.layers.{L}.feed_forward.experts"

# Per-expert names first; the fused names are what transformers 5 writes with
# save_original_format=False (and what gpt-oss and Llama-4 ship).
PRESETS: dict[str, Layout] = {
    "deepseek": _per("deepseek", _MLP),
    "qwen": _per("qwen", _MLP),
    "mixtral": _per("mixtral", "model.layers.{L}.block_sparse_moe.experts", "w1", "w3", "w2", fused_prefix=_MLP),
    "jamba": _per("jamba", _FF),
    "lfm2": _per("lfm2", _FF, "w1", "w3", "w2"),
    "gpt-oss": Layout("gpt-oss", fused_gate_up=f"{_MLP}.gate_up_proj", fused_down=f"{_MLP}.down_proj",
                      transposed=True, interleaved=True),
    "llama4": Layout("llama4", fused_gate_up=f"{_FF}.gate_up_proj", fused_down=f"{_FF}.down_proj", transposed=True),
}


def resolve_layout(preset: Union[str, Layout]) -> Layout:
    """A Layout given as itself or by preset name; ConfigError names an unknown one."""
    if isinstance(preset, Layout):
        return preset
    if preset not in PRESETS:
        raise ConfigError(f"preset must be one of {sorted(PRESETS)} or a Layout, got {preset!r}")
    return PRESETS[preset]


def choose_variant(layout: Layout, weight_map: dict, checkpoint_layer: int, expert: int = 0) -> Layout:
    """The layout as this checkpoint uses it: per-expert names if its first expert is named so, else fused."""
    if layout.per_expert and layout.fused_gate_up is not None:
        if layout.tensor_names(checkpoint_layer, expert)[0] not in weight_map and \
                layout.fused_gate_up.format(L=checkpoint_layer) in weight_map:
            return layout.fused()
        return Layout(layout.name, layout.gate, layout.up, layout.down)
    return layout
