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


class ClusterNotFoundError(ElasticEPError):
    """No Ray answers at the address, or no elastic-ep cluster of that name runs there."""


class ServingInputError(ElasticEPError, ValueError):
    """A serving call's input is malformed: hidden states, router decisions or layer (names the value)."""


class NotAnMoELayerError(ServingInputError):
    """A serving call named a layer that is not one of the model's MoE layers."""


class StaleEpochError(ElasticEPError):
    """A worker holds another committed epoch than the call was planned on; the client re-plans."""

    def __init__(self, message: str, worker_epoch: int, call_epoch: int):
        super().__init__(message)
        self.worker_epoch = worker_epoch
        self.call_epoch = call_epoch

    def __reduce__(self):  # survives pickling across actor boundaries
        return type(self), (str(self), self.worker_epoch, self.call_epoch)


class ExpertsUnavailableError(ElasticEPError):
    """Some experts a call needs have no replica on a live rank right now (wait for recovery)."""

    def __init__(self, message: str, experts: list[tuple[int, int]]):
        super().__init__(message)
        self.experts = experts  # [(layer, logical_expert)]

    def __reduce__(self):
        return type(self), (str(self), self.experts)


class ServingError(ElasticEPError):
    """A serving call failed on the ranks (a rank died or timed out) after its retries."""
