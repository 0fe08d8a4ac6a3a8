"""Planner benchmark: sticky vs EPLB-from-scratch placement on DeepSeek-shaped layouts (CPU only).

For each shape, a drifting skewed load is replayed for ``--rounds`` rebalance rounds
through two arms that start from the same EPLB layout of round 0's load:

* sticky: ``rebalance_experts(load, old=previous, policy="sticky")``, then
  ``plan_transfers(previous, new)``;
* eplb:   ``rebalance_experts(load, policy="eplb")`` from scratch, then
  ``plan_transfers(previous, new)``.

Then, from the final sticky layout, three elastic events are planned with both
policies: a rank dies and a replacement takes its id; a rank dies with no spare
(shrink); one node's worth of ranks joins (grow).

Load model (per shape, seeded): layer l gives expert ``perm_l[k]`` popularity
``1 / (k + 1) ** s`` (Zipf over a per-layer random permutation). Every round each
popularity is multiplied by lognormal noise (a random walk in log space), and in a
few layers a few pairs of experts swap popularity. A round's load is the *expected*
token count ``tokens * top_k * popularity`` (noise-free, so all movement comes from
drift), or a multinomial sample of it with ``--multinomial``.

Run from the repository root::

    python -m bench.planner [--rounds 20] [--seed 0] [--json out.json] [--profile 10]
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import platform
import pstats
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

if __package__ in (None, ""):  # run as ``python bench/planner.py``: make elastic_ep importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from elastic_ep.balance import rebalance_experts  # noqa: E402
from elastic_ep.errors import CapacityError  # noqa: E402
from elastic_ep.layout import ExpertLayout  # noqa: E402
from elastic_ep.plan import plan_transfers  # noqa: E402

GB = 1e9  # decimal gigabyte, for bytes in the tables
FULL_PLAN_TARGET_S = 0.010  # balance + transfer plan on DeepSeek-V3, median per round
BYTES_RATIO_TARGET = 0.5  # sticky moves at most this fraction of eplb-from-scratch's bytes
BALANCE_RATIO_TARGET = 1.01  # ... with balance within 1% of eplb's


@dataclass(frozen=True)
class Shape:
    """One model x cluster geometry to benchmark."""

    name: str
    num_layers: int  # MoE layers
    num_experts: int  # logical routed experts per layer
    num_ranks: int  # EP ranks (GPUs)
    slots_per_rank: int  # physical expert slots per rank
    num_nodes: int  # ranks are spread evenly, node = rank // (num_ranks // num_nodes)
    num_groups: int  # expert groups (hierarchical EPLB when they divide over nodes)
    hidden: int  # model hidden size
    intermediate: int  # MoE expert intermediate size
    dtype_bytes: int  # bytes per weight element (bf16 = 2, conservative for fp8 V3)
    top_k: int  # routed experts per token
    grow_ranks: int  # ranks that join in the "grow" event
    grow_new_node: bool  # whether the grown ranks sit on a new node

    @property
    def expert_bytes(self) -> int:
        """Bytes of one expert: gate, up and down projections."""
        return 3 * self.hidden * self.intermediate * self.dtype_bytes

    @property
    def ranks(self) -> tuple[int, ...]:
        return tuple(range(self.num_ranks))

    @property
    def rank_nodes(self) -> tuple[int, ...]:
        per_node = self.num_ranks // self.num_nodes
        return tuple(r // per_node for r in self.ranks)

    def header(self) -> str:
        return (
            f"{self.name}: {self.num_layers} MoE layers, {self.num_experts} experts, "
            f"{self.num_ranks * self.slots_per_rank} slots = {self.num_ranks} ranks x {self.slots_per_rank}, "
            f"{self.num_nodes} node(s), {self.num_groups} group(s); expert = 3 x {self.hidden} x "
            f"{self.intermediate} x {self.dtype_bytes} B = {self.expert_bytes / 1e6:.1f} MB"
        )


SHAPES = (
    Shape("DeepSeek-V3", 58, 256, 32, 9, 4, 8, 7168, 2048, 2, 8, grow_ranks=8, grow_new_node=True),
    Shape("DeepSeek-V2-Lite", 26, 64, 4, 20, 1, 1, 2048, 1408, 2, 6, grow_ranks=1, grow_new_node=False),
)


@dataclass(frozen=True)
class LoadConfig:
    """The drifting skewed workload."""

    zipf_s: float = 1.0  # Zipf exponent of expert popularity
    drift_sigma: float = 0.15  # lognormal sigma of the per-round multiplicative drift
    swap_prob: float = 0.1  # chance per layer per round that some experts swap popularity
    swap_pairs: int = 2  # expert pairs swapped when that happens
    tokens: int = 16384  # tokens per round (each routed to top_k experts)
    multinomial: bool = False  # sample counts instead of using expected counts


def drifting_load(shape: Shape, cfg: LoadConfig, rounds: int, rng: np.random.Generator) -> np.ndarray:
    """Load per round: [rounds + 1, num_layers, num_experts] tokens per logical expert (round 0 first)."""
    num_layers, num_experts = shape.num_layers, shape.num_experts
    by_rank = 1.0 / np.arange(1, num_experts + 1) ** cfg.zipf_s
    perm = np.argsort(rng.random((num_layers, num_experts)), axis=1)  # perm[l, k]: expert of rank k
    pop = np.empty((num_layers, num_experts))
    np.put_along_axis(pop, perm, np.broadcast_to(by_rank, pop.shape), axis=1)
    total = cfg.tokens * shape.top_k
    out = np.empty((rounds + 1, num_layers, num_experts))
    for r in range(rounds + 1):
        if r:
            pop *= rng.lognormal(0.0, cfg.drift_sigma, pop.shape)
            for layer in np.nonzero(rng.random(num_layers) < cfg.swap_prob)[0]:
                pick = rng.choice(num_experts, size=2 * cfg.swap_pairs, replace=False).reshape(2, -1)
                pop[layer, pick[0]], pop[layer, pick[1]] = pop[layer, pick[1]], pop[layer, pick[0]].copy()
        pop /= pop.sum(axis=1, keepdims=True)
        out[r] = rng.multinomial(total, pop) if cfg.multinomial else total * pop
    return out


def imbalance(layout: ExpertLayout, load: np.ndarray) -> float:
    """Mean over layers of max / mean rank load (1.0 is perfect)."""
    rank_load = layout.rank_loads(load)
    return float((rank_load.max(axis=1) / rank_load.mean(axis=1)).mean())


def timed(fn: Callable, *args, **kwargs):
    """(fn's result, seconds it took)."""
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - start


def place(shape: Shape, load, policy, old=None, ranks=None, nodes=None, live=None, spr=None) -> ExpertLayout:
    """rebalance_experts with this shape's defaults."""
    return rebalance_experts(
        load,
        shape.ranks if ranks is None else ranks,
        shape.slots_per_rank if spr is None else spr,
        rank_nodes=shape.rank_nodes if nodes is None else nodes,
        num_groups=shape.num_groups,
        old=old,
        live_ranks=live,
        policy=policy,
    )


# ---------------------------------------------------------------------------------------
# Steady state: the two arms over the same drifting load
# ---------------------------------------------------------------------------------------


def run_arms(shape: Shape, loads: np.ndarray) -> tuple[dict, dict[str, ExpertLayout]]:
    """Replay loads[1:] through both arms; per-round records and the final layouts."""
    init = place(shape, loads[0], "eplb")
    prev = {"sticky": init, "eplb": init}
    live = shape.ranks
    # One warm-up call of each function per arm (discarded).
    for arm in prev:
        warm = place(shape, loads[1], arm, old=init if arm == "sticky" else None)
        plan_transfers(init, warm, live, expert_bytes=shape.expert_bytes)
    rec: dict[str, dict[str, list]] = {
        arm: {k: [] for k in ("balance_s", "plan_s", "imbalance", "bytes_p2p", "bytes_fetched",
                              "max_rank_bytes_received", "stages")}
        for arm in prev
    }
    for r in range(1, len(loads)):
        for arm in prev:  # interleaved so both arms see the same machine state
            new, t_bal = timed(place, shape, loads[r], arm, old=prev[arm] if arm == "sticky" else None)
            plan, t_plan = timed(plan_transfers, prev[arm], new, live, expert_bytes=shape.expert_bytes)
            s = plan.summary()
            rec[arm]["balance_s"].append(t_bal)
            rec[arm]["plan_s"].append(t_plan)
            rec[arm]["imbalance"].append(imbalance(new, loads[r]))
            rec[arm]["bytes_p2p"].append(s["bytes_p2p"])
            rec[arm]["bytes_fetched"].append(s["bytes_fetched"])
            rec[arm]["max_rank_bytes_received"].append(s["max_rank_bytes_received"])
            rec[arm]["stages"].append(s["stages"])
            prev[arm] = new
    return rec, prev


def arm_stats(rec: dict) -> dict:
    """Medians, p90s, means and maxima of one arm's per-round records."""
    total = np.add(rec["balance_s"], rec["plan_s"])
    pct = lambda xs, q: float(np.percentile(xs, q))  # noqa: E731
    return {
        "balance_ms_median": 1e3 * pct(rec["balance_s"], 50),
        "balance_ms_p90": 1e3 * pct(rec["balance_s"], 90),
        "plan_ms_median": 1e3 * pct(rec["plan_s"], 50),
        "plan_ms_p90": 1e3 * pct(rec["plan_s"], 90),
        "total_ms_median": 1e3 * pct(total, 50),
        "total_ms_p90": 1e3 * pct(total, 90),
        "imbalance_mean": float(np.mean(rec["imbalance"])),
        "imbalance_worst": float(np.max(rec["imbalance"])),
        "p2p_gb_mean": float(np.mean(rec["bytes_p2p"])) / GB,
        "p2p_gb_max": float(np.max(rec["bytes_p2p"])) / GB,
        "max_rank_recv_gb_mean": float(np.mean(rec["max_rank_bytes_received"])) / GB,
    }


# ---------------------------------------------------------------------------------------
# Elastic events from the final sticky layout
# ---------------------------------------------------------------------------------------


def elastic_events(shape: Shape, dead: int) -> list[dict]:
    """The three membership changes: new ranks, their nodes, and the surviving old ranks."""
    ranks, nodes = shape.ranks, shape.rank_nodes
    survivors = tuple(r for r in ranks if r != dead)
    shrink_nodes = tuple(n for r, n in zip(ranks, nodes) if r != dead)
    grown = tuple(range(shape.num_ranks, shape.num_ranks + shape.grow_ranks))
    grow_node = shape.num_nodes if shape.grow_new_node else nodes[-1]
    where = f"new node {grow_node}" if shape.grow_new_node else f"node {grow_node}"
    return [
        {"event": f"rank {dead} dies, replaced", "ranks": ranks, "nodes": nodes, "live": survivors},
        {"event": f"rank {dead} dies, no spare", "ranks": survivors, "nodes": shrink_nodes, "live": survivors},
        {"event": f"grow +{shape.grow_ranks} rank(s), {where}", "ranks": ranks + grown,
         "nodes": nodes + (grow_node,) * len(grown), "live": ranks},
    ]


def hierarchical(shape: Shape, nodes: Sequence[int]) -> bool:
    """Whether EPLB's node-level step applies (groups divide over nodes of equal size)."""
    ids = sorted(set(nodes))
    sizes = {list(nodes).count(n) for n in ids}
    return len(ids) > 1 and shape.num_groups > 1 and shape.num_groups % len(ids) == 0 and len(sizes) == 1


def run_elastic(shape: Shape, start: ExpertLayout, load: np.ndarray, dead: int, repeats: int) -> list[dict]:
    """Plan every elastic event with both policies; one row per (event, policy)."""
    rows = []
    for ev in elastic_events(shape, dead):
        spr_options = [shape.slots_per_rank]
        for policy in ("sticky", "eplb"):
            for spr in spr_options:
                label = ev["event"] + ("" if spr == shape.slots_per_rank else f", spr {shape.slots_per_rank}->{spr}")
                row = {"event": label, "policy": policy,
                       "placement": "hierarchical" if hierarchical(shape, ev["nodes"]) else "global"}

                def full_plan():
                    new = place(shape, load, policy, old=start if policy == "sticky" else None,
                                ranks=ev["ranks"], nodes=ev["nodes"], live=ev["live"], spr=spr)
                    return new, plan_transfers(start, new, ev["live"], expert_bytes=shape.expert_bytes)

                try:
                    full_plan()  # warm-up
                except CapacityError as err:
                    rows.append({**row, "error": str(err)})
                    fit = -(-shape.num_experts // len(ev["ranks"]))  # fewest slots per rank that fit
                    if fit not in spr_options:
                        spr_options.append(fit)
                    continue
                times = []
                for _ in range(repeats):
                    (new, plan), t = timed(full_plan)
                    times.append(t)
                s = plan.summary()
                rows.append({
                    **row,
                    "plan_ms": 1e3 * float(np.median(times)),
                    "p2p_gb": s["bytes_p2p"] / GB,
                    "fetched_gb": s["bytes_fetched"] / GB,
                    "max_rank_recv_gb": s["max_rank_bytes_received"] / GB,
                    "max_rank_fetched_gb": s["max_rank_bytes_fetched"] / GB,
                    "imbalance": imbalance(new, load),
                })
    return rows


# ---------------------------------------------------------------------------------------
# Profile
# ---------------------------------------------------------------------------------------


def profile_sticky(shape: Shape, loads: np.ndarray, top: int) -> list[dict]:
    """cProfile the sticky arm (balance + plan) over the rounds; top functions by cumulative time.

    Times are cumulative ms per planning round (under the profiler, so inflated).
    """
    prev = place(shape, loads[0], "eplb")
    place(shape, loads[1], "sticky", old=prev)  # warm-up outside the profile
    prof = cProfile.Profile()
    rounds = len(loads) - 1
    prof.enable()
    for r in range(1, len(loads)):
        new = place(shape, loads[r], "sticky", old=prev)
        plan_transfers(prev, new, shape.ranks, expert_bytes=shape.expert_bytes)
        prev = new
    prof.disable()
    stats = pstats.Stats(prof).stats  # (file, line, func) -> (cc, ncalls, tottime, cumtime, callers)
    out = []
    for (path, line, func), (_, ncalls, tottime, cumtime, _) in stats.items():
        if func == "disable" or path == __file__:
            continue
        where = f"{Path(path).parent.name}/{Path(path).name}:{line}" if path != "~" else "builtin"
        out.append({"function": f"{func} ({where})", "cum_ms_per_round": 1e3 * cumtime / rounds,
                    "self_ms_per_round": 1e3 * tottime / rounds, "calls_per_round": ncalls / rounds})
    out.sort(key=lambda x: -x["cum_ms_per_round"])
    return out[:top]


# ---------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------


def machine() -> str:
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
        model = f"{model} ({name})" if name else model
    except OSError:
        pass
    return (f"{model}, os.cpu_count()={os.cpu_count()}, python {platform.python_version()}, "
            f"numpy {np.__version__}")


def verdict(ok: bool) -> str:
    return "MET" if ok else "NOT MET"


def format_shape(shape: Shape, stats: dict, ratios: dict, elastic: list[dict], rounds: int) -> list[str]:
    lines = ["", "== " + shape.header()]
    lines.append(f"{'arm':<7} {'balance ms':>13} {'plan ms':>13} {'total ms':>13}   "
                 f"{'imbalance':>15}   {'p2p GB/round':>13} {'max rank':>9}")
    lines.append(f"{'':<7} {'med':>6} {'p90':>6} {'med':>6} {'p90':>6} {'med':>6} {'p90':>6}   "
                 f"{'mean':>7} {'worst':>7}   {'mean':>6} {'max':>6} {'recv GB':>9}")
    for arm, s in stats.items():
        lines.append(
            f"{arm:<7} {s['balance_ms_median']:6.1f} {s['balance_ms_p90']:6.1f} "
            f"{s['plan_ms_median']:6.1f} {s['plan_ms_p90']:6.1f} "
            f"{s['total_ms_median']:6.1f} {s['total_ms_p90']:6.1f}   "
            f"{s['imbalance_mean']:7.4f} {s['imbalance_worst']:7.4f}   "
            f"{s['p2p_gb_mean']:6.1f} {s['p2p_gb_max']:6.1f} {s['max_rank_recv_gb_mean']:9.2f}"
        )
    lines.append(
        f"sticky/eplb over {rounds} rounds: p2p bytes x{ratios['bytes']:.3f} (mean), "
        f"imbalance x{ratios['imbalance_mean']:.4f} (mean), x{ratios['imbalance_worst_round']:.4f} (worst round)"
    )
    lines.append(f"elastic, from the final sticky layout, round-{rounds} load:")
    lines.append(f"  {'event':<36} {'policy':<7} {'plan ms':>7} {'p2p GB':>7} {'fetch GB':>8} "
                 f"{'max rank':>8} {'imbal.':>7}  placement")
    lines.append(f"  {'':<36} {'':<7} {'':>7} {'':>7} {'':>8} {'recv GB':>8}")
    for row in elastic:
        head = f"  {row['event']:<36} {row['policy']:<7}"
        if "error" in row:
            lines.append(f"{head} infeasible: {row['error']}")
            continue
        lines.append(
            f"{head} {row['plan_ms']:7.1f} {row['p2p_gb']:7.1f} {row['fetched_gb']:8.1f} "
            f"{row['max_rank_recv_gb']:8.2f} {row['imbalance']:7.4f}  {row['placement']}"
        )
    return lines


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=20, help="rebalance rounds after round 0")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--zipf-s", type=float, default=LoadConfig.zipf_s)
    parser.add_argument("--drift-sigma", type=float, default=LoadConfig.drift_sigma)
    parser.add_argument("--swap-prob", type=float, default=LoadConfig.swap_prob)
    parser.add_argument("--swap-pairs", type=int, default=LoadConfig.swap_pairs)
    parser.add_argument("--tokens", type=int, default=LoadConfig.tokens, help="tokens per round")
    parser.add_argument("--multinomial", action="store_true", help="sample token counts (default: expected)")
    parser.add_argument("--dead-rank", type=int, default=3, help="rank that dies in the elastic events")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per elastic event (median)")
    parser.add_argument("--shapes", default="all", help="comma-separated shape names, or 'all'")
    parser.add_argument("--json", metavar="PATH", help="also write every number (and per-round records) here")
    parser.add_argument("--profile", type=int, metavar="N", default=0,
                        help="cProfile the DeepSeek-V3 sticky path and print the top N functions")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error(f"--rounds must be >= 1, got {args.rounds}")
    cfg = LoadConfig(args.zipf_s, args.drift_sigma, args.swap_prob, args.swap_pairs, args.tokens, args.multinomial)
    shapes = [s for s in SHAPES if args.shapes == "all" or s.name in args.shapes.split(",")]
    if not shapes:
        parser.error(f"no shape matches {args.shapes!r}; known: {[s.name for s in SHAPES]}")

    started = time.perf_counter()
    lines = [
        "elastic_ep planner benchmark (bench/planner.py)",
        f"machine: {machine()}",
        f"load: Zipf s={cfg.zipf_s} over a per-layer random expert permutation; each round x lognormal"
        f"(sigma={cfg.drift_sigma}), and with p={cfg.swap_prob} per layer {cfg.swap_pairs} expert pairs swap "
        f"popularity; {'multinomial sample of' if cfg.multinomial else 'expected'} counts of "
        f"{cfg.tokens} tokens x top-k; seed {args.seed}; {args.rounds} rounds after round 0",
        "both arms start from the eplb layout of round 0's load; timings: time.perf_counter per call after one "
        "warm-up call, median/p90 over rounds",
        "imbalance: mean over layers of max/mean rank load (1 = perfect); p2p: expert bytes sent rank to rank "
        "per round (1 GB = 1e9 B); elastic plan ms: median of "
        f"{args.repeats}, balance + transfer plan",
    ]
    report: dict = {"machine": machine(), "load": asdict(cfg), "seed": args.seed, "rounds": args.rounds,
                    "shapes": {}}
    targets = []
    seeds = np.random.SeedSequence(args.seed).spawn(len(SHAPES))
    for shape, seed in zip(SHAPES, seeds):
        if shape not in shapes:
            continue
        loads = drifting_load(shape, cfg, args.rounds, np.random.default_rng(seed))
        rec, final = run_arms(shape, loads)
        stats = {arm: arm_stats(r) for arm, r in rec.items()}
        per_round = np.divide(rec["sticky"]["imbalance"], rec["eplb"]["imbalance"])
        ratios = {
            "bytes": stats["sticky"]["p2p_gb_mean"] / max(stats["eplb"]["p2p_gb_mean"], 1e-30),
            "imbalance_mean": stats["sticky"]["imbalance_mean"] / stats["eplb"]["imbalance_mean"],
            "imbalance_worst_round": float(per_round.max()),
        }
        elastic = run_elastic(shape, final["sticky"], loads[-1], args.dead_rank, args.repeats)
        lines += format_shape(shape, stats, ratios, elastic, args.rounds)
        report["shapes"][shape.name] = {
            "shape": {**asdict(shape), "expert_bytes": shape.expert_bytes},
            "arms": stats, "ratios": ratios, "elastic": elastic, "per_round": rec,
        }
        if shape.name == "DeepSeek-V3":
            ms = stats["sticky"]["total_ms_median"]
            targets.append((f"V3 full plan (sticky balance + transfer plan) < {1e3 * FULL_PLAN_TARGET_S:.0f} ms: "
                            f"median {ms:.1f} ms, p90 {stats['sticky']['total_ms_p90']:.1f} ms "
                            f"(eplb arm median {stats['eplb']['total_ms_median']:.1f} ms)",
                            ms < 1e3 * FULL_PLAN_TARGET_S))
        targets.append((f"{shape.name} sticky p2p bytes <= {BYTES_RATIO_TARGET}x eplb: x{ratios['bytes']:.3f}",
                        ratios["bytes"] <= BYTES_RATIO_TARGET))
        targets.append((f"{shape.name} sticky imbalance within {100 * (BALANCE_RATIO_TARGET - 1):.0f}% of eplb "
                        f"in every round: worst x{ratios['imbalance_worst_round']:.4f}",
                        ratios["imbalance_worst_round"] <= BALANCE_RATIO_TARGET))
    lines += ["", "targets:"] + [f"  [{verdict(ok)}] {text}" for text, ok in targets]
    report["targets"] = [{"target": text, "met": ok} for text, ok in targets]

    if args.profile:
        v3 = next(s for s in SHAPES if s.name == "DeepSeek-V3")
        loads = drifting_load(v3, cfg, args.rounds, np.random.default_rng(seeds[0]))
        hot = profile_sticky(v3, loads, args.profile)
        report["profile_v3_sticky"] = hot
        lines += ["", f"cProfile, DeepSeek-V3 sticky arm (balance + plan), top {args.profile} by cumulative time, "
                  "ms per round under the profiler:",
                  f"  {'cum ms':>7} {'self ms':>7} {'calls':>7}  function"]
        lines += [f"  {h['cum_ms_per_round']:7.2f} {h['self_ms_per_round']:7.2f} {h['calls_per_round']:7.1f}  "
                  f"{h['function']}" for h in hot]

    elapsed = time.perf_counter() - started
    lines += ["", f"wall time: {elapsed:.1f} s"]
    report["wall_s"] = elapsed
    print("\n".join(lines))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1, default=lambda x: x.tolist()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
