"""Serving through faults: the longest serving gap at a kill and throughput during a rebalance, elastic vs stop-the-world.

Both arms run in one process on one cluster, each with a background serving stream
(``elastic_ep.serving.stream``, every call checked against the checkpoint oracle):

* elastic (the product): serving never pauses. At a rebalance the calls keep the old
  epoch until the commit; at a SIGKILL the clients mask the dead rank at once, re-send
  in-flight tokens to live replicas, and only tokens whose expert has no live replica
  wait for the hot spare's commit.
* stop-the-world (the seed's "before"): serving is paused from the event until it is
  done; at a kill, until the dead rank's experts are re-read from the checkpoint
  (``CheckpointReader``) and the replacement has committed; then serving resumes.

Measured per arm (``elastic_ep.serving_stats.summarize``): the longest completion gap
around the kill, throughput during the rebalance / steady throughput, failed and wrong calls,
the rebalance's commits and its peak staging per rank.

``--layers-per-step N`` adds a third arm, "layerwise": the elastic arm's rebalance (to another
load) migrating N MoE layers per commit (``elastic_ep.migration``), without a kill, so that
throughput during a whole-model and a layerwise rebalance sit side by side in one table.

Run from the repository root::

    python -m bench.serving_faults --device cpu --json /tmp/serving_faults.json
    python -m bench.serving_faults --device cpu --layers 8 --layers-per-step 1   # whole-model vs layerwise
    python -m bench.serving_faults --device cuda --json $OUT/serving_faults.json   # one GPU: a rank and a spare share it
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from elastic_ep.cluster import ElasticEPCluster  # noqa: E402
from elastic_ep.config import ClusterConfig, ModelSpec  # noqa: E402
from elastic_ep.report import human_bytes  # noqa: E402
from elastic_ep.serving.oracle import CheckpointOracle  # noqa: E402
from elastic_ep.serving.stream import ServingStream, StreamConfig  # noqa: E402
from elastic_ep.serving_stats import ServingLog  # noqa: E402
from elastic_ep.storage import CheckpointReader, write_synthetic_checkpoint  # noqa: E402
from elastic_ep.testing import sigkill_workers  # noqa: E402
from elastic_ep.timeline import write_timeline  # noqa: E402


def _stream(cluster, oracle, log, args, streams: list) -> ServingStream:
    """A started stream of serving calls, also appended to ``streams`` (the arm's, for failure reasons)."""
    client = cluster.client(view_max_age_s=0.2, log=log)
    streams.append(ServingStream(client, oracle, StreamConfig(tokens=args.tokens, top_k=args.top_k,
                                                              threads=args.threads, check_every=args.check_every)))
    return streams[-1].start()


def _reload_from_checkpoint(reader: CheckpointReader, layout: dict, position: int) -> float:
    """Re-read every expert of the rank at ``position`` from the checkpoint; seconds taken."""
    t0 = time.perf_counter()
    spr = layout["slots_per_rank"]
    for layer, row in enumerate(layout["phy2log"]):
        reader.read_layer_slots(layer, [int(e) for e in row[position * spr:(position + 1) * spr]])
    return time.perf_counter() - t0


def run_arm(cluster, oracle, reader, args, stop_the_world: bool, victim: Optional[int],
            layers_per_step: int = 0, seed: int = 0) -> tuple[dict, ServingLog]:
    """One arm: steady, a rebalance (``layers_per_step`` layers per commit; 0: all), steady, then unless
    ``victim`` is None a SIGKILL of it and its recovery, steady. The row's ``failure_reasons``: the
    first failure of each stream that had one."""
    log, streams = ServingLog(), []
    stream = _stream(cluster, oracle, log, args, streams)
    time.sleep(args.steady_s)
    if stop_the_world:
        stream.stop()
    log.mark("rebalance_start")
    rep = cluster.rebalance(load=_load(cluster, args.seed + seed), layers_per_step=layers_per_step)
    log.mark("rebalance_commit")
    if stop_the_world:
        stream = _stream(cluster, oracle, log, args, streams)
    time.sleep(args.steady_s)
    moves = {"rebalance_commits": rep.commits, "rebalance_moved_slots": rep.plan.get("transfers", 0),
             "rebalance_peak_staged_bytes": max(rep.staging_peak_bytes.values(), default=0)}
    if victim is None:
        stream.stop()
        return _row(log, "layerwise" if layers_per_step else "elastic", None, moves, streams), log
    status = cluster.status()
    position = sorted(status["ranks"]).index(victim)
    if stop_the_world:
        stream.stop()
    log.mark("kill", f"rank {victim}")
    sigkill_workers(cluster, [victim])
    log.mark("detect", f"rank {victim}")
    reload_s = _reload_from_checkpoint(reader, status["layout"], position) if stop_the_world else None
    healthy = cluster.wait_healthy(timeout_s=300)
    rec = next((h for h in reversed(healthy["history"]) if h["reason"] == "recover"), {})
    log.mark("commit", f"rank {victim}", t_s=max(rec.get("committed_at") or 0.0, log.clock() if stop_the_world else 0.0)
             or None)  # stop-the-world commits when serving resumes
    if stop_the_world:
        stream = _stream(cluster, oracle, log, args, streams)
    time.sleep(args.steady_s)
    stream.stop()
    return _row(log, "stop-the-world" if stop_the_world else "elastic", reload_s, moves, streams), log


def _row(log: ServingLog, arm: str, reload_s: Optional[float], moves: dict, streams: list) -> dict:
    """One table row from an arm's serving log (kill columns None for an arm without a kill)."""
    s = log.summary()
    kill = s.kills[0] if s.kills else None
    reb = s.rebalances[0]
    return {
        "arm": arm,
        "kill_gap_s": kill.gap.length_s if kill else None,
        "kill_to_commit_s": kill.commit_after_s if kill else None,
        "checkpoint_reload_s": reload_s,
        "kill_p99_s": kill.latency_p99_s if kill else None,
        "rebalance_s": reb.t_end_s - reb.t_start_s,
        "rebalance_tokens_per_s": reb.tokens_per_s or 0.0,
        "steady_tokens_per_s": s.steady_tokens_per_s,
        "rebalance_ratio": (reb.tokens_per_s or 0.0) / s.steady_tokens_per_s if s.steady_tokens_per_s else None,
        "steady_p50_s": s.steady_p50_s,
        "steady_p99_s": s.steady_p99_s,
        "calls": s.calls,
        "failed_calls": s.failed_calls, "failed_by_kind": dict(s.failed_by_kind),
        "wrong_calls": s.wrong_calls,
        "checked_calls": s.checked_calls,
        "retried_tokens": s.retried_tokens,
        "failure_reasons": sorted({st.first_failure for st in streams if st.first_failure}),
        **moves,
    }


def _load(cluster, seed: int):
    import numpy as np

    spec = cluster.config.model
    rng = np.random.default_rng(seed)
    return rng.zipf(1.5, size=(spec.num_layers, spec.num_experts)).astype(float)


def _fmt(x, scale=1.0, unit="", digits=0) -> str:
    return "n/a" if x is None else f"{x * scale:.{digits}f}{unit}"


def format_table(rows: list[dict]) -> str:
    head = (f"{'arm':<16}{'kill gap':>10}{'kill->commit':>14}{'rebal tok/s':>13}{'steady tok/s':>14}"
            f"{'rebal/steady':>14}{'rebal s':>9}{'moved':>7}{'commits':>9}{'peak staged':>13}{'p50':>8}{'p99':>8}{'calls':>7}{'failed':>8}"
            f"{'wrong':>7}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['arm']:<16}{_fmt(r['kill_gap_s'], 1e3, 'ms'):>10}{_fmt(r['kill_to_commit_s'], 1e3, 'ms'):>14}"
                     f"{_fmt(r['rebalance_tokens_per_s']):>13}{_fmt(r['steady_tokens_per_s']):>14}"
                     f"{_fmt(r['rebalance_ratio'], 100, '%'):>14}{_fmt(r['rebalance_s'], 1, 's', 2):>9}"
                     f"{r['rebalance_moved_slots']:>7}{r['rebalance_commits']:>9}"
                     f"{human_bytes(r['rebalance_peak_staged_bytes']):>13}{_fmt(r['steady_p50_s'], 1e3, 'ms', 1):>8}"
                     f"{_fmt(r['steady_p99_s'], 1e3, 'ms', 1):>8}{r['calls']:>7}{r['failed_calls']:>8}{r['wrong_calls']:>7}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--hidden", type=int, default=None, help="default 64 on CPU, 2048 on CUDA")
    p.add_argument("--intermediate", type=int, default=None, help="default 48 on CPU, 1408 on CUDA")
    p.add_argument("--ranks", type=int, default=None, help="default 4 on CPU; 1 on CUDA (a rank and a spare share the GPU)")
    p.add_argument("--slots", type=int, default=None, help="slots per rank (default: experts * 1.5 / ranks)")
    p.add_argument("--tokens", type=int, default=32, help="tokens per call")
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--threads", type=int, default=2, help="serving threads")
    p.add_argument("--check-every", type=int, default=4, help="check every n-th call against the oracle")
    p.add_argument("--steady-s", type=float, default=2.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--layers-per-step", type=int, default=0,
                   help="also run a layerwise arm: its rebalance migrates this many MoE layers per commit (0: no)")
    p.add_argument("--json", default=None)
    p.add_argument("--workdir", default=None)
    args = p.parse_args(argv)
    cuda = args.device == "cuda"
    hidden = args.hidden or (2048 if cuda else 64)
    inter = args.intermediate or (1408 if cuda else 48)
    ranks = args.ranks or (1 if cuda else 4)
    slots = args.slots or min(args.experts, -(-args.experts * 3 // (2 * ranks)))  # a rank holds an expert once
    spec = ModelSpec(num_layers=args.layers, num_experts=args.experts, hidden=hidden, intermediate=inter)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="eep-sfaults-"))
    ckpt = write_synthetic_checkpoint(work / "checkpoint", spec, preset="deepseek", num_shards=2)
    cfg = ClusterConfig(model=spec, checkpoint=str(ckpt), num_ranks=ranks, slots_per_rank=slots, num_spares=2,
                        device=args.device, state_dir=str(work / "state"), transfer_timeout_s=60.0,
                        call_timeout_s=60.0, startup_timeout_s=300.0,
                        gpu_fractions=tuple([1.0 / (ranks + 2)] * (ranks + 2)) if cuda else None)
    oracle = CheckpointOracle(str(ckpt), spec, "deepseek")
    reader = CheckpointReader(str(ckpt), spec, "deepseek")
    rows, logs = [], []
    with ElasticEPCluster(cfg, ray_init_kwargs=None if cuda else {"num_cpus": 2}) as cluster:
        arms = [(False, 0)] + ([(False, args.layers_per_step)] if args.layers_per_step else []) + [(True, 0)]
        for i, (stw, lps) in enumerate(arms):
            victim = None if lps else sorted(cluster.status()["ranks"])[0]
            row, log = run_arm(cluster, oracle, reader, args, stw, victim, layers_per_step=lps, seed=i)
            rows.append(row)
            logs.append(log)
    print(f"serving through faults: {args.device}, {ranks} rank(s) x {slots} slots, {spec.num_layers} layers x "
          f"{spec.num_experts} experts, hidden {hidden}, {args.threads} threads x {args.tokens} tokens a call")
    print(format_table(rows))
    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"device": args.device, "spec": vars(args), "rows": rows}, indent=1))
        for row, log in zip(rows, logs):
            write_timeline(log, None, out.with_name(f"{out.stem}-{row['arm']}.png"), title=f"serving faults: {row['arm']}")
        print(f"wrote {out}")
    for reason in sorted({r for row in rows for r in row["failure_reasons"]}):
        print(f"a failed call: {reason[:3000]}")
    return 0 if all(r["wrong_calls"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
