"""elastic-ep: keep a Mixture-of-Experts model's expert weights served on Ray while GPUs die, join, or load shifts.

The planning core (layout, balance, plan) is pure numpy; the runtime (cluster,
actors, transport, storage) needs Ray and torch and is imported lazily.
"""

from .config import ClusterConfig, ModelSpec
from .errors import *  # noqa: F401,F403  (typed errors are part of the public API)
from .layout import ExpertLayout
from .report import RebalanceReport
from .status import ClusterStatus, CommittedView, StartReport, VerifyResult

__version__ = "0.1.0"

__all__ = ["ClusterConfig", "ModelSpec", "ExpertLayout", "ClusterStatus", "CommittedView", "RebalanceReport",
           "StartReport", "VerifyResult", "ElasticEPCluster", "__version__"]


def __getattr__(name):
    if name == "ElasticEPCluster":
        from .cluster import ElasticEPCluster

        return ElasticEPCluster
    raise AttributeError(name)
