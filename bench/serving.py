"""Serving benchmark: per-layer latency and tokens/s of one MoE layer call through the cluster, per data path.

DeepSeek-V2-Lite expert geometry by default (hidden 2048, intermediate 1408, 64 experts,
top-6), one MoE layer, batches of 64, 256, 512 (decode) and 8192 (prefill) tokens. Arms,
all computing the same layer from the same synthetic checkpoint:

* local: the expert GEMMs of the whole layer in this one process (every expert stacked
  on one device, ``elastic_ep.serving.compute.combine_rank``): the floor for the others.
* ray: ``cluster.client().moe(...)`` on a running ElasticEPCluster (the product path):
  one Ray call per rank per layer call, tokens as CPU numpy arrays through the object store.
* gloo: the client as rank 0 of a torch.distributed Gloo group with the expert ranks:
  per call the client sends each rank a header, its tokens, rows, slots and weights
  through host memory (TCP), and receives its fp32 partial sums; the ranks compute on
  ``--device`` (copying in and out of the GPU on CUDA). Not wired into the cluster.
* nccl: the same protocol over an NCCL group, tensors staying in GPU memory. The client
  needs a GPU of its own beside one per rank (NCCL refuses two ranks on one GPU): skipped
  when there are fewer than ranks + 1 GPUs.

On fewer GPUs than ranks, ranks share GPUs (fractional Ray GPU requests).

Ray's GPU tensor transport (``tensor_transport=...``) is not an arm: it needs the client
to be an actor, and it kills both actors of a failed transfer (shared/RAY_NOTES.md).

Run from the repository root::

    python -m bench.serving --device cpu --hidden 256 --intermediate 176   # small, on a CPU
    python -m bench.serving --device cuda                                    # full size, GPUs
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from elastic_ep.cluster import worker_runtime_env  # noqa: E402
from elastic_ep.config import ClusterConfig, ModelSpec  # noqa: E402
from elastic_ep.serving.compute import combine_rank  # noqa: E402
from elastic_ep.serving.weights import layer_weights  # noqa: E402
from elastic_ep.serving.dispatch import plan_dispatch  # noqa: E402
from elastic_ep.storage import CheckpointReader, write_synthetic_checkpoint  # noqa: E402
from elastic_ep.workload import SkewedRouter  # noqa: E402


def _batches(spec: ModelSpec, top_k: int, tokens: int, count: int, seed: int):
    router = SkewedRouter(1, spec.num_experts, zipf_s=1.0, top_k=top_k, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        router.step()
        ids, weights = router.decide(tokens)
        hidden = (torch.randn(tokens, spec.hidden, generator=gen) * 0.05).to(torch.bfloat16)
        out.append((hidden, ids[0], weights[0]))
    return out


def _time(fn, batches, sync=None) -> list[float]:
    fn(*batches[0])  # warm-up
    times = []
    for b in batches:
        t0 = time.perf_counter()
        fn(*b)
        if sync is not None:
            sync()
        times.append(time.perf_counter() - t0)
    return times


class _CollectiveRank:
    """One expert rank in a torch.distributed group with the client as rank 0 (the collective arm)."""

    def __init__(self, rank: int, world: int, host: str, port: int, backend: str, compute: str, checkpoint: str,
                 spec: ModelSpec, experts: list[int]):
        import torch.distributed as dist

        self.device = torch.device("cuda", 0) if backend == "nccl" else torch.device("cpu")  # where tensors travel
        self.compute = torch.device("cuda", 0) if compute == "cuda" else torch.device("cpu")
        store = dist.TCPStore(host, port, world, is_master=False)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world)
        reader = CheckpointReader(checkpoint, spec)
        rows = reader.read_layer_slots(0, experts, device=str(self.compute))
        self.weights = layer_weights(rows, reader.format, spec.dtype)
        self.spec = spec

    def gpu(self) -> list:
        import ray

        return [str(g) for g in ray.get_gpu_ids()]

    def serve(self) -> int:
        """Answer calls until a header of -1 arrives; returns calls served."""
        import torch.distributed as dist

        calls = 0
        header = torch.zeros(2, dtype=torch.int64, device=self.device)
        while True:
            dist.recv(header, src=0)
            n, m = (int(x) for x in header.tolist())
            if n < 0:
                return calls
            hidden = torch.empty(n, self.spec.hidden, dtype=torch.bfloat16, device=self.device)
            index = torch.empty(2, m, dtype=torch.int64, device=self.device)
            weights = torch.empty(m, dtype=torch.float32, device=self.device)
            for t in (hidden, index, weights):
                dist.recv(t, src=0)
            hidden, index, weights = (t.to(self.compute) for t in (hidden, index, weights))
            out = combine_rank(self.weights, hidden, index[0], index[1], weights)
            dist.send(out.to(self.device), dst=0)
            calls += 1


def _gpu_share(args) -> float:
    """GPUs each rank asks Ray for: one each, or an equal share when there are fewer GPUs than ranks."""
    if args.device != "cuda":
        return 0
    gpus = torch.cuda.device_count()
    return 1 if gpus >= args.ranks else gpus / args.ranks


def _collective_arm(args, spec, ckpt, ranks_experts, batches_by_size, device: torch.device, backend: str):
    """Start ranks, time every size, stop them. Returns {tokens: [seconds per call]}."""
    import ray
    import torch.distributed as dist

    world = len(ranks_experts) + 1
    store = dist.TCPStore("127.0.0.1", 0, world, is_master=True, wait_for_workers=False)
    cls = ray.remote(num_gpus=_gpu_share(args), num_cpus=0)(_CollectiveRank)
    actors = [cls.remote(r + 1, world, "127.0.0.1", store.port, backend, args.device, ckpt, spec, ex)
              for r, ex in enumerate(ranks_experts)]
    dist.init_process_group(backend, store=store, rank=0, world_size=world)
    loops = [a.serve.remote() for a in actors]
    spr = len(ranks_experts[0])
    row = np.array([e for ex in ranks_experts for e in ex])

    def call(hidden, ids, weights):
        plan = plan_dispatch(0, row, spr, tuple(range(1, world)), (), ids)
        x = hidden.to(device)
        flat_w = torch.from_numpy(weights.ravel()).to(device)
        works = []
        for part in plan.parts:
            tokens = torch.from_numpy(part.tokens).to(device)
            header = torch.tensor([len(part.tokens), len(part.rows)], dtype=torch.int64, device=device)
            index = torch.from_numpy(np.stack([part.rows, part.slots])).to(device)
            for t in (header, x[tokens].contiguous(), index, flat_w[torch.from_numpy(part.pairs).to(device)]):
                works.append(dist.isend(t, dst=part.rank))
        out = torch.zeros(hidden.shape, dtype=torch.float32, device=device)
        partials = []
        for part in plan.parts:
            buf = torch.empty(len(part.tokens), spec.hidden, dtype=torch.float32, device=device)
            partials.append((part, buf, dist.irecv(buf, src=part.rank)))
        for w in works:
            w.wait()
        for part, buf, work in partials:
            work.wait()
            out.index_add_(0, torch.from_numpy(part.tokens).to(device), buf)
        return out.to(torch.bfloat16)

    sync = torch.cuda.synchronize if device.type == "cuda" else None
    try:
        return {n: _time(call, b, sync) for n, b in batches_by_size.items()}
    finally:
        for r in range(1, world):
            dist.send(torch.tensor([-1, -1], dtype=torch.int64, device=device), dst=r)
        ray.get(loops, timeout=60)
        dist.destroy_process_group()
        for a in actors:
            ray.kill(a)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--intermediate", type=int, default=1408)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--top-k", type=int, default=6)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--tokens", default="64,256,512,8192")
    p.add_argument("--calls", type=int, default=5, help="timed calls per size (after one warm-up)")
    p.add_argument("--arms", default="local,ray,gloo,nccl")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    import ray

    spec = ModelSpec(num_layers=1, num_experts=args.experts, hidden=args.hidden, intermediate=args.intermediate)
    sizes = [int(s) for s in args.tokens.split(",")]
    arms = args.arms.split(",")
    device = torch.device("cuda", 0) if args.device == "cuda" else torch.device("cpu")
    work = Path(tempfile.mkdtemp(prefix="eep-bench-serving-"))
    ckpt = str(write_synthetic_checkpoint(work / "ckpt", spec, num_shards=1, device=args.device))
    batches = {n: _batches(spec, args.top_k, n, args.calls, seed=n) for n in sizes}
    results: dict[str, dict[int, list[float]]] = {}

    if "local" in arms:
        reader = CheckpointReader(ckpt, spec)
        rows = reader.read_layer_slots(0, list(range(spec.num_experts)), device=str(device))
        weights = layer_weights(rows, reader.format, spec.dtype)

        def local(hidden, ids, w):
            x = hidden.to(device)
            rows = torch.arange(len(ids), device=device).repeat_interleave(ids.shape[1])
            return combine_rank(weights, x, rows, torch.from_numpy(ids.ravel()).to(device),
                                torch.from_numpy(w.ravel()).to(device)).to(torch.bfloat16).cpu()

        results["local"] = {n: _time(local, b) for n, b in batches.items()}
        del weights, rows

    from elastic_ep.cluster import ElasticEPCluster

    spr = -(-spec.num_experts // args.ranks)
    ray.init(num_cpus=max(2, os.cpu_count() or 2), include_dashboard=False, log_to_driver=False,
             runtime_env=worker_runtime_env())
    try:
        if "ray" in arms:
            share = _gpu_share(args)
            cfg = ClusterConfig(model=spec, checkpoint=ckpt, num_ranks=args.ranks, slots_per_rank=spr, num_spares=0,
                                device=args.device, keep_backups=False, state_dir=str(work / "state"),
                                gpu_fractions=(share,) * args.ranks if 0 < share < 1 else None)
            with ElasticEPCluster(cfg) as cluster:
                client = cluster.client(view_max_age_s=60.0)
                results["ray"] = {n: _time(lambda h, i, w: client.moe(0, h, i, w), b) for n, b in batches.items()}
        experts = [[(r * spr + s) % spec.num_experts for s in range(spr)] for r in range(args.ranks)]
        for backend in ("gloo", "nccl"):
            if backend not in arms:
                continue
            if backend == "nccl" and (args.device != "cuda" or torch.cuda.device_count() < args.ranks + 1):
                print(f"nccl arm skipped: NCCL needs a GPU for the client beside {args.ranks} ranks")
                continue
            client_dev = torch.device("cuda", args.ranks) if backend == "nccl" else torch.device("cpu")
            results[backend] = _collective_arm(args, spec, ckpt, experts, batches, client_dev, backend)
    finally:
        ray.shutdown()

    name = torch.cuda.get_device_name(0) if args.device == "cuda" else "CPU"
    print(f"\nOne MoE layer call, {spec.num_experts} experts x (hidden {spec.hidden}, intermediate "
          f"{spec.intermediate}), top-{args.top_k}, bf16, {args.ranks} ranks, {name}; median of {args.calls} calls\n")
    print("| tokens | arm | ms per layer call (median) | p90 ms | tokens/s | x local |")
    print("|---|---|---|---|---|---|")
    table = []
    for n in sizes:
        base = float(np.median(results["local"][n])) if "local" in results else None
        for arm, by_size in results.items():
            t = np.array(by_size[n])
            med = float(np.median(t))
            row = dict(tokens=n, arm=arm, ms=1e3 * med, p90_ms=1e3 * float(np.percentile(t, 90)), tokens_s=n / med,
                       vs_local=med / base if base else None)
            table.append(row)
            ratio = f"{row['vs_local']:.2f}" if base else ""
            print(f"| {n} | {arm} | {row['ms']:.2f} | {row['p90_ms']:.2f} | {row['tokens_s']:.0f} | {ratio} |")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(args=vars(args), device=name, rows=table), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
