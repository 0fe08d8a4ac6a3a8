"""RebalanceReport: what one reconfiguration changed, moved and cost, phase by phase."""

from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any, Optional, Union

from .status import ReadAsDict


@dataclass(frozen=True)
class RebalanceReport(ReadAsDict):
    """The outcome of one rebalance, recovery, grow, shrink or drain (what the cluster API returns).

    phases: seconds per step of the controller's state machine, keyed by ``elastic_ep.faults.Step``
    values (detect, decide, plan, communicators, transfer, verify, persist, commit, replenish).
    bytes_p2p / bytes_from_backup / bytes_from_checkpoint: where the moved weights came from.
    migration_steps / commits: steps the move was cut into (1: the whole model at once; more: layerwise,
    see ``elastic_ep.migration``) and commits made; staging_peak_bytes: rank -> the most bytes it
    staged at once (received, read or copied, held until a commit).
    plan: ``TransferPlan.summary()`` (keeps, copies, transfers, fetches, stages, bytes, ...).
    ``to_dict()`` is its JSON form (rank keys as str), the form ``status()["history"]`` keeps;
    ``report["key"]`` reads that form too (backward compatibility; prefer attributes).
    """

    reason: str
    epoch_from: int
    attempt: int = 1
    epoch_to: Optional[int] = None
    noop: bool = False
    phases: dict[str, float] = field(default_factory=dict)
    replaced: dict[int, str] = field(default_factory=dict)  # rank -> worker that took it over
    dropped: tuple[int, ...] = ()
    added: tuple[int, ...] = ()
    plan: dict[str, Any] = field(default_factory=dict)
    bytes_p2p: int = 0
    bytes_from_backup: int = 0
    bytes_from_checkpoint: int = 0
    slots_verified: int = 0
    balance: dict[str, float] = field(default_factory=dict)  # mean over layers of max/mean rank load
    worker_timings: dict[int, dict[str, float]] = field(default_factory=dict)  # rank -> executor seconds
    failures: tuple[str, ...] = ()  # attempts that failed before the one that committed
    notes: tuple[str, ...] = ()
    total_s: float = 0.0
    since_death_s: Optional[float] = None  # recoveries: from the death being noticed to commit
    committed_at: Optional[float] = None  # wall-clock time (time.time()) the new layout became live
    released: tuple[str, ...] = ()  # workers let go (shrink beyond the spare pool, drain)
    safe_to_terminate_at: Optional[float] = None  # drain: wall clock from which the released process may end
    migration_steps: int = 0
    commits: int = 0
    staging_peak_bytes: dict[int, int] = field(default_factory=dict)
    started_at: Optional[float] = None  # wall clock the request began
    finished_at: Optional[float] = None  # wall clock it returned

    def to_dict(self) -> dict:
        d = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}
        d["replaced"] = {str(k): v for k, v in self.replaced.items()}
        d["worker_timings"] = {str(k): v for k, v in self.worker_timings.items()}
        d["staging_peak_bytes"] = {str(k): v for k, v in self.staging_peak_bytes.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "RebalanceReport":
        """The report of a ``to_dict()`` (e.g. an entry of ``status()["history"]``); unknown keys are ignored."""
        known = {f.name for f in fields(cls)}
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in known}
        values["replaced"] = {int(k): v for k, v in d.get("replaced", {}).items()}
        values["worker_timings"] = {int(k): v for k, v in d.get("worker_timings", {}).items()}
        values["staging_peak_bytes"] = {int(k): v for k, v in d.get("staging_peak_bytes", {}).items()}
        return cls(**values)

    @property
    def critical_path_s(self) -> float:
        """Seconds from detection to commit (spare replenishment happens after)."""
        return critical_path_s(self.phases)


class ReportDraft:
    """A RebalanceReport being filled in while a reconfiguration runs: the same fields, mutable
    (lists where the report has tuples); ``freeze()`` gives the report."""

    def __init__(self, **values):
        for f in fields(RebalanceReport):
            if f.name in values:
                v = values[f.name]
            elif f.default_factory is not MISSING:
                v = f.default_factory()
            elif f.default is not MISSING:
                v = f.default
            else:
                raise TypeError(f"ReportDraft needs {f.name}")
            object.__setattr__(self, f.name, list(v) if isinstance(v, tuple) else v)

    def __setattr__(self, name: str, value) -> None:
        if name not in RebalanceReport.__dataclass_fields__:
            raise AttributeError(f"a RebalanceReport has no field {name!r}")
        object.__setattr__(self, name, value)

    def freeze(self) -> RebalanceReport:
        values = {}
        for f in fields(RebalanceReport):
            v = getattr(self, f.name)
            values[f.name] = tuple(v) if isinstance(v, list) else dict(v) if isinstance(v, dict) else v
        return RebalanceReport(**values)


def put_entry(history: list[dict], index: Optional[int], entry: dict) -> int:
    """Put a report's dict in ``history``: in place of ``history[index]``, or appended when index is
    None; returns where it went (a reconfiguration updates its own entry commit after commit)."""
    if index is None:
        history.append(entry)
        return len(history) - 1
    history[index] = entry
    return index


RESUMED_NOTE = "the controller restarted before this returned; the restarted one committed or finished it"


def resume_history(history: list[dict], pending_report: Optional[dict], epoch: Optional[int]) -> None:
    """After a controller restart: put the decided reconfiguration's report on record.

    history: the saved ``history``; an entry whose ``finished_at`` is None is one a controller
    recorded at a commit and never finished. pending_report / epoch: the report saved with the
    decision (``pending_commit``) and the epoch it commits, or None when nothing was pending.
    The pending report replaces the unfinished entry of the same reconfiguration (same reason and
    ``epoch_from``, a layerwise one committed earlier steps) or is appended; every unfinished
    entry gets a note saying so.
    """
    if pending_report is not None:
        entry = dict(pending_report, epoch_to=epoch, commits=int(pending_report.get("commits", 0)) + 1)
        last = history[-1] if history else None
        same = (last is not None and last.get("finished_at") is None and last["reason"] == entry["reason"]
                and last["epoch_from"] == entry["epoch_from"])
        put_entry(history, len(history) - 1 if same else None, entry)
    for h in history:
        if h.get("finished_at") is None and RESUMED_NOTE not in h.get("notes", []):
            h["notes"] = list(h.get("notes", [])) + [RESUMED_NOTE]


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


def format_report(report: Union[RebalanceReport, dict]) -> str:
    """A short human-readable rendering of a report (or of its dict, e.g. a ``status()["history"]`` entry)."""
    r = RebalanceReport.from_dict(report) if isinstance(report, dict) else report
    parts = [f"{k} {1e3 * v:.0f}ms" for k, v in r.phases.items()]
    lines = [
        f"{r.reason}: epoch {r.epoch_from} -> {r.epoch_to}"
        + (" (nothing to move)" if r.noop else "")
        + (f", attempt {r.attempt}" if r.attempt > 1 else ""),
        "  phases: " + ", ".join(parts),
        f"  moved: p2p {human_bytes(r.bytes_p2p)}, backups {human_bytes(r.bytes_from_backup)}, "
        f"checkpoint {human_bytes(r.bytes_from_checkpoint)}; slots verified {r.slots_verified}",
    ]
    plan = r.plan
    if plan:
        lines.append(
            f"  plan: keep {plan.get('keeps')}, copy {plan.get('copies')}, receive {plan.get('transfers')}, "
            f"fetch {plan.get('fetches')} in {plan.get('stages')} stages"
        )
    if r.migration_steps > 1 or r.staging_peak_bytes:
        lines.append(f"  migration: {r.commits} of {r.migration_steps} steps committed, peak staging "
                     f"per rank {human_bytes(max(r.staging_peak_bytes.values(), default=0))}")
    if r.balance:
        lines.append("  balance (max/mean rank load): " + ", ".join(f"{k} {v:.3f}" for k, v in r.balance.items()))
    if r.replaced:
        lines.append("  replaced: " + ", ".join(f"rank {k} -> {w}" for k, w in r.replaced.items()))
    if r.dropped:
        lines.append(f"  dropped ranks: {list(r.dropped)}")
    if r.added:
        lines.append(f"  added ranks: {list(r.added)}")
    for f in r.failures:
        lines.append(f"  retried after: {f}")
    for n in r.notes:
        lines.append(f"  note: {n}")
    return "\n".join(lines)
