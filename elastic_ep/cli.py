"""The ``elastic-ep`` command: demo, make-checkpoint, chaos, and commands against a running cluster.

    elastic-ep start --checkpoint CKPT [--address A] [--name N]   a cluster that outlives the command
    elastic-ep status | rebalance | verify | grow N | drain RANK | shrink RANK... | stop
               [--address A] [--name N] [--json]                        attach to it by name, act, let go
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from .config import ClusterConfig, ModelSpec
from .errors import ElasticEPError

# DeepSeek-V2-Lite's expert geometry, scaled down (hidden, intermediate) so it runs on a CPU.
V2_LITE_CPU = dict(num_layers=26, num_experts=64, hidden=128, intermediate=88, first_layer=1)


def _spec_from_args(args) -> ModelSpec:
    return ModelSpec(
        num_layers=args.layers, num_experts=args.experts, hidden=args.hidden,
        intermediate=args.intermediate, dtype=args.dtype, first_layer=args.first_layer,
    )


def _add_spec_args(p: argparse.ArgumentParser, **defaults) -> None:
    d = {**V2_LITE_CPU, **defaults}
    p.add_argument("--layers", type=int, default=d["num_layers"], help="MoE layers")
    p.add_argument("--experts", type=int, default=d["num_experts"], help="routed experts per layer")
    p.add_argument("--hidden", type=int, default=d["hidden"], help="hidden size")
    p.add_argument("--intermediate", type=int, default=d["intermediate"], help="expert intermediate size")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--first-layer", type=int, default=d["first_layer"],
                   help="checkpoint index of the first MoE layer" + (" (default: 1 for deepseek_v3, else 0)"
                                                                     if d["first_layer"] is None else ""))


_FAMILY_PRESET = {"deepseek_v3": "deepseek", "mixtral": "mixtral", "qwen3_moe": "qwen", "gpt_oss": "gpt-oss"}


def _make_checkpoint_spec(args) -> tuple[ModelSpec, str, str, int]:
    """(spec, family, preset, shards) of make-checkpoint's arguments, with defaults that work together."""
    from math import gcd

    family = args.family or {v: k for k, v in _FAMILY_PRESET.items()}.get(args.preset, "deepseek_v3")
    preset = args.preset or _FAMILY_PRESET[family]
    first = args.first_layer if args.first_layer is not None else (1 if family == "deepseek_v3" else 0)
    block = tuple(args.block) if args.block else (min(128, gcd(args.intermediate, args.hidden) & -gcd(
        args.intermediate, args.hidden)),) * 2  # largest power of two <= 128 dividing both sizes
    spec = ModelSpec(
        num_layers=args.layers, num_experts=args.experts, hidden=args.hidden, intermediate=args.intermediate,
        dtype=args.dtype, first_layer=first, quant=args.quant, block=block, bias=family == "gpt_oss",
    )
    return spec, family, preset, args.shards if args.shards is not None else min(4, spec.num_layers)


def cmd_make_checkpoint(args) -> int:
    from .checkpoint import write_checkpoint

    spec, family, preset, shards = _make_checkpoint_spec(args)
    t0 = time.perf_counter()
    path = write_checkpoint(args.path, spec, preset=preset, num_shards=shards, progress=True, family=family)
    size = sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))
    quant = "" if spec.quant == "none" else f", {spec.quant}" + (f" blocks {spec.block}" if spec.quant == "fp8" else "")
    print(f"wrote {path}: {spec.num_layers} layers x {spec.num_experts} experts ({spec.expert_bytes} B each{quant}), "
          f"{shards} shards, {size / 2**20:.1f} MiB in {time.perf_counter() - t0:.2f}s "
          f"({family} config, preset {preset})")
    return 0


def _step(title: str) -> float:
    print(f"\n== {title}", flush=True)
    return time.perf_counter()


def cmd_demo(args) -> int:
    import numpy as np

    from .cluster import ElasticEPCluster
    from .serving.loop import serve_loop
    from .serving.stream import ServingStream, StreamConfig, summary_line
    from .serving_stats import ServingLog
    from .testing import sigkill_workers
    from .timeline import write_timeline
    from .serving.oracle import CheckpointOracle
    from .workload import SkewedRouter
    from .report import RebalanceReport, format_report
    from .storage import write_synthetic_checkpoint

    t_all = time.perf_counter()
    spec = _spec_from_args(args)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="eep-demo-"))
    t0 = _step(f"1. synthetic checkpoint (DeepSeek-V2-Lite expert layout, scaled down) in {work}")
    ckpt = write_synthetic_checkpoint(work / "checkpoint", spec, preset="deepseek", num_shards=min(4, spec.num_layers),
                                      progress=True)
    print(f"   {spec.num_layers} MoE layers x {spec.num_experts} experts, "
          f"{spec.expert_bytes / 1024:.0f} KiB per expert ({time.perf_counter() - t0:.2f}s)")

    cfg = ClusterConfig(
        model=spec, checkpoint=str(ckpt), num_ranks=args.ranks, slots_per_rank=args.slots,
        num_spares=args.spares, state_dir=str(work / "state"), transfer_timeout_s=20.0, call_timeout_s=30.0,
    )
    t0 = _step(f"2. start a local cluster: {cfg.num_ranks} workers x {cfg.slots_per_rank} slots + "
               f"{cfg.num_spares} hot spare (embedded Ray, CPU, Gloo)")
    cluster = ElasticEPCluster(cfg, ray_init_kwargs={"num_cpus": 2})
    summary = {}
    try:
        info = cluster.start()
        print(f"   started in {time.perf_counter() - t0:.1f}s: weights loaded {info.load_s:.2f}s "
              f"({info.checkpoint_bytes / 2**20:.1f} MiB read), host backups {info.backup_s:.2f}s, "
              f"communicators {1e3 * info.group_s:.0f}ms")

        t0 = _step("3. serve: a skewed, drifting router's tokens through every MoE layer on the workers")
        client, oracle = cluster.client(), CheckpointOracle(str(ckpt), spec, "deepseek")
        router = SkewedRouter(spec.num_layers, spec.num_experts, zipf_s=1.2, seed=args.seed)
        served = serve_loop(client, router, args.batches, args.tokens, oracle, seed=args.seed)
        _print_served(served, time.perf_counter() - t0)
        load = cluster.served_load()  # what the workers counted, per logical expert
        top = np.argsort(-load[0])[:4]
        print(f"   workers counted {int(load.sum())} (token, expert) pairs (client sent {served.pairs}); layer 0's "
              f"hottest experts {top.tolist()} served {load[0, top].astype(int).tolist()}")

        log = ServingLog()
        stream = ServingStream(cluster.client(view_max_age_s=0.2, log=log), oracle,
                               StreamConfig(tokens=args.stream_tokens, seed=args.seed)).start()
        print(f"   a serving stream starts in the background ({args.stream_tokens} tokens a call, every call checked)")
        time.sleep(args.steady_s)
        t0 = _step("4. rebalance by the load the workers counted (sticky EPLB), serving throughout")
        log.mark("rebalance_start")
        rep = cluster.rebalance()
        log.mark("rebalance_commit")
        print(format_report(rep))
        summary["rebalance_s"] = rep.total_s
        time.sleep(args.steady_s)

        t0 = _step("5. SIGKILL rank 2's worker while serving; calls mask it at once, a hot spare takes over")
        log.mark("kill", "rank 2")
        sigkill_workers(cluster, [2])
        log.mark("detect", "rank 2")
        status = cluster.wait_healthy(timeout_s=90)
        rec = RebalanceReport.from_dict(next(h for h in reversed(status["history"]) if h["reason"] == "recover"))
        log.mark("commit", "rank 2", t_s=rec.committed_at)  # the recovery's commit, not the spare refill
        time.sleep(args.steady_s)
        stream.stop()
        print(format_report(rec))
        summary["recover_s"] = rec.critical_path_s
        served.wrong += stream.wrong
        served.checked += log.summary().checked_calls
        served.tokens += log.summary().tokens_served
        summary["served"] = served
        stats = log.summary()
        png = write_timeline(log, None, work / "serving-timeline.png", title="elastic-ep demo: serving through a "
                             "rebalance and a SIGKILL")
        print(f"   serving stream: {summary_line(stats, stream.wrong)}")
        for k in stats.kills:
            print(f"   at the kill ({k.label}): longest gap {1e3 * k.gap.length_s:.0f} ms, {k.failed_calls} failed "
                  f"calls, latency p50/p99 {_opt_ms(k.latency_p50_s)}/{_opt_ms(k.latency_p99_s)}, "
                  f"detect {_opt_ms(k.detect_after_s)}, commit {_opt_ms(k.commit_after_s)} after the kill")
        for r in stats.rebalances:
            ratio = "n/a" if r.ratio_to_steady is None else f"{100 * r.ratio_to_steady:.0f}%"
            print(f"   during the rebalance: {ratio} of steady throughput")
        print(f"   timeline: {png}")

        t0 = _step("6. verify every slot against the checkpoint")
        ver = cluster.verify(against_checkpoint=True)
        print(f"   {ver.slots_checked} slots checked, {ver.num_bad} bad -> {'OK' if ver.ok else 'FAILED'} "
              f"({time.perf_counter() - t0:.2f}s)")
        summary["verified"] = ver.ok
        if not ver.ok:
            print(json.dumps(ver.to_dict()["bad"], indent=1))
            return 1
    finally:
        cluster.shutdown()
    served = summary["served"]
    print(f"\ndemo done in {time.perf_counter() - t_all:.1f}s: rebalance {summary['rebalance_s']:.2f}s, "
          f"kill-to-restored {summary['recover_s']:.2f}s, all slots verified; {served.tokens} tokens served, "
          f"{served.wrong} wrong outputs of {served.checked} checked")
    return 0 if served.wrong == 0 else 1


def _opt_ms(t) -> str:
    return "n/a" if t is None else f"{1e3 * t:.0f} ms"


def _print_served(served, seconds) -> None:
    took = "" if seconds is None else f" in {seconds:.1f}s"
    print(f"   {served.calls} layer calls, {served.tokens} tokens served{took}; per-call latency "
          f"p50 {served.percentile_ms(50):.1f} ms, p99 {served.percentile_ms(99):.1f} ms; "
          f"wrong outputs {served.wrong} of {served.checked} checked against the checkpoint oracle")


def cmd_chaos(args) -> int:
    from .chaos import run_chaos

    from .quiet import quiet_worker_deaths

    from .serving_stats import ServingLog
    from .timeline import write_recovery_timelines, write_timeline

    log = ServingLog()
    with quiet_worker_deaths("the chaos run's kills"):
        result = run_chaos(kills=args.kills, seed=args.seed, workdir=args.workdir, progress=True, serving_log=log)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:  # a file for machines (Ray's per-kill notices are kept off the terminal, see elastic_ep.quiet)
        target = Path(args.json)
        target.write_text(text + "\n")
        if log.calls_seen:  # the serving stream's timeline beside the JSON: the whole run, then each recovery
            png = write_timeline(log, None, target.with_suffix(".png"), title=f"chaos seed {args.seed}: serving")
            more = write_recovery_timelines(log, None, target.with_name(target.stem + "-recoveries"))
            print(f"timeline: {png} (+ {len(more)} per recovery in {target.with_name(target.stem + '-recoveries')})",
                  file=sys.stderr)
    return 0 if result["ok"] else 1


# -- commands against a running cluster ---------------------------------------------------------


def _print_result(args, result: dict, text: str) -> None:
    print(json.dumps(result, indent=1, default=str) if args.json else text)


def format_status(st: dict, prefix: str) -> str:
    """A readable summary of ``status()``: membership, health, the last reconfigurations."""
    dead = set(st["dead"])
    ranks = ", ".join(f"{r}:{w}{' (dead)' if w in dead else ''}" for r, w in st["ranks"].items())
    spares = ", ".join(f"{w}{' (dead)' if w in dead else ''}" for w in st["spares"]) or "none"
    lines = [
        f"cluster {prefix}: epoch {st['epoch']}, {len(st['ranks'])} ranks, {len(st['spares'])} spares"
        + (", reconfiguring" if st["busy"] else ""),
        f"  ranks: {ranks}",
        f"  spares: {spares}",
        f"  health: {'all experts served' if not st['unserved'] else str(len(st['unserved'])) + ' experts unserved'}"
        + (f", lost {len(st['lost'])}" if st["lost"] else "") + f", controller restarts {st['restarts']}",
    ]
    if st.get("last_error"):
        lines.append(f"  last error: {st['last_error']}")
    for h in st.get("history", [])[-5:]:
        lines.append(f"  {h['reason']}: epoch {h['epoch_from']} -> {h.get('epoch_to')} in {h.get('total_s', 0):.2f}s"
                     + (" (nothing moved)" if h.get("noop") else ""))
    return "\n".join(lines)


def cmd_cluster(args) -> int:
    """Attach to a running cluster, run one command, print the outcome, let go (or stop it: ``stop``)."""
    from .cluster import ElasticEPCluster
    from .report import format_report

    with ElasticEPCluster.attach(args.address, args.name) as cluster:
        if args.cmd == "status":
            st = cluster.status()
            _print_result(args, {"cluster": cluster.prefix, **st}, format_status(st, cluster.prefix))
            return 0
        if args.cmd == "verify":
            ver = cluster.verify(against_checkpoint=args.checkpoint)
            _print_result(args, ver.to_dict(), f"{ver.slots_checked} slots checked at epoch {ver.epoch}, "
                                               f"{ver.num_bad} bad, unreachable ranks {list(ver.ranks_unreachable)} "
                                               f"-> {'OK' if ver.ok else 'FAILED'}")
            return 0 if ver.ok else 1
        if args.cmd == "stop":
            cluster.shutdown()
            _print_result(args, {"stopped": cluster.prefix}, f"stopped cluster {cluster.prefix}")
            return 0
        if args.cmd == "rebalance":
            rep = cluster.rebalance()
        elif args.cmd == "grow":
            rep = cluster.grow(args.num_ranks)
        elif args.cmd == "shrink":
            rep = cluster.shrink(args.ranks)
        else:  # drain
            rep = cluster.drain(args.rank)
        text = format_report(rep)
        if args.cmd == "drain":
            when = rep.safe_to_terminate_at
            released = ", ".join(rep.released) or "none"
            text += (f"\n  rank {args.rank} holds no slot any more (released worker: {released}): "
                     + (f"safe to terminate its process or node since "
                        f"{time.strftime('%H:%M:%S', time.localtime(when))}" if when is not None
                        else "NOT yet safe to terminate"))
        _print_result(args, rep.to_dict(), text)
        return 0


def cmd_start(args) -> int:
    """Start a cluster whose controller outlives this command, on a running Ray."""
    from .cluster import ElasticEPCluster

    spec = _spec_from_args(args)
    cfg = ClusterConfig(
        model=spec, checkpoint=args.checkpoint, preset=args.preset, num_ranks=args.ranks, slots_per_rank=args.slots,
        num_spares=args.spares, device=args.device, address=args.address, state_dir=args.state_dir, name=args.name,
    )
    cluster = ElasticEPCluster(cfg)
    try:
        info = cluster.start(detached=True)
    finally:
        cluster.detach()  # the cluster keeps running; this process lets go of Ray
    result = {"cluster": cluster.prefix, "name": args.name, "state_dir": cluster.state_dir, **info.to_dict()}
    _print_result(args, result, f"started cluster {cluster.prefix}: {args.ranks} ranks x {args.slots} slots + "
                                f"{args.spares} spares in {info.start_s:.1f}s (state in {cluster.state_dir}); "
                                f"it keeps running after this command: `elastic-ep stop --name {args.name}` ends it")
    return 0


def _add_attach_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", default="auto",
                   help="Ray (GCS) address host:port of the cluster, or 'auto' for this machine's Ray (default)")
    p.add_argument("--name", default="elastic-ep", help="cluster name it was started with, or its full prefix")
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="elastic-ep", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)

    demo = sub.add_parser("demo", help="run the local end-to-end demo (embedded Ray, CPU)")
    _add_spec_args(demo, num_layers=12)
    demo.add_argument("--ranks", type=int, default=4)
    demo.add_argument("--slots", type=int, default=20)
    demo.add_argument("--spares", type=int, default=1)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--batches", type=int, default=8, help="batches served before the rebalance")
    demo.add_argument("--tokens", type=int, default=256, help="tokens per batch (each through every MoE layer)")
    demo.add_argument("--stream-tokens", type=int, default=64, help="tokens per call of the background stream")
    demo.add_argument("--steady-s", type=float, default=1.5, help="seconds of steady serving around each event")
    demo.add_argument("--workdir", default=None, help="where to write the checkpoint and state (default: a temp dir)")
    demo.set_defaults(func=cmd_demo)

    mk = sub.add_parser("make-checkpoint", help="write a synthetic HF-style safetensors checkpoint")
    mk.add_argument("path")
    _add_spec_args(mk, first_layer=None)
    mk.add_argument("--family", default=None, choices=sorted(_FAMILY_PRESET),
                    help="config.json family (model_type and its keys); default from --preset, else deepseek_v3")
    mk.add_argument("--preset", default=None, choices=sorted(_FAMILY_PRESET.values()),
                    help="tensor naming; default: the family's")
    mk.add_argument("--quant", default="none", choices=["none", "fp8", "mxfp4", "int4"], help="expert format")
    mk.add_argument("--block", type=int, nargs=2, default=None, metavar=("ROWS", "COLS"),
                    help="FP8 scale block; default: the largest power of two <= 128 dividing both sizes")
    mk.add_argument("--shards", type=int, default=None, help="default: min(4, layers)")
    mk.set_defaults(func=cmd_make_checkpoint)

    ch = sub.add_parser("chaos", help="seeded random kills at every phase; prints a survival summary")
    ch.add_argument("--kills", type=int, default=30)
    ch.add_argument("--seed", type=int, default=0)
    ch.add_argument("--workdir", default=None)
    ch.add_argument("--json", default=None, help="also write the summary to this file")
    ch.set_defaults(func=cmd_chaos)

    st = sub.add_parser("start", help="start a cluster on a running Ray; it outlives this command")
    _add_attach_args(st)
    _add_spec_args(st)
    st.add_argument("--checkpoint", required=True, help="folder of a HF-style safetensors checkpoint")
    st.add_argument("--preset", default="deepseek", choices=["deepseek", "qwen", "mixtral"])
    st.add_argument("--ranks", type=int, default=4)
    st.add_argument("--slots", type=int, default=20, help="slots per rank")
    st.add_argument("--spares", type=int, default=1)
    st.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    st.add_argument("--state-dir", default=None, help="where the controller keeps its state (default: a temp dir)")
    st.set_defaults(func=cmd_start)
    for name, help_text in (("status", "membership, health and the last reconfigurations of a running cluster"),
                            ("rebalance", "re-place experts by the recorded load"),
                            ("verify", "check every slot against its expert's fingerprint (exit 1 if any differs)"),
                            ("grow", "add ranks"), ("shrink", "remove ranks (their experts move to the others)"),
                            ("drain", "move a live rank's experts away, commit, release it; says when it is safe "
                                      "to terminate"),
                            ("stop", "stop a running cluster (every worker and its controller)")):
        c = sub.add_parser(name, help=help_text)
        _add_attach_args(c)
        if name == "verify":
            c.add_argument("--checkpoint", action="store_true", help="against a fresh read of the checkpoint")
        elif name == "grow":
            c.add_argument("num_ranks", type=int, nargs="?", default=1, help="ranks to add (default 1)")
        elif name == "shrink":
            c.add_argument("ranks", type=int, nargs="+", help="rank ids to remove")
        elif name == "drain":
            c.add_argument("rank", type=int, help="rank id to drain")
        c.set_defaults(func=cmd_cluster)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.cmd == "demo":  # the demo kills a worker on purpose
            from .quiet import quiet_worker_deaths

            with quiet_worker_deaths("the demo's kill"):
                return args.func(args)
        return args.func(args)
    except (ElasticEPError, ConnectionError) as exc:  # ConnectionError: ray.init found no cluster
        print(f"elastic-ep: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
