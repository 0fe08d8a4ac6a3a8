"""RebalanceReport: what one reconfiguration changed, moved and cost, phase by phase."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Optional


@dataclass
class RebalanceReport:
    """The outcome of one rebalance or recovery (JSON friendly through ``to_dict``).

    phases: seconds per step of the controller's state machine, keyed by ``elastic_ep.faults.Step``
    values (detect, decide, plan, communicators, transfer, verify, persist, commit, replenish).
    bytes_p2p / bytes_from_backup / bytes_from_checkpoint: where the moved weights came from.
    migration_steps / commits: steps the move was cut into (1: the whole model at once; more: layerwise,
    see ``elastic_ep.migration``) and commits made; staging_peak_bytes: rank -> the most bytes it
    staged at once (received, read or copied, held until a commit).
    """

    reason: str
    epoch_from: int
    attempt: int = 1
    epoch_to: Optional[int] = None
    noop: bool = False
    phases: dict[str, float] = field(default_factory=dict)
    replaced: dict[int, str] = field(default_factory=dict)  # rank -> worker that took it over
    dropped: list[int] = field(default_factory=list)
    added: list[int] = field(default_factory=list)
    plan: dict = field(default_factory=dict)
    bytes_p2p: int = 0
    bytes_from_backup: int = 0
    bytes_from_checkpoint: int = 0
    slots_verified: int = 0
    balance: dict[str, float] = field(default_factory=dict)  # mean over layers of max/mean rank load
    worker_timings: dict[int, dict] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    total_s: float = 0.0
    since_death_s: Optional[float] = None  # recoveries: from the death being noticed to commit
    committed_at: Optional[float] = None  # wall-clock time (time.time()) the new layout became live
    released: list[str] = field(default_factory=list)  # workers let go (shrink beyond the spare pool, drain)
    safe_to_terminate_at: Optional[float] = None  # drain: wall clock from which the released process may end
    migration_steps: int = 0
    commits: int = 0
    staging_peak_bytes: dict[int, int] = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["replaced"] = {str(k): v for k, v in self.replaced.items()}
        d["worker_timings"] = {str(k): v for k, v in self.worker_timings.items()}
        d["staging_peak_bytes"] = {str(k): v for k, v in self.staging_peak_bytes.items()}
        return d

    @property
    def critical_path_s(self) -> float:
        """Seconds from detection to commit (spare replenishment happens after)."""
        return critical_path_s(self.phases)


def critical_path_s(phases: dict) -> float:
    """Seconds of a report's ``phases`` from detection to commit (every step before REPLENISH)."""
    from .faults import Step

    return sum(phases.get(s.value, 0.0) for s in Step if s not in (Step.REPLENISH, Step.DONE))


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'; keeps small moves visible instead of rounding them to 0.0 MiB."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def format_report(d: dict) -> str:
    """A short human-readable rendering of a report dict."""
    ph = d.get("phases", {})
    parts = [f"{k} {1e3 * v:.0f}ms" for k, v in ph.items()]
    lines = [
        f"{d['reason']}: epoch {d['epoch_from']} -> {d.get('epoch_to')}"
        + (" (nothing to move)" if d.get("noop") else "")
        + (f", attempt {d['attempt']}" if d.get("attempt", 1) > 1 else ""),
        "  phases: " + ", ".join(parts),
        f"  moved: p2p {human_bytes(d['bytes_p2p'])}, backups {human_bytes(d['bytes_from_backup'])}, "
        f"checkpoint {human_bytes(d['bytes_from_checkpoint'])}; slots verified {d['slots_verified']}",
    ]
    plan = d.get("plan") or {}
    if plan:
        lines.append(
            f"  plan: keep {plan.get('keeps')}, copy {plan.get('copies')}, receive {plan.get('transfers')}, "
            f"fetch {plan.get('fetches')} in {plan.get('stages')} stages"
        )
    if d.get("migration_steps", 0) > 1 or d.get("staging_peak_bytes"):
        lines.append(f"  migration: {d.get('commits', 0)} of {d.get('migration_steps', 0)} steps committed, peak staging "
                     f"per rank {human_bytes(max(d.get('staging_peak_bytes', {}).values(), default=0))}")
    if d.get("balance"):
        lines.append("  balance (max/mean rank load): " + ", ".join(f"{k} {v:.3f}" for k, v in d["balance"].items()))
    if d.get("replaced"):
        lines.append("  replaced: " + ", ".join(f"rank {r} -> {w}" for r, w in d["replaced"].items()))
    if d.get("dropped"):
        lines.append(f"  dropped ranks: {d['dropped']}")
    if d.get("added"):
        lines.append(f"  added ranks: {d['added']}")
    for f in d.get("failures", []):
        lines.append(f"  retried after: {f}")
    for n in d.get("notes", []):
        lines.append(f"  note: {n}")
    return "\n".join(lines)
