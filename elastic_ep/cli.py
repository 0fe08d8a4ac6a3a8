"""The ``elastic-ep`` command: demo, make-checkpoint, chaos."""

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
    p.add_argument("--first-layer", type=int, default=d["first_layer"], help="checkpoint index of the first MoE layer")


def cmd_make_checkpoint(args) -> int:
    from .storage import write_synthetic_checkpoint

    spec = _spec_from_args(args)
    t0 = time.perf_counter()
    path = write_synthetic_checkpoint(args.path, spec, preset=args.preset, num_shards=args.shards, progress=True)
    size = sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))
    print(f"wrote {path}: {spec.num_layers} layers x {spec.num_experts} experts, {args.shards} shards, "
          f"{size / 2**20:.1f} MiB in {time.perf_counter() - t0:.2f}s (preset {args.preset})")
    return 0


def _step(title: str) -> float:
    print(f"\n== {title}", flush=True)
    return time.perf_counter()


def cmd_demo(args) -> int:
    import os
    import signal

    import numpy as np
    import ray

    from .cluster import ElasticEPCluster
    from .serving.loop import serve_loop
    from .serving.oracle import CheckpointOracle
    from .workload import SkewedRouter
    from .report import format_report
    from .storage import write_synthetic_checkpoint

    t_all = time.perf_counter()
    spec = _spec_from_args(args)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="eep-demo-"))
    t0 = _step(f"1. synthetic checkpoint (DeepSeek-V2-Lite expert layout, scaled down) in {work}")
    ckpt = write_synthetic_checkpoint(work / "checkpoint", spec, preset="deepseek", num_shards=4, progress=True)
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
        print(f"   started in {time.perf_counter() - t0:.1f}s: weights loaded {info['load_s']:.2f}s "
              f"({info['checkpoint_bytes'] / 2**20:.1f} MiB read), host backups {info['backup_s']:.2f}s, "
              f"communicators {1e3 * info['group_s']:.0f}ms")

        t0 = _step("3. serve: a skewed, drifting router's tokens through every MoE layer on the workers")
        client, oracle = cluster.client(), CheckpointOracle(str(ckpt), spec, "deepseek")
        router = SkewedRouter(spec.num_layers, spec.num_experts, zipf_s=1.2, seed=args.seed)
        served = serve_loop(client, router, args.batches, args.tokens, oracle, seed=args.seed)
        _print_served(served, time.perf_counter() - t0)
        load = cluster.served_load()  # what the workers counted, per logical expert
        top = np.argsort(-load[0])[:4]
        print(f"   workers counted {int(load.sum())} (token, expert) pairs (client sent {served.pairs}); layer 0's "
              f"hottest experts {top.tolist()} served {load[0, top].astype(int).tolist()}")

        t0 = _step("4. rebalance by the load the workers counted (sticky EPLB)")
        rep = cluster.rebalance()
        print(format_report(rep))
        summary["rebalance_s"] = rep["total_s"]
        served.add(serve_loop(client, router, args.batches // 2, args.tokens, oracle, seed=args.seed + 1))

        t0 = _step("5. SIGKILL rank 2's worker while serving; a hot spare takes over, calls re-plan on the new epoch")
        pid = ray.get(cluster.worker(2).ping.remote(), timeout=30)["pid"]
        os.kill(pid, signal.SIGKILL)
        print(f"   killed pid {pid}")
        served.add(serve_loop(client, router, args.batches // 2, args.tokens, oracle, seed=args.seed + 2))
        status = cluster.wait_healthy(timeout_s=90)
        rec = next(h for h in reversed(status["history"]) if h["reason"] == "recover")
        print(format_report(rec))
        summary["recover_s"] = sum(rec["phases"].get(k, 0.0) for k in
                                   ("detect", "decide", "plan", "communicators", "transfer", "verify", "commit"))
        summary["served"] = served
        _print_served(served, None)

        t0 = _step("6. verify every slot against the checkpoint")
        ver = cluster.verify(against_checkpoint=True)
        print(f"   {ver['slots_checked']} slots checked, {ver['num_bad']} bad -> {'OK' if ver['ok'] else 'FAILED'} "
              f"({time.perf_counter() - t0:.2f}s)")
        summary["verified"] = ver["ok"]
        if not ver["ok"]:
            print(json.dumps(ver["bad"], indent=1))
            return 1
    finally:
        cluster.shutdown()
    served = summary["served"]
    print(f"\ndemo done in {time.perf_counter() - t_all:.1f}s: rebalance {summary['rebalance_s']:.2f}s, "
          f"kill-to-restored {summary['recover_s']:.2f}s, all slots verified; {served.tokens} tokens served, "
          f"{served.wrong} wrong outputs of {served.checked} checked")
    return 0 if served.wrong == 0 else 1


def _print_served(served, seconds) -> None:
    took = "" if seconds is None else f" in {seconds:.1f}s"
    print(f"   {served.calls} layer calls, {served.tokens} tokens served{took}; per-call latency "
          f"p50 {served.percentile_ms(50):.1f} ms, p99 {served.percentile_ms(99):.1f} ms; "
          f"wrong outputs {served.wrong} of {served.checked} checked against the checkpoint oracle")


def cmd_chaos(args) -> int:
    from .chaos import run_chaos

    result = run_chaos(kills=args.kills, seed=args.seed, workdir=args.workdir, progress=True)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:  # Ray prints a line per killed worker: a file keeps the summary clean
        Path(args.json).write_text(text + "\n")
    return 0 if result["ok"] else 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="elastic-ep", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)

    demo = sub.add_parser("demo", help="run the local end-to-end demo (embedded Ray, CPU)")
    _add_spec_args(demo, num_layers=12)
    demo.add_argument("--ranks", type=int, default=4)
    demo.add_argument("--slots", type=int, default=20)
    demo.add_argument("--spares", type=int, default=1)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--batches", type=int, default=8, help="batches served before the rebalance")
    demo.add_argument("--tokens", type=int, default=256, help="tokens per batch (each through every MoE layer)")
    demo.add_argument("--workdir", default=None, help="where to write the checkpoint and state (default: a temp dir)")
    demo.set_defaults(func=cmd_demo)

    mk = sub.add_parser("make-checkpoint", help="write a synthetic HF-style safetensors checkpoint")
    mk.add_argument("path")
    _add_spec_args(mk)
    mk.add_argument("--preset", default="deepseek", choices=["deepseek", "qwen", "mixtral"])
    mk.add_argument("--shards", type=int, default=4)
    mk.set_defaults(func=cmd_make_checkpoint)

    ch = sub.add_parser("chaos", help="seeded random kills at every phase; prints a survival summary")
    ch.add_argument("--kills", type=int, default=30)
    ch.add_argument("--seed", type=int, default=0)
    ch.add_argument("--workdir", default=None)
    ch.add_argument("--json", default=None, help="also write the summary to this file")
    ch.set_defaults(func=cmd_chaos)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ElasticEPError as exc:
        print(f"elastic-ep: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
