"""The reconfiguration state machine: one method per Step, each doing its step and naming the next."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

import numpy as np

from elastic_ep.decide import REQUESTS, Decision, Request, decide, layout_for
from elastic_ep.errors import ElasticEPError, ExpertsLostError, TransferError
from elastic_ep.faults import Step
from elastic_ep.layout import ExpertLayout
from elastic_ep.migration import MigrationSchedule, peak_staged_bytes, plan_migration, plan_steps, staged_bytes
from elastic_ep.plan import TransferPlan, plan_transfers
from elastic_ep.report import ReportDraft

if TYPE_CHECKING:  # the controller imports this module
    from actors.controller import Controller


def _now() -> float:
    return time.perf_counter()


@dataclass
class Attempt:
    """What one attempt of a reconfiguration has learnt so far (filled in step by step)."""

    request: Request
    rep: ReportDraft  # frozen into the RebalanceReport once the attempt commits
    load_override: Optional[np.ndarray] = None
    step: Step = Step.DETECT
    restarted: set = field(default_factory=set)  # members Ray restarted empty
    decision: Optional[Decision] = None
    members: dict = field(default_factory=dict)  # rank -> worker id after the change
    holders: dict = field(default_factory=dict)  # rank -> worker id of ranks whose weights are intact
    old: Optional[ExpertLayout] = None
    new: Optional[ExpertLayout] = None
    load: Optional[np.ndarray] = None
    plan: Optional[TransferPlan] = None
    fetch_keys: list = field(default_factory=list)
    backup_refs: dict = field(default_factory=dict)
    group: Optional[str] = None
    group_rank: dict = field(default_factory=dict)
    participants: dict = field(default_factory=dict)  # rank -> worker id of every participant
    results: dict = field(default_factory=dict)  # rank -> execute() reply
    epoch: int = 0
    # Layerwise (elastic_ep.migration): the schedule, each step's plan, the step running; ``new`` and
    # ``plan`` are then the running step's, ``target`` the whole move's. One step: target is new.
    schedule: Optional[MigrationSchedule] = None
    step_plans: list = field(default_factory=list)
    step_index: int = 0
    target: Optional[ExpertLayout] = None


class Reconfiguration:
    """Drives one attempt through the Steps; ``advance`` runs the current step (the unit tests call it one at a time).

    Entering a step first fires a controller fault armed for it (FaultInjector), then the
    step's method runs and returns the next step; its time goes to the report's phases.

    layers_per_step (None: the config's ``layers_per_step``; 0: the whole model at once): a
    rebalance that changes no membership and whose experts all have a live copy migrates
    that many changed MoE layers per commit, going round COMMUNICATORS..COMMIT once per step
    (``elastic_ep.migration``); every other reconfiguration moves the whole model at once.
    """

    def __init__(self, ctl: "Controller", request: Request, attempt: int, load_override=None,
                 layers_per_step: Optional[int] = None):
        self.ctl = ctl
        self.layers_per_step = int(ctl.cfg.layers_per_step if layers_per_step is None else layers_per_step)
        self.att = Attempt(request=request, load_override=load_override,
                           rep=ReportDraft(reason=request.kind, epoch_from=ctl.epoch, attempt=attempt))

    @property
    def done(self) -> bool:
        return self.att.step is Step.DONE

    def advance(self) -> Step:
        step = self.att.step
        self.ctl.faults.hit(step.value)
        t0 = _now()
        self.att.step = getattr(self, step.value)(self.att)
        self.att.rep.phases[step.value] = self.att.rep.phases.get(step.value, 0.0) + _now() - t0
        return self.att.step

    def run(self) -> ReportDraft:
        while not self.done:
            self.advance()
        return self.att.rep

    # -- the steps -------------------------------------------------------------------------

    def detect(self, att: Attempt) -> Step:
        ctl = self.ctl
        restartable = ctl.cfg.max_restarts != 0
        wids = [w for w in list(ctl.workers.members.values()) + ctl.workers.spares
                if restartable or not ctl.workers.is_dead(w)]
        att.restarted = ctl.workers.probe(wids, ctl.cfg.call_timeout_s,
                                          ctl.cfg.startup_timeout_s if restartable else 0.0)
        return Step.DECIDE

    def decide(self, att: Attempt) -> Step:
        ctl, rep = self.ctl, att.rep
        att.old = ctl.layout
        att.decision = d = decide(ctl.view(att.restarted, att.request), att.request)
        att.members = dict(d.members)
        for rank, wid in d.members.items():
            if wid in att.restarted:
                rep.replaced[rank] = f"{wid} (restarted)"
        rep.replaced.update(d.replaced)
        for start in d.starts:  # cold workers: spares until the commit (a failed attempt leaks none)
            wid = ctl.start_worker(start.node)
            att.members[start.rank] = wid
            if start.rank in ctl.workers.members:
                rep.replaced[start.rank] = f"{wid} (cold)"
        rep.dropped, rep.added = list(d.dropped), list(d.added)
        # Ranks whose weights are intact can send, including ranks being retired by a shrink.
        att.holders = {r: w for r, w in ctl.workers.members.items()
                       if r in att.old.ranks and not ctl.workers.is_dead(w) and r not in d.fresh}
        return Step.PLAN

    def plan(self, att: Attempt) -> Step:
        ctl, cfg, d = self.ctl, self.ctl.cfg, att.decision
        load = att.load_override if att.load_override is not None else ctl.window.total()
        if load is None or load.sum() <= 0:
            load = np.ones((att.old.num_layers, att.old.num_experts))  # no statistics yet: balance replica counts
        att.load = load
        survivors = sorted(att.holders)
        att.new = layout_for(d, att.old, load, cfg.slots_per_rank, survivors, num_groups=cfg.model.num_groups,
                             policy=cfg.policy)
        att.plan = plan = plan_transfers(att.old, att.new, survivors, expert_bytes=cfg.model.expert_bytes,
                                         fresh_ranks=set(d.fresh), stripe_fetches=ctl.striping)
        att.rep.plan = {**plan.summary(), "max_rank_bytes_staged": max(staged_bytes(plan).values(), default=0)}
        if plan.is_noop and not d.changes_membership and att.members == ctl.workers.members:
            att.rep.epoch_to, att.rep.noop = ctl.epoch, True
            ctl.refresh_balance(att.rep, att.old, att.new, load)
            dead_spares = any(ctl.workers.is_dead(w) for w in ctl.workers.spares)
            return Step.REPLENISH if d.spare_starts or dead_spares else Step.DONE
        # Storage: which fetched experts still exist somewhere?
        att.fetch_keys = sorted({(int(l), int(e)) for l, e in np.concatenate([plan.fetches[:, :2], plan.relays[:, :2]])})
        att.backup_refs = ctl.backup_refs(att.fetch_keys) if att.fetch_keys else {}
        if att.fetch_keys and cfg.checkpoint is None:
            lost = [k for k in att.fetch_keys if k not in att.backup_refs]
            if lost:
                ctl.set_lost(lost)
                raise ExpertsLostError(
                    f"{len(lost)} experts have no copy left (no live replica, backup or checkpoint), "
                    f"e.g. (layer, expert) {lost[:5]}; the cluster keeps serving the previous layout", lost)
        self._cut_into_steps(att, survivors)
        return Step.COMMUNICATORS

    def _cut_into_steps(self, att: Attempt, survivors: list[int]) -> None:
        """Layerwise when asked and safe: a rebalance that changes no membership and reads nothing from storage."""
        d, plan, lps = att.decision, att.plan, self.layers_per_step
        att.target, att.step_plans = att.new, [plan]
        if lps > 0 and att.request.kind == "rebalance":  # recoveries, grows, shrinks, drains: the whole model
            why = ("it changes membership" if d.changes_membership or att.members != self.ctl.workers.members
                   else "experts without a live copy are read from storage" if len(plan.fetches) + len(plan.relays)
                   else None)
            if why is not None:
                att.rep.notes.append(f"moved the whole model at once, not {lps} layers per step: {why}")
            else:
                schedule = plan_migration(att.old, att.new, lps)
                if schedule.num_steps > 1:
                    att.schedule, att.step_plans = schedule, plan_steps(schedule, survivors, plan.expert_bytes)
                    att.new, att.plan = schedule.layouts[0], att.step_plans[0]
        att.rep.migration_steps = len(att.step_plans)
        att.rep.staging_peak_bytes = peak_staged_bytes(att.step_plans, att.target.ranks)

    def communicators(self, att: Attempt) -> Step:
        comms, plan = self.ctl.comms, att.plan
        att.participants = {r: att.members.get(r, att.holders.get(r)) for r in plan.participants}
        movers = {int(r) for t in (plan.transfers, plan.relays) for r in t[:, 2].tolist() + t[:, 4].tolist()}
        need = {att.participants[r] for r in movers}
        group = comms.group_for(need) if need and not att.restarted and comms.ok else None
        if need and group is None:
            comms.form()
            group = comms.group_for(need)
            if group is None:  # e.g. a grown rank on a GPU a spare uses: a group of just these
                comms.form(exactly=sorted(need))
                group = comms.group_for(need)
        index = {w: i for i, w in enumerate(comms.groups.get(group, []))}
        att.group, att.group_rank = group, {r: index[att.participants[r]] for r in movers}
        return Step.TRANSFER

    def transfer(self, att: Attempt) -> Step:
        ctl, cfg, rep = self.ctl, self.ctl.cfg, att.rep
        att.epoch = ctl.epoch + 1
        calls = {}
        for r, wid in att.participants.items():
            part = att.plan.for_rank(r)
            keys = {(int(l), int(e)) for l, e in np.concatenate([part.fetches[:, :2], part.relay_sends[:, :2]])}
            calls[r] = (wid, "execute", (att.epoch, part, att.group, att.group_rank, cfg.transfer_timeout_s,
                                         {k: att.backup_refs[k] for k in keys if k in att.backup_refs}))
        typed: list = []
        results = ctl.workers.call_all(calls, cfg.transfer_timeout_s + cfg.call_timeout_s, "execute", typed=typed)
        if typed:  # e.g. the checkpoint cannot give what no replica or backup holds: retrying cannot help
            lost = sorted({tuple(k) for _, exc in typed if isinstance(exc, ExpertsLostError) for k in exc.lost})
            if lost:
                ctl.set_lost(lost)
                raise ExpertsLostError(
                    f"{len(lost)} experts have no live replica or backup and cannot be read from the checkpoint, "
                    f"e.g. (layer, expert) {lost[:5]}; the previous layout stays in force. "
                    + "; ".join(f"rank {k}: {exc}" for k, exc in typed)[:2000], lost)
            raise typed[0][1]
        att.results = results
        for r, res in results.items():  # summed over the steps of a layerwise migration
            timings = rep.worker_timings.setdefault(r, {})
            for k, v in res.timings_s.items():
                timings[k] = timings.get(k, 0.0) + v
        # point-to-point bytes of experts that survivors held (relayed reads count as storage)
        rep.bytes_p2p += int(sum(res.bytes_received for res in results.values())) - \
            len(att.plan.relays) * att.plan.expert_bytes
        rep.bytes_from_backup += int(sum(res.bytes_from_backup for res in results.values()))
        rep.bytes_from_checkpoint += int(sum(res.bytes_from_checkpoint for res in results.values()))
        return Step.VERIFY

    def verify(self, att: Attempt) -> Step:
        ctl = self.ctl
        bad = []
        for r, res in att.results.items():
            for layer, slot, expert, fp in res.staged:
                if att.new.experts_of(r)[layer, slot] != expert or ctl.ref_fp[layer, expert] != fp:
                    bad.append((r, layer, slot, expert))
        if bad:
            # A fetched copy that fails verification came from storage: trying again reads the same bytes.
            read = set(att.fetch_keys)
            from_storage = sorted({(layer, expert) for r, layer, slot, expert in bad
                                   if (layer, expert) in read and (layer, expert) not in att.backup_refs})
            if from_storage:
                ctl.set_lost(from_storage)
                raise ExpertsLostError(
                    f"the checkpoint's copies of {len(from_storage)} experts do not match their reference "
                    f"fingerprints (corrupted?), e.g. (layer, expert) {from_storage[:5]}, and no live replica or "
                    "backup holds them; the previous layout stays in force", from_storage)
            raise TransferError(f"{len(bad)} staged slots failed verification, e.g. (rank, layer, slot, expert) {bad[:5]}")
        att.rep.slots_verified += int(sum(len(res.staged) for res in att.results.values()))
        return Step.PERSIST

    def persist(self, att: Attempt) -> Step:
        """The decision: from here on a restarted controller rolls forward."""
        d = att.decision
        pending = {"epoch": att.epoch, "retired": list(d.retired), "keep_spares": list(d.keep_as_spares),
                   "report": att.rep.freeze().to_dict()}  # what a restarted controller puts on record
        self.ctl.install(att.new, att.epoch, att.members, list(d.spares), pending)
        return Step.COMMIT

    def commit(self, att: Attempt) -> Step:
        ctl, cfg, rep, d = self.ctl, self.ctl.cfg, att.rep, att.decision
        w = ctl.workers
        view = ctl.committed_view()  # what persist installed: each rank keeps it for clients (controller may die)
        calls = {r: (wid, "commit", (att.epoch, r, view)) for r, wid in att.members.items() if not w.is_dead(wid)}
        done = w.call_all(calls, cfg.call_timeout_s, "commit", tolerate_dead=True)
        retired_ok = w.call_all({x: (x, "retire", ()) for x in d.retired}, cfg.call_timeout_s, "retire",
                                tolerate_dead=True)
        ctl.settle_retired([x for x in d.retired if x in retired_ok], list(d.keep_as_spares))
        rep.released = [x for x in d.retired if x not in d.keep_as_spares]
        rep.committed_at = time.time()
        if d.drain is not None:
            rep.safe_to_terminate_at = rep.committed_at  # the drained worker serves nothing and was let go
        if w.first_death is not None and rep.reason == "recover":
            rep.since_death_s = rep.committed_at - w.first_death  # noticed -> committed
        rep.epoch_to = att.epoch
        rep.commits += 1
        ctl.record_commit(rep)
        ctl.save()
        if set(done) != set(calls):
            rep.notes.append(f"ranks {sorted(set(calls) - set(done))} died during commit; next recovery heals them")
        ctl.refresh_balance(rep, att.old, att.new, att.load)
        if att.step_index + 1 < len(att.step_plans):  # layerwise: the next step plans from what was just committed
            if set(done) != set(calls):  # a new attempt heals them and plans from the layout just committed
                raise TransferError(f"ranks {sorted(set(calls) - set(done))} died during the commit of layerwise step "
                                    f"{att.step_index + 1} of {len(att.step_plans)}")
            att.step_index += 1
            att.new, att.plan = att.schedule.layouts[att.step_index], att.step_plans[att.step_index]
            return Step.COMMUNICATORS
        return Step.REPLENISH

    def replenish(self, att: Attempt) -> Step:
        from ray.exceptions import GetTimeoutError, RayError

        try:
            self.ctl.after_commit(att.rep, att.decision)
        except (ElasticEPError, RayError, GetTimeoutError) as exc:  # committed already: never retry the attempt
            att.rep.notes.append(f"after commit: {type(exc).__name__}: {exc}")
        return Step.DONE


def request_for(reason: str, add: int = 0, remove: Optional[list[int]] = None) -> Request:
    kind = reason if reason in REQUESTS else "recover"
    return Request(kind, add=add if kind == "grow" else 0, ranks=tuple(remove or ()))

