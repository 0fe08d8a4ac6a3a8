"""Storage layouts (naming presets): where each tensor of an expert bundle lives in a checkpoint; pure.

A ``Layout`` names one expert's projections per expert (``gate``/``up``/``down``
templates ending in ``.weight``, with ``{L}`` the checkpoint layer and ``{E}`` the
expert), and/or a layer's experts fused into one tensor per projection
(``fused_gate_up``/``fused_down``, with ``{L}`` only, ``[E, ...]``; or gate and up in two,
``fused_gate``/``fused_up``). Fused weights may be stored transposed (``[E, H, 2I]`` /
``[E, I, H]``, gpt-oss and Llama-4; ``down_transposed`` apart from gate/up, DBRX), gate/up
interleaved (gpt-oss: gate at even columns, up at odd), and ``flat``: experts stacked along
dim 0 as ``[E * rows, cols]`` (DBRX). Other parts of a bundle replace ``.weight`` by their
suffix (``.weight_scale_inv``) or append one to a fused name (``_blocks``). ``alternatives``
are other layouts of the same family (transformers 5's fused save, a multimodal prefix);
``choose_variant`` picks the one a checkpoint uses.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
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
    stacked, for ``shape`` parts), or fused tensors sliced at ``expert`` and joined likewise.
    """

    names: tuple[str, ...]
    fused: bool
    expert: int
    transposed: bool = False  # fused weight stored [E, cols, rows]
    interleaved: bool = False  # fused gate/up rows alternate (gate even, up odd)
    flat: bool = False  # fused experts stacked along dim 0: [E * rows, cols]


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
    fused_gate: Optional[str] = None  # gate and up fused apart (DBRX's w1, v1), instead of fused_gate_up
    fused_up: Optional[str] = None
    down_transposed: Optional[bool] = None  # fused down stored [E, I, H]; None: as ``transposed``
    flat: bool = False  # fused experts stacked as [E * rows, cols] (DBRX)
    alternatives: tuple["Layout", ...] = ()  # other layouts of the family, tried in order

    def __post_init__(self) -> None:
        per = (self.gate, self.up, self.down)
        if any(t is not None for t in per) and any(t is None for t in per):
            raise ConfigError(f"layout {self.name!r}: gate, up and down must be given together")
        if (self.fused_gate is None) != (self.fused_up is None):
            raise ConfigError(f"layout {self.name!r}: fused_gate and fused_up must be given together")
        if self.fused_gate is not None and self.fused_gate_up is not None:
            raise ConfigError(f"layout {self.name!r}: give fused_gate_up or fused_gate and fused_up, not both")
        fused = (self.fused_gate_up if self.fused_gate is None else self.fused_gate, self.fused_down)
        if any(t is not None for t in fused) and any(t is None for t in fused):
            raise ConfigError(f"layout {self.name!r}: fused gate/up and fused_down must be given together")
        if self.gate is None and fused[0] is None:
            raise ConfigError(f"layout {self.name!r} names neither per-expert nor fused tensors")
        if self.interleaved and self.fused_gate is not None:
            raise ConfigError(f"layout {self.name!r}: interleaved gate/up needs them in one fused tensor")
        for t in per:
            if t is not None and ("{L}" not in t or "{E}" not in t or not t.endswith(".weight")):
                raise ConfigError(f"layout {self.name!r}: per-expert name {t!r} needs {{L}}, {{E}} and to end in .weight")
        for t in (*fused, self.fused_up):
            if t is not None and ("{L}" not in t or "{E}" in t):
                raise ConfigError(f"layout {self.name!r}: fused name {t!r} needs {{L}} and no {{E}}")
        if not all(isinstance(a, Layout) for a in self.alternatives):
            raise ConfigError(f"layout {self.name!r}: alternatives must be Layouts")

    @property
    def per_expert(self) -> bool:
        return self.gate is not None

    @property
    def has_fused(self) -> bool:
        return self.fused_down is not None

    def tensor_names(self, checkpoint_layer: int, expert: int) -> tuple[str, str, str]:
        """(gate, up, down) weight names of one expert (per-expert layouts)."""
        if not self.per_expert:
            raise ConfigError(f"layout {self.name!r} is fused: it has no per-expert names")
        return tuple(t.format(L=checkpoint_layer, E=expert) for t in (self.gate, self.up, self.down))

    def first_name(self, checkpoint_layer: int, expert: int = 0) -> str:
        """The first weight this layout reads at a layer: the per-expert gate, else the fused gate(/up)."""
        if self.per_expert:
            return self.tensor_names(checkpoint_layer, expert)[0]
        return (self.fused_gate_up or self.fused_gate).format(L=checkpoint_layer)

    def fused(self) -> "Layout":
        """This layout restricted to its fused tensors."""
        return replace(self, gate=None, up=None, down=None, alternatives=())

    def variants(self) -> tuple["Layout", ...]:
        """Each single form this layout names: per-expert, fused, then its alternatives' forms."""
        own = []
        if self.per_expert:
            own.append(replace(self, fused_gate_up=None, fused_down=None, fused_gate=None, fused_up=None,
                               alternatives=()))
        if self.has_fused:
            own.append(self.fused())
        return (*own, *(v for alt in self.alternatives for v in alt.variants()))

    def source(self, t: TensorSpec, checkpoint_layer: int, expert: int, quantized: bool = False) -> Source:
        """Where bundle tensor ``t`` of ``expert`` at ``checkpoint_layer`` lives.

        Quantized bundles keep the checkpoint's row order (interleaved gate/up stays so, biases too).
        """
        if self.per_expert:
            stems = (self.gate, self.up) if t.proj == "w13" else (self.down,)
            suffix = PER_EXPERT_SUFFIX[t.part]
            names = tuple(s.format(L=checkpoint_layer, E=expert)[: -len(".weight")] + suffix for s in stems)
            return Source(names, False, expert)
        if t.proj == "w13":
            stems = (self.fused_gate_up,) if self.fused_gate_up is not None else (self.fused_gate, self.fused_up)
            transposed = self.transposed
        else:
            stems = (self.fused_down,)
            transposed = self.transposed if self.down_transposed is None else self.down_transposed
        names = tuple(s.format(L=checkpoint_layer) + FUSED_SUFFIX[t.part] for s in stems)
        return Source(names, True, expert, transposed and t.part == "weight",
                      self.interleaved and not quantized and t.proj == "w13" and t.part in ("weight", "bias"),
                      self.flat)


def _per(name: str, prefix: str, gate: str = "gate_proj", up: str = "up_proj", down: str = "down_proj",
         fused_prefix: Optional[str] = None, transposed: bool = False, interleaved: bool = False) -> Layout:
    fp = fused_prefix or prefix
    return Layout(name, f"{prefix}.{{E}}.{gate}.weight", f"{prefix}.{{E}}.{up}.weight", f"{prefix}.{{E}}.{down}.weight",
                  f"{fp}.gate_up_proj", f"{fp}.down_proj", transposed, interleaved)


def _fused(name: str, prefix: str, gate_up: str = "gate_up_proj", down: str = "down_proj", **kw) -> Layout:
    return Layout(name, fused_gate_up=f"{prefix}.{gate_up}", fused_down=f"{prefix}.{down}", **kw)


_MLP = "model.layers.{L}.mlp.experts"
_FF = "model.layers.{L}.feed_forward.experts"
_GRANITE = "model.layers.{L}.block_sparse_moe"

# Per-expert names first; the fused names are what transformers 5 writes with
# save_original_format=False (and what gpt-oss and Llama-4 ship). Llama-4's multimodal
# model (Llama4ForConditionalGeneration) prefixes its text model's names with "language_model.".
PRESETS: dict[str, Layout] = {
    "deepseek": _per("deepseek", _MLP),
    "qwen": _per("qwen", _MLP),
    "mixtral": _per("mixtral", "model.layers.{L}.block_sparse_moe.experts", "w1", "w3", "w2", fused_prefix=_MLP),
    "jamba": _per("jamba", _FF),
    "lfm2": _per("lfm2", _FF, "w1", "w3", "w2"),
    "gpt-oss": _fused("gpt-oss", _MLP, transposed=True, interleaved=True),
    "llama4": _fused("llama4", _FF, transposed=True,
                     alternatives=(_fused("llama4", f"language_model.{_FF}", transposed=True),)),
    # GraniteMoE: [E, 2I, H] and [E, H, I] as ParallelExperts' weights; transformers 5 renames them
    "granitemoe": _fused("granitemoe", _GRANITE, "input_linear.weight", "output_linear.weight",
                         alternatives=(_fused("granitemoe", f"{_GRANITE}.experts"),)),
    "jetmoe": _fused("jetmoe", "model.layers.{L}.mlp", "input_linear.weight", "output_linear.weight"),
    # DBRX: w1 (gate), v1 (up) [E * I, H]; w2 [E * I, H] is each expert's down projection transposed
    "dbrx": Layout("dbrx", fused_gate="transformer.blocks.{L}.ffn.experts.mlp.w1",
                   fused_up="transformer.blocks.{L}.ffn.experts.mlp.v1",
                   fused_down="transformer.blocks.{L}.ffn.experts.mlp.w2", down_transposed=True, flat=True),
}


def resolve_layout(preset: Union[str, Layout]) -> Layout:
    """A Layout given as itself or by preset name; ConfigError names an unknown one."""
    if isinstance(preset, Layout):
        return preset
    if preset not in PRESETS:
        raise ConfigError(f"preset must be one of {sorted(PRESETS)} or a Layout, got {preset!r}")
    return PRESETS[preset]


def choose_variant(layout: Layout, weight_map, checkpoint_layer: int, expert: int = 0) -> Layout:
    """The single form of ``layout`` this checkpoint uses: the first variant whose first weight it names
    (per-expert names, then fused, then the alternatives'); the first variant when none is named."""
    variants = layout.variants()
    return next((v for v in variants if v.first_name(checkpoint_layer, expert) in weight_map), variants[0])
