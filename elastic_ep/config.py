"""Frozen configuration: the model's expert geometry and the cluster's shape."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from .errors import ConfigError

_DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}


@dataclass(frozen=True)
class ModelSpec:
    """Geometry of one model's routed experts.

    Each expert is stored fused, as a fused-MoE kernel wants it:
    ``w13: [2 * intermediate, hidden]`` (gate rows then up rows) and
    ``w2: [hidden, intermediate]``.
    """

    num_layers: int = 4  # MoE layers (dense layers are not counted)
    num_experts: int = 16  # logical (routed) experts per MoE layer
    hidden: int = 64  # model hidden size
    intermediate: int = 32  # expert FFN intermediate size
    dtype: str = "bfloat16"  # storage and serving dtype
    first_layer: int = 0  # checkpoint index of the first MoE layer (DeepSeek-V2/V3 start with dense layers)
    num_groups: int = 1  # expert groups for node-limited routing (DeepSeek-V3 has 8)

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_experts", "hidden", "intermediate", "num_groups"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"ModelSpec.{name} must be a positive int, got {value!r}")
        if self.first_layer < 0:
            raise ConfigError(f"ModelSpec.first_layer must be >= 0, got {self.first_layer}")
        if self.dtype not in _DTYPE_BYTES:
            raise ConfigError(f"ModelSpec.dtype must be one of {sorted(_DTYPE_BYTES)}, got {self.dtype!r}")
        if self.num_experts % self.num_groups:
            raise ConfigError(
                f"ModelSpec.num_groups={self.num_groups} must divide num_experts={self.num_experts}"
            )

    @property
    def dtype_bytes(self) -> int:
        return _DTYPE_BYTES[self.dtype]

    @property
    def w13_shape(self) -> tuple[int, int]:
        return (2 * self.intermediate, self.hidden)

    @property
    def w2_shape(self) -> tuple[int, int]:
        return (self.hidden, self.intermediate)

    @property
    def expert_bytes(self) -> int:
        """Bytes of one expert (w13 + w2)."""
        return 3 * self.hidden * self.intermediate * self.dtype_bytes


@dataclass(frozen=True)
class ClusterConfig:
    """Shape and behaviour of one elastic EP cluster."""

    model: ModelSpec = field(default_factory=ModelSpec)
    checkpoint: Optional[str] = None  # folder of a HF-style safetensors checkpoint
    preset: str = "deepseek"  # expert tensor naming: deepseek | qwen | mixtral
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
    max_restarts: int = 0  # Ray actor restarts per worker (0: replace from spares instead)
    auto_recover: bool = True  # the controller heals a dead rank on its own as soon as it notices
    state_dir: Optional[str] = None  # where the controller persists layout/epoch/membership
    name: str = "elastic-ep"  # cluster name (namespaces actors and groups)
    # GPUs per worker in creation order (ranks, then spares); None: one GPU each. Lets a
    # hot spare share a GPU with a rank on small machines, e.g. (1.0, 0.5, 0.5).
    gpu_fractions: Optional[tuple[float, ...]] = None

    def __post_init__(self) -> None:
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
        if self.preset not in ("deepseek", "qwen", "mixtral"):
            raise ConfigError(f"preset must be deepseek, qwen or mixtral, got {self.preset!r}")
        for name in ("call_timeout_s", "transfer_timeout_s", "startup_timeout_s"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.gpu_fractions is not None and any(not 0 < g <= 8 for g in self.gpu_fractions):
            raise ConfigError(f"gpu_fractions must be in (0, 8], got {self.gpu_fractions}")
        if not 0 <= self.staging_reserve <= 4:
            raise ConfigError(f"staging_reserve must be in [0, 4], got {self.staging_reserve}")
        if self.load_window <= 0:
            raise ConfigError(f"load_window must be >= 1, got {self.load_window}")
