"""Frozen configuration: the model's expert geometry and the cluster's shape."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from .checkpoint.formats import DTYPES, FLOAT_DTYPES
from .errors import ConfigError

_QUANTS = ("none", "fp8", "mxfp4", "int4")
ACTIVATIONS = ("silu", "swigluoai")  # see ModelSpec.activation


@dataclass(frozen=True)
class ModelSpec:
    """Geometry of one model's routed experts, and the bundle of tensors each expert is.

    Unquantized experts are held fused, as a fused-MoE kernel wants them:
    ``w13: [2 * intermediate, hidden]`` (gate rows then up rows) and
    ``w2: [hidden, intermediate]``; quantized ones add their scales (see
    ``elastic_ep.checkpoint.formats``). MoE layers are indexed ``0 <= layer < num_layers``;
    ``checkpoint_layers[layer]`` is that layer's index in the checkpoint.
    """

    num_layers: int = 4  # MoE layers (dense layers are not counted)
    num_experts: int = 16  # logical (routed) experts per MoE layer
    hidden: int = 64  # model hidden size
    intermediate: int = 32  # expert FFN intermediate size
    dtype: str = "bfloat16"  # storage and serving dtype
    first_layer: int = 0  # checkpoint index of the first MoE layer (DeepSeek-V2/V3 start with dense layers)
    num_groups: int = 1  # expert groups for node-limited routing (DeepSeek-V3 has 8)
    # Checkpoint indices of the MoE layers when they are not first_layer.. contiguous
    # (interleaved MoE layers, Jamba, Llama-4, Qwen mlp_only_layers, DeepSeek's MTP layer).
    moe_layers: Optional[tuple[int, ...]] = None
    quant: str = "none"  # expert format: none | fp8 (block-scaled) | mxfp4 | int4 (pack-quantized)
    block: tuple[int, int] = (128, 128)  # fp8 scale block (rows, columns), from quantization_config
    group_size: int = 32  # int4 columns per scale
    bias: bool = False  # experts carry biases (gpt-oss)
    shared_experts: int = 0  # shared experts per MoE layer: left to the serving engine, not managed
    # Expert activation: "silu" (silu(gate) * up: Mixtral, Qwen, DeepSeek, ...) or "swigluoai" (gpt-oss's
    # clamped SwiGLU: alpha 1.702, limit 7, (up + 1) * glu, with biases). None: "swigluoai" where
    # experts carry biases (gpt-oss, the one such family), else "silu".
    activation: Optional[str] = None

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_experts", "hidden", "intermediate", "num_groups"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"ModelSpec.{name} must be a positive int, got {value!r}")
        if self.first_layer < 0:
            raise ConfigError(f"ModelSpec.first_layer must be >= 0, got {self.first_layer}")
        if self.dtype not in FLOAT_DTYPES:
            raise ConfigError(f"ModelSpec.dtype must be one of {sorted(FLOAT_DTYPES)}, got {self.dtype!r}")
        if self.num_experts % self.num_groups:
            raise ConfigError(
                f"ModelSpec.num_groups={self.num_groups} must divide num_experts={self.num_experts}"
            )
        if self.moe_layers is not None:
            layers = tuple(self.moe_layers)
            if (len(layers) != self.num_layers or any(not isinstance(x, int) or x < 0 for x in layers)
                    or list(layers) != sorted(set(layers))):
                raise ConfigError(
                    f"ModelSpec.moe_layers must be {self.num_layers} increasing layer indices >= 0, got {self.moe_layers!r}"
                )
            object.__setattr__(self, "moe_layers", layers)
        if self.quant not in _QUANTS:
            raise ConfigError(f"ModelSpec.quant must be one of {list(_QUANTS)}, got {self.quant!r}")
        object.__setattr__(self, "block", tuple(self.block))
        if self.activation is None:
            object.__setattr__(self, "activation", "swigluoai" if self.bias else "silu")
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"ModelSpec.activation must be one of {list(ACTIVATIONS)}, got {self.activation!r}")
        self.expert_format  # block sizes that do not divide the weights fail here, naming them

    @property
    def checkpoint_layers(self) -> tuple[int, ...]:
        """Checkpoint index of each MoE layer: [num_layers]."""
        if self.moe_layers is not None:
            return self.moe_layers
        return tuple(range(self.first_layer, self.first_layer + self.num_layers))

    @property
    def expert_format(self) -> Any:
        """The ExpertFormat (ordered named tensors, byte row) of one expert."""
        from .checkpoint.formats import format_of

        return format_of(self)

    @property
    def dtype_bytes(self) -> int:
        return DTYPES[self.dtype][0]

    @property
    def w13_shape(self) -> tuple[int, int]:
        return (2 * self.intermediate, self.hidden)

    @property
    def w2_shape(self) -> tuple[int, int]:
        return (self.hidden, self.intermediate)

    @property
    def expert_bytes(self) -> int:
        """Bytes one expert moves: its bundle's byte row (every tensor, scales included, 16-byte aligned)."""
        return self.expert_format.row_bytes


@dataclass(frozen=True)
class ClusterConfig:
    """Shape and behaviour of one elastic EP cluster."""

    # Expert geometry and format; None: read from the checkpoint's config.json (ModelSpec() without one).
    model: Optional[ModelSpec] = None
    # Folder of a HF-style safetensors checkpoint (a hub cache snapshot is fine), or a hub repo id
    # ("org/name") that huggingface_hub resolves from its cache; replaced by the local folder.
    checkpoint: Optional[str] = None
    # Expert tensor naming: a preset name (see elastic_ep.checkpoint.PRESETS) or a Layout;
    # None: the checkpoint's family's preset ("deepseek" without one).
    preset: Any = None
    num_ranks: int = 4  # active EP ranks (one worker actor each)
    slots_per_rank: int = 5  # physical slots per rank (logical + redundant over ranks)
    num_spares: int = 1  # hot spare workers started in advance
    num_nodes: int = 1  # nodes the ranks are spread over (hierarchical balancing when > 1)
    policy: str = "sticky"  # balancing policy: sticky | eplb
    device: str = "cpu"  # cpu (Gloo) or cuda (NCCL)
    address: Optional[str] = None  # Ray address; None starts an embedded local Ray
    keep_backups: bool = True  # host-memory copies of every expert in the object store
    # Hot spares map every host backup ahead of a takeover (page-locked on GPUs), so a
    # replacement copies them at DMA speed instead of through pageable memory.
    prepare_spares: bool = True
    # GPU staging kept in torch's allocator cache, as a fraction of a rank's expert bytes
    # (hot spares keep a whole rank's worth): transfers then allocate without cudaMalloc.
    staging_reserve: float = 0.6
    # Storage reads of a dead rank's experts shared with the live ranks on its node, which
    # relay theirs over the GPU links: every GPU's host link carries a share. None: on
    # GPUs only. Members then also map (page-lock) the backups they could relay.
    stripe_fetches: Optional[bool] = None
    call_timeout_s: float = 60.0  # bound on every remote call
    transfer_timeout_s: float = 30.0  # bound on one transfer phase; peers are aborted after it
    startup_timeout_s: float = 120.0  # bound on starting and loading one worker
    load_window: int = 8  # load reports kept in the sliding window for rebalance()
    # MoE layers a rebalance migrates per commit (elastic_ep.migration): staging then holds one
    # step's slots and each commit swaps a few layers between serving calls. 0: the whole model
    # in one commit. Only rebalances that change no membership and read nothing from storage.
    layers_per_step: int = 0
    max_restarts: int = 0  # Ray actor restarts per worker (0: replace from spares instead)
    auto_recover: bool = True  # the controller heals a dead rank on its own as soon as it notices
    state_dir: Optional[str] = None  # where the controller persists layout/epoch/membership
    name: str = "elastic-ep"  # cluster name (namespaces actors and groups)
    # GPUs per worker in creation order (ranks, then spares); None: one GPU each. Lets a
    # hot spare share a GPU with a rank on small machines, e.g. (1.0, 0.5, 0.5).
    gpu_fractions: Optional[tuple[float, ...]] = None

    def __post_init__(self) -> None:
        self._resolve_checkpoint()
        if self.num_ranks <= 0:
            raise ConfigError(f"num_ranks must be >= 1, got {self.num_ranks}")
        if self.slots_per_rank <= 0:
            raise ConfigError(f"slots_per_rank must be >= 1, got {self.slots_per_rank}")
        if self.num_spares < 0:
            raise ConfigError(f"num_spares must be >= 0, got {self.num_spares}")
        if self.num_nodes <= 0:
            raise ConfigError(f"num_nodes must be >= 1, got {self.num_nodes}")
        if self.num_ranks % self.num_nodes:
            raise ConfigError(f"num_nodes={self.num_nodes} must divide num_ranks={self.num_ranks}")
        total = self.num_ranks * self.slots_per_rank
        if total < self.model.num_experts:
            raise ConfigError(
                f"{self.num_ranks} ranks x {self.slots_per_rank} slots = {total} slots cannot hold "
                f"{self.model.num_experts} logical experts"
            )
        if self.policy not in ("sticky", "eplb"):
            raise ConfigError(f"policy must be 'sticky' or 'eplb', got {self.policy!r}")
        if self.device not in ("cpu", "cuda"):
            raise ConfigError(f"device must be 'cpu' or 'cuda', got {self.device!r}")
        from .checkpoint.layouts import resolve_layout

        resolve_layout(self.preset)  # ConfigError naming an unknown preset
        for name in ("call_timeout_s", "transfer_timeout_s", "startup_timeout_s"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.gpu_fractions is not None and any(not 0 < g <= 8 for g in self.gpu_fractions):
            raise ConfigError(f"gpu_fractions must be in (0, 8], got {self.gpu_fractions}")
        if not 0 <= self.staging_reserve <= 4:
            raise ConfigError(f"staging_reserve must be in [0, 4], got {self.staging_reserve}")
        if isinstance(self.layers_per_step, bool) or not isinstance(self.layers_per_step, int) \
                or self.layers_per_step < 0:
            raise ConfigError(f"layers_per_step must be an int >= 0, got {self.layers_per_step!r}")
        if self.load_window <= 0:
            raise ConfigError(f"load_window must be >= 1, got {self.load_window}")

    def _resolve_checkpoint(self) -> None:
        """Fill ``model`` and ``preset`` from the checkpoint's config.json where not given (CheckpointError
        naming the key when its geometry cannot be told), and resolve a hub repo id to its local folder."""
        if self.checkpoint is not None:
            from pathlib import Path

            from .checkpoint.geometry import CONFIG_FILE, read_spec
            from .checkpoint.hub import resolve_checkpoint
            from .errors import CheckpointError

            folder = Path(self.checkpoint)
            if self.model is None or folder.is_dir() or not folder.exists():
                try:
                    folder = resolve_checkpoint(self.checkpoint)
                except CheckpointError:
                    if self.model is None:
                        raise
                    folder = None  # the controller's start-up check names what is wrong with it
            if folder is not None:
                object.__setattr__(self, "checkpoint", str(folder))
            if self.model is None:
                spec, preset = read_spec(folder)
                object.__setattr__(self, "model", spec)
                if self.preset is None:
                    object.__setattr__(self, "preset", preset)
            elif self.preset is None and folder is not None and (folder / CONFIG_FILE).exists():
                try:
                    object.__setattr__(self, "preset", read_spec(folder)[1])
                except CheckpointError:
                    pass  # the user's ModelSpec stands; the default naming is tried
        if self.model is None:
            object.__setattr__(self, "model", ModelSpec())
        if self.preset is None:
            object.__setattr__(self, "preset", "deepseek")
