"""Typed errors: every failure a user can act on has its own class and names the bad value."""


class ElasticEPError(Exception):
    """Base class of every error elastic-ep raises on purpose."""


class LayoutError(ElasticEPError, ValueError):
    """A layout is malformed: wrong shape, ids out of range, duplicates, or missing experts."""


class CapacityError(ElasticEPError, ValueError):
    """The live slots cannot hold every logical expert (or a rank would hold an expert twice)."""


class ConfigError(ElasticEPError, ValueError):
    """A configuration value is impossible (zero ranks, slots that do not divide, ...)."""


class LoadStatsError(ElasticEPError, ValueError):
    """Load statistics are malformed: wrong shape, NaN, infinite or negative values."""


class CheckpointError(ElasticEPError):
    """A checkpoint is missing, truncated, corrupted, escapes its folder, or does not match the spec."""


class TransferError(ElasticEPError):
    """A transfer failed or timed out; live weights are untouched."""


class TransferTimeoutError(TransferError, TimeoutError):
    """A transfer did not finish within its deadline; its communicator was aborted."""


class FormationAbandoned(TransferError):
    """A group's formation was called off (a member died before joining): re-plan and form a new one."""


class PeerDiedError(TransferError):
    """A peer of a transfer died mid-flight."""


class VerificationError(ElasticEPError):
    """A slot's contents do not match the logical expert the layout says it holds."""


class ExpertsLostError(ElasticEPError):
    """Some logical experts have no copy left anywhere (no rank, no backup, no checkpoint)."""

    def __init__(self, message: str, lost: list[tuple[int, int]]):
        super().__init__(message)
        self.lost = lost  # [(layer, logical_expert)]

    def __reduce__(self):  # survives pickling across actor boundaries (args alone lack ``lost``)
        return type(self), (str(self), self.lost)


class WorkerStartupError(ElasticEPError):
    """A worker actor did not start or load its slots within its timeout."""


class UnknownRankError(ElasticEPError, ValueError):
    """A rank id that the cluster does not have was named."""
