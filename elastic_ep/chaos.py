"""Chaos: seeded random schedules of kills at every phase of a running cluster, and a survival summary.

One cluster lives through the whole schedule (the controller replenishes spares
after each recovery; ranks dropped for want of a spare are grown back). Each step
is a *scenario*: one or more kills at a named moment (see ``SCENARIOS``). After
every step the invariants are checked:

* no hang: the cluster is healthy again (no dead member or spare, nothing running)
  within ``settle_s``; every call on the way is bounded;
* no corrupted slot: ``verify(against_checkpoint=True)`` passes on every slot;
* no lost expert: ``status()["lost"]`` and ``["unserved"]`` are empty (the
  checkpoint and the backups remain, so nothing may be lost);
* the epoch never moves backwards;
* a controller killed mid-rebalance comes back with either the previous layout
  (killed before the decision) or exactly the planned one (after it), never a mix.

Recovery times, per step: *restored* runs from the first death (as the controller
noticed it) to the commit of the last reconfiguration that healed it, i.e. until every
slot is served by a live rank again; for a controller kill, from the trigger until
the restarted controller answers with exactly one layout in force; for a spare's
death (nothing stopped being served) it is the healed time. *Healed* runs to the
moment the cluster is idle with its spares replenished and every slot verified.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from .config import ClusterConfig, ModelSpec
from .decide import ClusterView, Request, decide, layout_for
from .faults import CONTROLLER_PHASES, ROLLED_FORWARD
from .layout import ExpertLayout
from .plan import DST, SRC, TransferPlan, plan_transfers
from .testing import small_config

# Kills each scenario makes when its armed phase is reached (the summary counts real deaths).
WORKER_SCENARIOS = {
    "idle": 1,  # a rank dies while nothing runs
    "spare_idle": 1,  # a hot spare dies while nothing runs; it is replaced
    "form_group": 2,  # a rank dies, and another dies while the communicators are re-formed
    "transfer_send": 1,  # a sender dies mid-exchange of a rebalance
    "transfer_recv": 1,  # a receiver dies mid-exchange of a rebalance
    "fetch": 2,  # a rank dies; the spare taking over dies while loading from the backups
    "staged": 1,  # a participant dies between staging and commit
    "two_at_once": 2,  # two ranks die within milliseconds
    "during_recovery": 2,  # a rank dies while the recovery from another death still runs
    "spare_takeover": 2,  # a rank dies; the spare dies while receiving its experts
}
SCENARIOS = {**WORKER_SCENARIOS, **{f"controller_{p}": 1 for p in CONTROLLER_PHASES}}

# Tiny in count (a CPU holds every worker) but 768 KiB per expert, so that an exchange lasts long
# enough (tens of ms over Gloo) for a kill armed with a few ms of delay to land in the middle of it.
CHAOS_SPEC = ModelSpec(num_layers=3, num_experts=12, hidden=512, intermediate=256)


def chaos_config(checkpoint: str, state_dir: str, **overrides) -> ClusterConfig:
    """4 ranks x 4 slots + 2 spares over a tiny model, with timeouts short enough for CI."""
    base = dict(model=CHAOS_SPEC, num_spares=2, call_timeout_s=20.0, transfer_timeout_s=5.0,
                state_dir=str(state_dir), name="chaos")
    return small_config(checkpoint, state_dir, **{**base, **overrides})


@dataclass
class StepResult:
    """What one scenario did and whether the invariants held afterwards."""

    scenario: str
    kills: int = 0  # worker deaths and controller restarts this step caused
    ok: bool = False
    hang: bool = False
    corrupted_slots: int = 0
    lost_experts: int = 0
    recovery_s: Optional[float] = None  # kill to restored (see the module docstring)
    healed_s: Optional[float] = None  # kill to healed
    epoch_from: int = 0
    epoch_to: int = 0
    errors: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)  # failed attempts the triggering rebalance retried


class ChaosRunner:
    """Drives one started ElasticEPCluster through scenarios; ``step(name)`` runs one and checks it."""

    def __init__(self, cluster, rng: np.random.Generator, settle_s: float = 90.0):
        self.cluster = cluster
        self.cfg: ClusterConfig = cluster.config
        self.spec: ModelSpec = cluster.config.model
        self.rng = rng
        self.settle_s = settle_s
        self.target_ranks = cluster.config.num_ranks

    # -- helpers ---------------------------------------------------------------------------

    def _layout(self, st: dict) -> ExpertLayout:
        return ExpertLayout.from_dict(st["layout"])

    def _random_load(self) -> np.ndarray:
        """A Zipf-skewed load [num_layers, num_experts] with a random hot set per layer."""
        L, E = self.spec.num_layers, self.spec.num_experts
        base = 1.0 / np.arange(1, E + 1) ** float(self.rng.uniform(0.8, 2.0))
        return np.stack([self.rng.permutation(base) for _ in range(L)]) * 10_000

    def _plan_for(self, st: dict, load: np.ndarray) -> tuple[ExpertLayout, TransferPlan]:
        """The layout and plan the controller will make for ``rebalance(load)``: the same decide() and
        layout_for() on the same view (both are deterministic)."""
        old = self._layout(st)
        view = ClusterView(
            members={int(r): w for r, w in st["ranks"].items()}, rank_nodes=dict(zip(old.ranks, old.rank_nodes)),
            spares=tuple(st["spares"]), dead=frozenset(st["dead"]), num_experts=self.spec.num_experts,
            slots_per_rank=self.cfg.slots_per_rank, num_spares=self.cfg.num_spares, num_nodes=self.cfg.num_nodes,
            ranks_per_node=max(1, self.cfg.num_ranks // self.cfg.num_nodes), layout_ranks=old.ranks,
        )
        decision = decide(view, Request("rebalance"))
        live = [r for r in old.ranks if r in decision.members and r not in decision.fresh]
        new = layout_for(decision, old, load, self.cfg.slots_per_rank, live, num_groups=self.spec.num_groups,
                         policy=self.cfg.policy)
        return new, plan_transfers(old, new, live, expert_bytes=self.spec.expert_bytes, fresh_ranks=set(decision.fresh))

    def _load_where(self, st: dict, pick: Callable[[TransferPlan], list[int]]) -> tuple[np.ndarray, ExpertLayout, int]:
        """A load whose rebalance has a candidate rank for ``pick``; returns (load, new layout, rank)."""
        for _ in range(50):
            load = self._random_load()
            new, plan = self._plan_for(st, load)
            cands = pick(plan)
            if cands:
                return load, new, int(self.rng.choice(cands))
        raise RuntimeError("no load found whose rebalance reaches the wanted phase")

    def _ranks(self, st: dict) -> list[int]:
        return sorted(int(r) for r in st["ranks"])

    def _unique_holder_ranks(self, st: dict, unique: bool) -> list[int]:
        """Ranks holding an expert no other rank holds (``unique``), or one another rank also holds."""
        layout = self._layout(st)
        cnt = layout.logcnt
        out = []
        for r in self._ranks(st):
            experts = layout.experts_of(r)
            counts = np.take_along_axis(cnt, experts, axis=1)
            if (counts == 1).any() if unique else (counts > 1).any():
                out.append(r)
        return out

    def _wait_busy(self, timeout_s: float = 5.0) -> bool:
        """Poll until a reconfiguration runs (True) or ``timeout_s`` passes (False)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.cluster.status()["busy"]:
                return True
            time.sleep(0.01)
        return False

    # -- scenarios -------------------------------------------------------------------------

    def _run_scenario(self, name: str, st: dict, res: StepResult) -> Optional[dict]:
        """Make the scenario's kills; returns what to check beyond the common invariants."""
        c = self.cluster
        ranks = self._ranks(st)
        pick = lambda xs: int(self.rng.choice(xs))  # noqa: E731
        if name == "idle":
            c.arm_worker_fault(pick(ranks), "idle")
        elif name == "spare_idle":
            c.arm_worker_fault(st["spares"][0], "idle")
        elif name == "form_group":
            a, b = self.rng.choice(ranks, size=2, replace=False)
            c.arm_worker_fault(int(a), "form_group")
            c.kill(int(b))  # its recovery re-forms the communicators, where rank a dies
        elif name in ("transfer_send", "transfer_recv", "staged"):
            col = {"transfer_send": SRC, "transfer_recv": DST}.get(name)
            if col is None:
                load, _, victim = self._load_where(st, lambda p: p.participants)
            else:
                load, _, victim = self._load_where(st, lambda p: sorted(set(p.transfers[:, col].tolist())))
            delay = 0.002 if name == "transfer_send" else 0.0  # dies during the exchange, not before it
            c.arm_worker_fault(victim, name, delay)
            res.failures = list(c.rebalance(load).failures)
        elif name == "fetch":
            victim = pick(self._unique_holder_ranks(st, unique=True) or ranks)
            c.arm_worker_fault(st["spares"][0], "fetch")  # the spare that takes over loads the dead rank's experts
            c.kill(victim)
        elif name == "spare_takeover":
            victim = pick(self._unique_holder_ranks(st, unique=False) or ranks)
            c.arm_worker_fault(st["spares"][0], "transfer_recv")  # dies receiving the dead rank's experts
            c.kill(victim)
        elif name == "two_at_once":
            a, b = (int(x) for x in self.rng.choice(ranks, size=2, replace=False))
            wids = [c.arm_worker_fault(a, "idle", 0.3), c.arm_worker_fault(b, "idle", 0.3)]  # timers fire ms apart
            deadline = time.monotonic() + self.cfg.call_timeout_s
            while not set(wids) <= set(c.status()["dead"]):  # both deaths noticed before the checks
                if time.monotonic() > deadline:
                    res.errors.append(f"workers {wids} armed to die did not")
                    break
                time.sleep(0.02)
        elif name == "during_recovery":
            a, b = self.rng.choice(ranks, size=2, replace=False)
            c.kill(int(a))
            if not self._wait_busy():
                res.errors.append("note: the first recovery was over before the second kill")
            c.kill(int(b))
        elif name.startswith("controller_"):
            return self._controller_scenario(name[len("controller_"):], st, res)
        else:
            raise ValueError(f"unknown chaos scenario {name!r}; known: {sorted(SCENARIOS)}")
        return None

    def _controller_scenario(self, phase: str, st: dict, res: StepResult) -> dict:
        """Kill the controller at ``phase`` of a rebalance; the restarted one must hold exactly one layout."""
        import ray
        from ray.exceptions import RayActorError

        c = self.cluster
        load, expected, _ = self._load_where(st, lambda p: [] if p.is_noop else [0])
        c.arm_controller_fault(phase)
        ref = c.controller.rebalance.remote(load)  # not through _call: that would retry on the new controller
        try:
            ray.get(ref, timeout=self.cfg.call_timeout_s + 2 * self.cfg.transfer_timeout_s)
            res.errors.append(f"controller armed at {phase!r} finished the rebalance alive")
        except RayActorError:
            pass
        deadline = time.monotonic() + self.settle_s
        while True:  # the restarted controller answers once it has resumed
            try:
                now = c.status()
                if now["restarts"] > st["restarts"]:
                    back_at = time.time()
                    break
            except Exception:  # noqa: BLE001 - restarting: the next poll retries
                pass
            if time.monotonic() > deadline:
                res.hang = True
                raise TimeoutError(f"controller did not come back within {self.settle_s}s")
            time.sleep(0.05)
        want = expected.to_dict() if phase in ROLLED_FORWARD else st["layout"]
        want_epoch = st["epoch"] + (1 if phase in ROLLED_FORWARD else 0)
        if now["layout"] != want or now["epoch"] != want_epoch:
            res.errors.append(
                f"controller killed at {phase!r}: epoch {st['epoch']} -> {now['epoch']} (want {want_epoch}), "
                f"layout is {'the old' if now['layout'] == st['layout'] else 'the planned' if now['layout'] == expected.to_dict() else 'neither old nor planned'} one"
            )
        last = now["history"][-1] if now["history"] else {}
        if phase in ROLLED_FORWARD and (last.get("reason"), last.get("epoch_to")) != ("rebalance", want_epoch):
            res.errors.append(f"controller killed at {phase!r}: the committed rebalance is not on record "
                              f"(last history entry: {last.get('reason')} to epoch {last.get('epoch_to')})")
        if phase not in ROLLED_FORWARD and (last.get("epoch_to") or 0) > st["epoch"]:
            res.errors.append(f"controller killed at {phase!r}: history records a commit that never happened")
        return {"controller_restarts": now["restarts"] - st["restarts"], "back_at": back_at}

    # -- one step --------------------------------------------------------------------------

    def step(self, name: str) -> StepResult:
        """Run one scenario, wait for the cluster to heal, check every invariant."""
        c = self.cluster
        res = StepResult(scenario=name)
        st = c.status()
        res.epoch_from = st["epoch"]
        dead_before = set(st["dead"])
        t_trigger = time.time()
        extra = None
        try:
            extra = self._run_scenario(name, st, res)
        except Exception as exc:  # noqa: BLE001 - a typed failure of the trigger is a finding, not a crash
            res.errors.append(f"trigger: {type(exc).__name__}: {exc}")
        try:
            after = c.wait_healthy(timeout_s=self.settle_s)
            verify = c.verify(against_checkpoint=True)
            self._times(res, st, after, t_trigger, time.time(), extra)
        except TimeoutError as exc:
            res.hang = True
            res.errors.append(f"not healthy: {exc}")
            after = c.status()
            verify = None
        res.kills = len(set(after["dead"]) - dead_before) + (extra or {}).get("controller_restarts", 0)
        res.epoch_to = after["epoch"]
        if verify is not None:
            res.corrupted_slots = int(verify.num_bad)
            if verify.ranks_unreachable:
                res.errors.append(f"ranks unreachable: {list(verify.ranks_unreachable)}")
        res.lost_experts = len(after["lost"]) + len(after["unserved"])
        if after["epoch"] < res.epoch_from:
            res.errors.append(f"epoch moved backwards: {res.epoch_from} -> {after['epoch']}")
        try:
            self._layout(after).validate()
        except Exception as exc:  # noqa: BLE001
            res.errors.append(f"layout invalid: {exc}")
        try:
            c.disarm_faults()  # a phase the scenario did not reach must not fire in a later one
        except Exception as exc:  # noqa: BLE001
            res.errors.append(f"disarm: {type(exc).__name__}: {exc}")
        res.ok = (not res.hang and verify is not None and verify.ok and res.corrupted_slots == 0
                  and res.lost_experts == 0 and not [e for e in res.errors if not e.startswith("note:")])
        if not res.hang:
            self._restore(res)
        return res

    @staticmethod
    def _times(res: StepResult, before: dict, after: dict, t_trigger: float, t_healed: float,
               extra: Optional[dict]) -> None:
        """Fill ``recovery_s`` (kill to restored) and ``healed_s`` (kill to healed); wall clock."""
        new_dead = set(after["dead"]) - set(before["dead"])
        deaths = [after["death_times"][w] for w in new_dead if w in after.get("death_times", {})]
        members_died = bool(new_dead - set(before["spares"]))  # else only spares died: nothing went unserved
        if extra and "back_at" in extra:  # a controller kill: restored once it answers again
            kill_at, restored_at = t_trigger, extra["back_at"]
        else:
            kill_at = min(deaths) if deaths else t_trigger
            commits = [h["committed_at"] for h in after["history"]
                       if h.get("committed_at") and h["committed_at"] >= kill_at]
            restored_at = max(commits) if commits and members_died else t_healed
        res.recovery_s = max(0.0, restored_at - kill_at)
        res.healed_s = max(0.0, t_healed - kill_at)

    def _restore(self, res: StepResult) -> None:
        """Grow back ranks dropped for want of a spare, and wait for the spares to be replenished."""
        c = self.cluster
        st = c.status()
        missing = self.target_ranks - len(st["ranks"])
        if missing > 0:
            try:
                c.grow(missing)
                c.wait_healthy(timeout_s=self.settle_s)
            except Exception as exc:  # noqa: BLE001
                res.errors.append(f"restore: grow: {type(exc).__name__}: {exc}")
                res.ok = False
        deadline = time.monotonic() + self.settle_s
        while len([w for w in c.status()["spares"] if w not in c.status()["dead"]]) < self.cfg.num_spares:
            if time.monotonic() > deadline:
                res.errors.append("restore: spares not replenished")
                res.ok = False
                return
            time.sleep(0.1)


def schedule(seed: int, kills: int) -> list[str]:
    """Seeded scenario order: shuffled rounds over every scenario, until ``kills`` kills are planned."""
    rng = np.random.default_rng(seed)
    names = sorted(SCENARIOS)
    out: list[str] = []
    planned = 0
    while planned < kills:
        for name in rng.permutation(names):
            if planned >= kills:
                break
            out.append(str(name))
            planned += SCENARIOS[str(name)]
    return out


def _percentiles(xs: list[float]) -> dict:
    if not xs:
        return {"p50": None, "p90": None, "max": None}
    a = np.asarray(xs)
    return {"p50": round(float(np.percentile(a, 50)), 3), "p90": round(float(np.percentile(a, 90)), 3),
            "max": round(float(a.max()), 3)}


def run_chaos(kills: int, seed: int, workdir: Optional[str] = None, progress: bool = True,
              cluster=None, settle_s: float = 90.0, ray_init_kwargs: Optional[dict] = None,
              serve: bool = True, serving_log=None) -> dict:
    """Run a seeded random schedule of at least ``kills`` kills; returns the summary (``ok`` if all held).

    Starts its own cluster over a synthetic checkpoint in ``workdir`` (a temp dir by
    default; Ray too, unless it is already initialised), or drives ``cluster`` if given.
    serve: a serving stream (a background thread, every call checked against the checkpoint
    oracle) runs through every kill, recorded in ``serving_log`` (a ServingLog; a new one
    if None); the summary's "serving" adds wrong outputs (``ok`` needs 0), failed calls,
    the longest gap, and p50/p99 latency steady and around each kill.
    """
    from tqdm.auto import tqdm

    from .cluster import ElasticEPCluster
    from .storage import write_synthetic_checkpoint

    if kills < 1:
        raise ValueError(f"kills must be >= 1, got {kills}")
    t_all = time.monotonic()
    own = cluster is None
    if own:
        work = Path(workdir or tempfile.mkdtemp(prefix="eep-chaos-"))
        ckpt = write_synthetic_checkpoint(work / "checkpoint", CHAOS_SPEC, num_shards=2)
        cluster = ElasticEPCluster(chaos_config(str(ckpt), str(work / "state")),
                                   ray_init_kwargs=ray_init_kwargs or {"num_cpus": 4})
        cluster.start()
    runner = ChaosRunner(cluster, np.random.default_rng(seed), settle_s=settle_s)
    steps: list[StepResult] = []
    stream = None
    try:
        if serve:
            stream, serving_log = _serving_stream(cluster, serving_log, settle_s, seed)
        with tqdm(total=kills, desc=f"chaos seed {seed}", unit="kill", disable=not progress) as bar:
            for name in schedule(seed, kills):
                if stream is not None:
                    serving_log.mark("kill", name)
                res = runner.step(name)
                if stream is not None:
                    serving_log.mark("commit", name)
                steps.append(res)
                bar.update(res.kills)
                bar.set_postfix_str(f"{name}: {'ok' if res.ok else 'FAILED'}")
                if res.hang:
                    break  # a cluster that did not heal makes every later step meaningless
        if stream is not None:
            time.sleep(0.5)  # served calls after the last recovery close its window
            stream.stop()
    finally:
        if stream is not None and not stream.stopped:
            stream.stop()
        if own:
            cluster.shutdown()
    serving = _serving_summary(serving_log, stream) if stream is not None else None
    times = [s.recovery_s for s in steps if s.recovery_s is not None and s.kills]
    healed = [s.healed_s for s in steps if s.healed_s is not None and s.kills]
    by_scenario: dict[str, dict] = {}
    for s in steps:
        d = by_scenario.setdefault(s.scenario, {"runs": 0, "kills": 0, "failed": 0, "max_recovery_s": None})
        d["runs"] += 1
        d["kills"] += s.kills
        d["failed"] += 0 if s.ok else 1
        if s.recovery_s is not None:
            d["max_recovery_s"] = round(max(d["max_recovery_s"] or 0.0, s.recovery_s), 3)
    survived = sum(s.kills for s in steps if s.ok)
    return {
        "ok": (all(s.ok for s in steps) and sum(s.kills for s in steps) >= kills
               and (serving is None or serving["wrong_outputs"] == 0)),
        "seed": seed,
        "kills_requested": kills,
        "kills": sum(s.kills for s in steps),
        "kills_survived": survived,
        "scenarios_run": len(steps),
        "hangs": sum(s.hang for s in steps),
        "corrupted_slots": sum(s.corrupted_slots for s in steps),
        "lost_experts": sum(s.lost_experts for s in steps),
        "recovery_s": _percentiles(times),  # kill to restored: every slot served by a live rank again
        "healed_s": _percentiles(healed),  # kill to healed: spares replenished, idle, all slots verified
        "epochs": [steps[0].epoch_from, steps[-1].epoch_to] if steps else None,
        "by_scenario": dict(sorted(by_scenario.items())),
        "failures": [{"scenario": s.scenario, "errors": s.errors} for s in steps if not s.ok],
        "elapsed_s": round(time.monotonic() - t_all, 1),
        "serving": serving,
    }


def _serving_stream(cluster, log, settle_s: float, seed: int):
    """A background serving thread through the whole run: a client waiting up to ``settle_s`` for lost experts."""
    from .serving.oracle import CheckpointOracle
    from .serving.stream import ServingStream, StreamConfig
    from .serving_stats import ServingLog

    log = ServingLog() if log is None else log
    cfg = cluster.config
    oracle = CheckpointOracle(cfg.checkpoint, cfg.model, cfg.preset if isinstance(cfg.preset, str) else "deepseek")
    client = cluster.client(view_max_age_s=0.2, log=log, unavailable_timeout_s=settle_s)
    return ServingStream(client, oracle, StreamConfig(tokens=16, seed=seed)).start(), log


def _serving_summary(log, stream) -> dict:
    """The chaos summary's serving part: wrong outputs, failed calls, longest gap, latency steady and per kill."""
    def r(x):
        return None if x is None else round(float(x), 4)

    s = log.summary()
    return {
        "calls": s.calls, "wrong_outputs": s.wrong_calls, "checked_calls": s.checked_calls,
        "failed_calls": s.failed_calls, "failed_by_kind": dict(s.failed_by_kind), "retried_tokens": s.retried_tokens,
        "retried_pairs": s.retried_pairs,
        "longest_gap_s": r(s.longest_gap.length_s) if s.longest_gap is not None else None,
        "steady_p50_s": r(s.steady_p50_s), "steady_p99_s": r(s.steady_p99_s),
        # each gap counted once, at the kill that owns it (elastic_ep.serving_stats)
        "kill_gap_s": _percentiles([k.gap.length_s for k in s.kills]),
        "kills_in_earlier_gap": sum(k.in_gap_of is not None for k in s.kills),
        "kills": [{"scenario": k.label, "gap_s": r(k.gap.length_s), "p50_s": r(k.latency_p50_s),
                   "p99_s": r(k.latency_p99_s), "failed_calls": k.failed_calls, "recovered": k.recovered,
                   "kills_in_gap": k.kills_in_gap,
                   "in_gap_of": None if k.in_gap_of is None else r(k.in_gap_of - s.t0_s)}
                  for k in s.kills],
    }
