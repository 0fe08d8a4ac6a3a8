"""FP8 recovery benchmark: rebalance and kill-recovery with DeepSeek-V3-sized FP8 block-scaled experts.

Each expert is DeepSeek-V3's (hidden 7168, intermediate 2048): FP8 e4m3 w13/w2 with
float32 ``weight_scale_inv`` per 128x128 block, ~44 MB per expert, moved as one bundle.
One GPU: a rank and its hot spare share it (``gpu_fractions=(0.5, 0.5)``; NCCL allows no two
ranks on one GPU, and a rank holds each expert at most once, so the rank holds every expert
once and a rebalance has nothing to move: it is reported, and the recovery is the measure).
Prints a table (bytes moved and rate against the host-to-device ceiling) and writes JSON.

    python -m bench.fp8_recovery --json $OUT/fp8_recovery.json               # on a GPU host
    python -m bench.fp8_recovery --device cpu --layers 1 --experts 8 --hidden 256 --intermediate 256
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import ray  # noqa: E402
import torch  # noqa: E402

from elastic_ep.checkpoint import read_spec, write_checkpoint  # noqa: E402
from elastic_ep.cluster import ElasticEPCluster  # noqa: E402
from elastic_ep.cluster import worker_runtime_env  # noqa: E402
from elastic_ep.config import ClusterConfig, ModelSpec  # noqa: E402

GB = 1e9


def ceiling_GBps(nbytes: int, device: str, reps: int = 3) -> float:
    """Host-to-device copy rate of ``nbytes`` (page-locked on a GPU), best of ``reps``: what a backup read can reach."""
    host = torch.empty(nbytes, dtype=torch.uint8)
    if device == "cuda":
        host = host.pin_memory()
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    best = float("inf")
    for _ in range(reps):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        dst.copy_(host, non_blocking=True)
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    del host, dst
    return nbytes / best / GB


def checkpoint(args, spec: ModelSpec) -> Path:
    """The FP8 checkpoint in DeepSeek-V3's released layout, written once per geometry."""
    folder = Path(args.ckpt) / f"v3-fp8-L{spec.num_layers}-E{spec.num_experts}-H{spec.hidden}-I{spec.intermediate}"
    try:
        if read_spec(folder)[0] == spec:
            return folder
    except Exception:  # noqa: BLE001 - absent or stale: write it
        pass
    write_checkpoint(folder, spec, "deepseek", num_shards=min(4, spec.num_layers), progress=True, family="deepseek_v3",
                     device=args.device)
    return folder


def worker_pid(cluster: ElasticEPCluster, worker_id: str) -> int:
    handle = ray.get_actor(f"{cluster.prefix}-{worker_id}", namespace=ray.get_runtime_context().namespace)
    return ray.get(handle.ping.remote(), timeout=60).pid


def run(args) -> dict:
    spec = ModelSpec(num_layers=args.layers, num_experts=args.experts, hidden=args.hidden,
                     intermediate=args.intermediate, first_layer=3, quant="fp8", block=(args.block, args.block))
    fmt = spec.expert_format
    folder = checkpoint(args, spec)
    slots = args.experts  # one rank: each expert once (a rank never holds an expert twice)
    rank_bytes = spec.num_layers * slots * spec.expert_bytes
    result = {"device": args.device, "card": torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu",
              "layers": spec.num_layers, "experts": spec.num_experts, "slots_per_rank": slots,
              "expert_MB": spec.expert_bytes / 1e6, "expert_tensors": {t.name: [t.dtype, list(t.shape)] for t in fmt.tensors},
              "rank_GB": rank_bytes / GB, "ceiling_h2d_GBps": ceiling_GBps(min(rank_bytes, 1 << 30), args.device)}
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, namespace="eep-fp8-bench",
             runtime_env=worker_runtime_env())
    try:
        cfg = ClusterConfig(checkpoint=str(folder), num_ranks=1, slots_per_rank=slots, num_spares=1,
                            device=args.device, gpu_fractions=(0.5, 0.5) if args.device == "cuda" else None,
                            state_dir=tempfile.mkdtemp(prefix="eep-fp8-state-"), name="fp8-bench",
                            startup_timeout_s=600.0, call_timeout_s=600.0, transfer_timeout_s=300.0)
        assert cfg.model == spec, (cfg.model, spec)  # the geometry and the FP8 format come from the folder
        t0 = time.perf_counter()
        with ElasticEPCluster(cfg) as cluster:
            result["start_s"] = time.perf_counter() - t0
            result["start"] = cluster.last_start.to_dict()
            cluster.run_workload(batches=8, seed=1, zipf_s=1.5)
            result["rebalance"] = cluster.rebalance().to_dict()
            st = cluster.status()
            spare = st["spares"][0]
            deadline = time.monotonic() + 300
            while cluster.status()["spares_prepared"].get(spare) in (None, "preparing") and time.monotonic() < deadline:
                time.sleep(0.5)
            victim = next(iter(st["ranks"].values()))
            t_kill = time.perf_counter()
            os.kill(worker_pid(cluster, victim), signal.SIGKILL)
            while victim in cluster.status()["ranks"].values() and victim not in cluster.status()["dead"]:
                if time.perf_counter() - t_kill > 120:
                    raise TimeoutError(f"the controller did not notice {victim}'s death")
                time.sleep(0.05)
            st = cluster.wait_healthy(timeout_s=600)
            result["kill_to_healthy_s"] = time.perf_counter() - t_kill
            result["recover"] = next(h for h in reversed(st["history"]) if h["reason"] == "recover")
            result["verify"] = cluster.verify(against_checkpoint=args.verify_checkpoint).to_dict()
    finally:
        ray.shutdown()
    return result


def _moved(rec: dict) -> int:
    return int(rec.get("bytes_p2p", 0) + rec.get("bytes_from_backup", 0) + rec.get("bytes_from_checkpoint", 0))


def print_table(r: dict) -> None:
    rec, reb = r["recover"], r["rebalance"]
    print()
    print(f"elastic-ep FP8 recovery: {r['card']}, {r['layers']} MoE layers x {r['slots_per_rank']} slots, "
          f"{r['expert_MB']:.2f} MB per expert bundle ({', '.join(r['expert_tensors'])}); rank {r['rank_GB']:.2f} GB")
    print(f"{'step':40s} {'seconds':>9s} {'GB moved':>9s} {'GB/s':>7s} {'of ceiling':>10s}")
    ceiling = r["ceiling_h2d_GBps"]
    print(f"{'ceiling: host-to-device copy':40s} {'':>9s} {'':>9s} {ceiling:7.2f} {'100%':>10s}")
    rows = [("rebalance (load-driven)" + (", nothing to move" if reb.get("noop") else ""), reb.get("total_s"),
             _moved(reb) + reb.get("plan", {}).get("copies", 0) * r["expert_MB"] * 1e6),
            ("kill -> healthy (SIGKILL, hot spare)", r["kill_to_healthy_s"], _moved(rec))]
    transfer = rec.get("phases", {}).get("transfer")
    if transfer:
        rows.append(("  recovery transfer phase", transfer, _moved(rec)))
    for name, seconds, nbytes in rows:
        rate = nbytes / seconds / GB if seconds else float("nan")
        print(f"{name:40s} {seconds or float('nan'):9.3f} {nbytes / GB:9.3f} {rate:7.2f} {rate / ceiling:10.0%}")
    print(f"recovery bytes: p2p {rec.get('bytes_p2p', 0) / GB:.3f} GB, host backups "
          f"{rec.get('bytes_from_backup', 0) / GB:.3f} GB, checkpoint {rec.get('bytes_from_checkpoint', 0) / GB:.3f} GB; "
          f"verified (weights and scales): {r['verify'].get('ok')} over {r['verify'].get('slots_checked')} slots")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--layers", type=int, default=4, help="MoE layers")
    p.add_argument("--experts", type=int, default=64, help="routed experts per layer")
    p.add_argument("--hidden", type=int, default=7168)
    p.add_argument("--intermediate", type=int, default=2048)
    p.add_argument("--block", type=int, default=128, help="FP8 scale block (square)")
    p.add_argument("--ckpt", default=os.path.join(tempfile.gettempdir(), "eep-fp8-ckpt"))
    p.add_argument("--verify-checkpoint", action="store_true", help="verify against a re-read of the file (slow)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.block > min(args.hidden, args.intermediate):
        args.block = min(args.hidden, args.intermediate)
    result = run(args)
    print_table(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, default=str))
    return 0 if result["verify"].get("ok") else 1


if __name__ == "__main__":
    sys.exit(main())
