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
    from .cluster import ElasticEPCluster
    from .report import critical_path_s, format_report
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

        t0 = _step("3. route a skewed, drifting workload (Zipf popularity per layer)")
        cluster.run_workload(batches=16, tokens_per_batch=8192, seed=args.seed)
        print(f"   16 batches routed ({time.perf_counter() - t0:.2f}s)")

        t0 = _step("4. rebalance by the recorded load (sticky EPLB)")
        rep = cluster.rebalance()
        print(format_report(rep))
        summary["rebalance_s"] = rep["total_s"]

        t0 = _step("5. kill rank 2's worker; the controller notices and a hot spare takes over")
        wid = cluster.kill(2)
        print(f"   killed {wid}")
        status = cluster.wait_healthy(timeout_s=90)
        rec = next(h for h in reversed(status["history"]) if h["reason"] == "recover")
        print(format_report(rec))
        summary["recover_s"] = critical_path_s(rec["phases"])

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
    print(f"\ndemo done in {time.perf_counter() - t_all:.1f}s: rebalance {summary['rebalance_s']:.2f}s, "
          f"kill-to-restored {summary['recover_s']:.2f}s, all slots verified")
    return 0


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
