"""GPU recovery benchmark: NCCL ceiling, disk reload, a seed-style baseline and elastic-ep, side by side.

Run on a GPU host (see README "GPU benchmark"):

    python -m bench.gpu_recovery --layers 26 --json $OUT/gpu_recovery.json

Geometry defaults to DeepSeek-V2-Lite's experts: 64 routed experts + 16 redundant
slots, hidden 2048, expert intermediate 1408, bf16 (17.3 MB per expert). With two
GPUs it runs 2 active ranks and a hot spare sharing the GPU of the rank that is
killed; with more GPUs, N-1 active ranks and a spare on its own GPU.

Arms, all on the same machine in one run:
1. ceiling: NCCL point-to-point between two GPUs (one direction and both at once);
2. disk reload ("before"): a fresh process reads the dead rank's experts from the
   safetensors checkpoint into GPU memory, with the page cache dropped and warm;
3. seed-style ("after"): a new torch.distributed NCCL group, per-layer
   ``batch_isend_irecv`` from sources chosen like SGLang's updater (first holder in rank
   order, dead ranks not skipped), and disk reload of the experts it misses;
4. elastic-ep: a load-driven rebalance, then a kill-one-rank recovery with a hot spare
   (phases: detect, plan, communicators, transfer+storage, verify, commit).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import ray  # noqa: E402
import torch  # noqa: E402

from elastic_ep.config import ClusterConfig, ModelSpec  # noqa: E402
from elastic_ep.layout import ExpertLayout  # noqa: E402
from elastic_ep.checkpoint import CheckpointReader, write_synthetic_checkpoint  # noqa: E402

GB = 1e9
ENV_KEYS = ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST", "NVSHMEM_DISABLE_NVLS", "PYTHONPATH")


# ---------------------------------------------------------------------------------------
# Arm 1: the ceiling
# ---------------------------------------------------------------------------------------


@ray.remote(num_gpus=1, num_cpus=1)
class Probe:
    """Raw NCCL point-to-point through elastic-ep's own group (no packing, no staging)."""

    def __init__(self):
        from elastic_ep.transport import register_backends

        register_backends()
        torch.cuda.set_device(0)
        self.buf = None

    def join(self, name, world, rank, host, port):
        from elastic_ep.transport import form_group

        t0 = time.perf_counter()
        form_group(name, world, rank, host, port, 60.0, "cuda")
        return time.perf_counter() - t0

    def run(self, name, nbytes, peer, mode, reps, count=1):
        """Median seconds of one exchange moving ``nbytes`` per direction as ``count`` messages."""
        from elastic_ep.transport import P2POp, get_group

        g = get_group(name)
        send = torch.ones(nbytes // 2, dtype=torch.bfloat16, device="cuda")
        recv = torch.empty_like(send)
        times = []
        for i in range(reps + 1):
            ops = []
            if mode in ("send", "both"):
                ops += [P2POp("send", part, peer) for part in send.chunk(count)]
            if mode in ("recv", "both"):
                ops += [P2POp("recv", part, peer) for part in recv.chunk(count)]
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            g.exchange(ops, 60.0)
            torch.cuda.synchronize()
            if i:
                times.append(time.perf_counter() - t0)
        return float(np.median(times))


def measure_ceiling(nbytes: int) -> dict:
    from elastic_ep.transport import StoreServer, register_backends

    register_backends()
    store = StoreServer()
    a, b = Probe.remote(), Probe.remote()
    host, port = store.address
    join = ray.get([a.join.remote("ceiling", 2, 0, host, port), b.join.remote("ceiling", 2, 1, host, port)])
    reps = 5
    one = ray.get([a.run.remote("ceiling", nbytes, 1, "send", reps), b.run.remote("ceiling", nbytes, 0, "recv", reps)])
    both = ray.get([a.run.remote("ceiling", nbytes, 1, "both", reps), b.run.remote("ceiling", nbytes, 0, "both", reps)])
    # The same bytes cut into messages, as a plan's exchange posts them (all in one exchange).
    split = {}
    for count in (4, 16):
        t = ray.get([a.run.remote("ceiling", 4 * nbytes, 1, "both", 2, count),
                     b.run.remote("ceiling", 4 * nbytes, 0, "both", 2, count)])
        split[f"{count} x {4 * nbytes // count >> 20} MiB each way"] = 2 * 4 * nbytes / max(t) / GB
    for h in (a, b):
        ray.kill(h)
    return {
        "message_bytes": nbytes,
        "group_init_s": max(join),
        "one_way_GBps": nbytes / max(one) / GB,
        "bidirectional_GBps": 2 * nbytes / max(both) / GB,
        "split_bidirectional_GBps": split,
    }


# ---------------------------------------------------------------------------------------
# Arms 2 and 3: disk reload and the seed-style baseline
# ---------------------------------------------------------------------------------------


def drop_page_cache(folder: str) -> str:
    """Evict the checkpoint's pages (fadvise DONTNEED per file); returns how."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("1\n")
        return "drop_caches"
    except OSError:
        pass
    for p in Path(folder).glob("*.safetensors"):
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return "posix_fadvise(DONTNEED)"


@ray.remote(num_gpus=1, num_cpus=1)
class SeedRank:
    """A rank of the seed-style baseline: torch.distributed default group, per-layer batch_isend_irecv."""

    def __init__(self, spec, ckpt):
        torch.cuda.set_device(0)
        self.spec, self.ckpt = spec, ckpt
        self.rows = None  # [L, S, row_bytes]: each slot's whole bundle

    def load(self, experts):
        """Load a rank's slots from the checkpoint: experts [L, S]."""
        reader = CheckpointReader(self.ckpt, self.spec)
        self.rows = torch.stack([reader.read_layer_slots(layer, [int(e) for e in row], device="cuda")
                                 for layer, row in enumerate(experts)])
        torch.cuda.synchronize()
        return True

    def empty(self, num_slots):
        s = self.spec
        self.rows = torch.empty((s.num_layers, num_slots, s.expert_bytes), dtype=torch.uint8, device="cuda")
        torch.cuda.synchronize()
        return True

    def init_group(self, addr, rank, world):
        import torch.distributed as dist

        t0 = time.perf_counter()
        dist.init_process_group("nccl", init_method=addr, rank=rank, world_size=world,
                                device_id=torch.device("cuda", 0))
        dist.barrier()
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    def exchange(self, sends, recvs):
        """Per layer: one batch_isend_irecv of every expert tensor (each tensor of a bundle separately)."""
        import torch.distributed as dist

        from elastic_ep.checkpoint import tensor_view

        fmt = self.spec.expert_format

        t0 = time.perf_counter()
        for layer in range(self.spec.num_layers):
            ops = []
            for l, slot, peer in sends:
                if l == layer:
                    ops += [dist.P2POp(dist.isend, tensor_view(self.rows[l, slot], fmt, n), peer) for n in fmt.names]
            for l, slot, peer in recvs:
                if l == layer:
                    ops += [dist.P2POp(dist.irecv, tensor_view(self.rows[l, slot], fmt, n), peer) for n in fmt.names]
            if ops:
                for w in dist.batch_isend_irecv(ops):
                    w.wait()
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    def reload(self, items):
        """Disk reload of (layer, slot, expert) the P2P phase could not get."""
        t0 = time.perf_counter()
        reader = CheckpointReader(self.ckpt, self.spec)
        got = reader.read_experts(sorted({(l, e) for l, _, e in items}), device="cuda")
        for l, slot, e in items:
            self.rows[l, slot].copy_(got[(l, e)])
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    def read_only(self, experts):
        """The 'before': a replacement reads its whole slot set from the checkpoint."""
        t0 = time.perf_counter()
        self.load(experts)
        return time.perf_counter() - t0

    def shutdown(self):
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
        return True


def seed_style_plan(old: ExpertLayout, dead: int):
    """SGLang-style sources for the dead rank's slots: the first holder in rank order, dead included.

    Returns (p2p [(layer, dst_slot, src_rank, src_slot)], misses [(layer, dst_slot, expert)]).
    """
    spr = old.slots_per_rank
    view = old.rank_view()
    pos_dead = old.position(dead)
    p2p, misses = [], []
    for layer in range(old.num_layers):
        for slot in range(spr):
            e = int(view[layer, pos_dead, slot])
            holders = [(p, int(np.nonzero(view[layer, p] == e)[0][0])) for p in range(old.num_ranks)
                       if (view[layer, p] == e).any()]
            p, s = holders[0]
            if old.ranks[p] == dead:
                misses.append((layer, slot, e))  # the chosen source is the dead rank: nothing arrives
            else:
                p2p.append((layer, slot, old.ranks[p], s))
    return p2p, misses


def run_baselines(spec, ckpt, old: ExpertLayout, dead: int) -> dict:
    dead_experts = old.experts_of(dead)
    out = {}
    # Arm 2: disk reload, cold then warm page cache.
    r = SeedRank.remote(spec, ckpt)
    ray.get(r.empty.remote(1))
    out["cache_drop"] = drop_page_cache(ckpt)
    out["disk_cold_s"] = ray.get(r.read_only.remote(dead_experts))
    out["disk_warm_s"] = ray.get(r.read_only.remote(dead_experts))
    ray.kill(r)
    # Arm 3: seed-style on a survivor (rank position 0) and a replacement for the dead rank.
    survivors = [x for x in old.ranks if x != dead]
    src_rank = survivors[0]
    p2p, misses = seed_style_plan(old, dead)
    p2p = [t for t in p2p if t[2] == src_rank]  # one survivor GPU in this harness
    a, b = SeedRank.remote(spec, ckpt), SeedRank.remote(spec, ckpt)
    ray.get([a.load.remote(old.experts_of(src_rank)), b.empty.remote(old.slots_per_rank)])
    drop_page_cache(ckpt)
    port = 29500 + int(time.time()) % 1000
    addr = f"tcp://127.0.0.1:{port}"
    t0 = time.perf_counter()
    init = ray.get([a.init_group.remote(addr, 0, 2), b.init_group.remote(addr, 1, 2)])
    sends = [(l, s, 1) for l, _, _, s in p2p]
    recvs = [(l, slot, 0) for l, slot, _, _ in p2p]
    ex = ray.get([a.exchange.remote(sends, []), b.exchange.remote([], recvs)])
    reload_s = ray.get(b.reload.remote(misses)) if misses else 0.0
    total = time.perf_counter() - t0
    ray.get([a.shutdown.remote(), b.shutdown.remote()])
    for h in (a, b):
        ray.kill(h)
    out.update({
        "seed_group_init_s": max(init), "seed_p2p_s": max(ex), "seed_disk_s": reload_s, "seed_total_s": total,
        "seed_p2p_experts": len(p2p), "seed_disk_experts": len(misses),
    })
    return out


# ---------------------------------------------------------------------------------------
# Arm 4: elastic-ep
# ---------------------------------------------------------------------------------------


def run_elastic(spec, ckpt, num_gpus, args, workdir) -> tuple[dict, ExpertLayout, int]:
    from elastic_ep.cluster import ElasticEPCluster

    total_slots = spec.num_experts + args.redundant
    if num_gpus == 2 or args.spare == "shared":
        ranks = num_gpus
        fractions = (1.0,) * (ranks - 1) + (0.5, 0.5)
    else:
        ranks = num_gpus - 1
        fractions = None
    if total_slots % ranks:
        total_slots += ranks - total_slots % ranks
    spr = total_slots // ranks
    cfg = ClusterConfig(
        model=spec, checkpoint=ckpt, num_ranks=ranks, slots_per_rank=spr, num_spares=1, device="cuda",
        gpu_fractions=fractions, transfer_timeout_s=60.0, call_timeout_s=120.0, startup_timeout_s=300.0,
        state_dir=str(Path(workdir) / "state"), auto_recover=True,
        stripe_fetches={"auto": None, "on": True, "off": False}[args.stripe],
    )
    cluster = ElasticEPCluster(cfg)
    out = {"ranks": ranks, "slots_per_rank": spr, "spare": "shared GPU" if fractions else "own GPU"}
    try:
        t0 = time.perf_counter()
        info = cluster.start()
        out["start_s"] = time.perf_counter() - t0
        out["start"] = info.to_dict()
        # page-locking backups in the background holds the driver: rebalance once it is done
        out["prepared_before_rebalance"] = _wait_spare_prepared(cluster, timeout_s=300)
        cluster.run_workload(batches=16, tokens_per_batch=16384, seed=0, zipf_s=1.2)
        reb = cluster.rebalance()
        out["rebalance"] = reb.to_dict()
        wt = reb.worker_timings
        xfer = max((t.get("transfer", 0.0) for t in wt.values()), default=0.0)
        exch = max((t.get("exchange", 0.0) for t in wt.values()), default=0.0)
        out["rebalance_p2p_GBps"] = reb.bytes_p2p / xfer / GB if xfer else None
        out["rebalance_exchange_GBps"] = reb.bytes_p2p / exch / GB if exch else None
        assert cluster.verify().ok
        out["spare_prepared"] = _wait_spare_prepared(cluster, timeout_s=300)
        before = ExpertLayout.from_dict(cluster.status()["layout"])
        dead = before.ranks[-1]
        t_kill = time.time()
        cluster.kill(dead)
        st = cluster.wait_healthy(timeout_s=300)
        rec = next(h for h in reversed(st["history"]) if h["reason"] == "recover")
        out["recover"] = rec
        out["kill_to_committed_s"] = rec["committed_at"] - t_kill if rec.get("committed_at") else None
        ver = cluster.verify(against_checkpoint=args.verify_checkpoint)
        out["verified"] = ver.ok
        out["slots_checked"] = ver.slots_checked
        return out, before, dead
    finally:
        cluster.shutdown()


def _wait_spare_prepared(cluster, timeout_s: float) -> dict:
    """Wait until the hot spare (and members, with striped reads) mapped and page-locked the host backups.

    Done in the background after start and after every membership change.
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        st = cluster.status()
        prepared = {**st.get("spares_prepared", {}), **st.get("members_prepared", {})}
        if st.get("spares_prepared") and all(v != "preparing" for v in prepared.values()):
            return prepared
        time.sleep(0.5)
    return {"timeout": True}


# ---------------------------------------------------------------------------------------


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=26)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--redundant", type=int, default=16)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--intermediate", type=int, default=1408)
    p.add_argument("--ckpt", default=os.path.join(tempfile.gettempdir(), "eep-gpu-ckpt"))
    p.add_argument("--spare", choices=["auto", "shared", "own"], default="auto")
    p.add_argument("--ceiling-bytes", type=int, default=1 << 30)
    p.add_argument("--verify-checkpoint", action="store_true", help="re-read the checkpoint to verify (slow)")
    p.add_argument("--skip-baselines", action="store_true")
    p.add_argument("--stripe", choices=["auto", "on", "off"], default="auto",
                   help="share the dead rank's storage reads with survivors (auto: on, on GPUs)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    num_gpus = torch.cuda.device_count()
    if num_gpus < 2:
        print("needs at least 2 GPUs", file=sys.stderr)
        return 2
    card = torch.cuda.get_device_name(0)
    spec = ModelSpec(num_layers=args.layers, num_experts=args.experts, hidden=args.hidden,
                     intermediate=args.intermediate, first_layer=1)
    env = {k: os.environ[k] for k in ENV_KEYS if k in os.environ}
    ray.init(runtime_env={"env_vars": env}, include_dashboard=False, log_to_driver=False, namespace="eep-bench")
    result = {"card": card, "gpus": num_gpus, "host": platform.node(), "layers": args.layers,
              "expert_MB": spec.expert_bytes / 1e6, "checkpoint_GB": spec.num_layers * spec.num_experts * spec.expert_bytes / GB}

    t0 = time.perf_counter()
    index = Path(args.ckpt) / "model.safetensors.index.json"
    if not index.exists():
        write_synthetic_checkpoint(args.ckpt, spec, num_shards=min(8, spec.num_layers), device="cuda")
    result["checkpoint_write_s"] = time.perf_counter() - t0
    print(f"checkpoint ready ({result['checkpoint_GB']:.1f} GB) in {result['checkpoint_write_s']:.1f}s", flush=True)

    result["ceiling"] = measure_ceiling(args.ceiling_bytes)
    print("ceiling", json.dumps(result["ceiling"]), flush=True)
    workdir = tempfile.mkdtemp(prefix="eep-gpu-")
    result["elastic"], before, dead = run_elastic(spec, args.ckpt, num_gpus, args, workdir)
    print("elastic done", flush=True)
    if not args.skip_baselines:
        result["baselines"] = run_baselines(spec, args.ckpt, before, dead)
    result["rebalance_vs_ceiling"] = rebalance_vs_ceiling(result["elastic"], result["ceiling"])
    print_table(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, default=str))
    ray.shutdown()
    return 0


def rebalance_vs_ceiling(e: dict, c: dict) -> dict:
    """The rebalance's transfer time against the fastest the measured links allow for its traffic.

    A plan's bytes need not split evenly over the two directions of a link: the busier
    direction then bounds the time. Ideal seconds = the larger of (most bytes one rank sends,
    or receives) / the one-way ceiling and (all bytes) / (ranks / 2 x the bidirectional
    ceiling); efficiency = ideal / measured (the slowest rank's transfer, packing included).
    """
    plan = e["rebalance"]["plan"]
    one_way, both = c["one_way_GBps"] * GB, c["bidirectional_GBps"] * GB
    ideal = max(max(plan["max_rank_bytes_sent"], plan["max_rank_bytes_received"]) / one_way,
                plan["bytes_p2p"] / (both * e["ranks"] / 2))
    measured = plan["bytes_p2p"] / (e["rebalance_p2p_GBps"] * GB) if e.get("rebalance_p2p_GBps") else None
    return {"ideal_s": ideal, "measured_s": measured,
            "busier_direction_GB": max(plan["max_rank_bytes_sent"], plan["max_rank_bytes_received"]) / GB,
            "efficiency": ideal / measured if measured else None}


def print_table(r: dict) -> None:
    e, c, b = r["elastic"], r["ceiling"], r.get("baselines", {})
    rec = e["recover"]
    ph = rec["phases"]
    wt = rec.get("worker_timings", {})
    dead_bytes = r["layers"] * e["slots_per_rank"] * r["expert_MB"] * 1e6
    print()
    print(f"elastic-ep GPU recovery benchmark: {r['gpus']} x {r['card']}, {r['layers']} MoE layers x "
          f"{r['expert_MB']:.1f} MB experts; {e['ranks']} ranks x {e['slots_per_rank']} slots + 1 hot spare ({e['spare']})")
    print(f"dead rank holds {dead_bytes / GB:.2f} GB; checkpoint {r['checkpoint_GB']:.1f} GB on local disk")
    print(f"cluster start {e['start_s']:.1f}s (backups {e['start'].get('backup_s', 0):.1f}s); "
          f"hot spare prepared: {json.dumps(e.get('spare_prepared'))}")
    print()
    print(f"{'arm':52s} {'seconds':>9s}  notes")
    print(f"{'1. NCCL P2P ceiling, one way':52s} {'':>9s}  {c['one_way_GBps']:.0f} GB/s")
    print(f"{'1. NCCL P2P ceiling, both directions':52s} {'':>9s}  {c['bidirectional_GBps']:.0f} GB/s aggregate")
    for how, rate in c.get("split_bidirectional_GBps", {}).items():
        print(f"{'   same, cut into messages: ' + how:52s} {'':>9s}  {rate:.0f} GB/s aggregate")
    if b:
        print(f"{'2. disk reload of the dead rank (cold page cache)':52s} {b['disk_cold_s']:9.3f}  {b['cache_drop']}")
        print(f"{'2. disk reload of the dead rank (warm page cache)':52s} {b['disk_warm_s']:9.3f}")
        print(f"{'3. seed-style: new group + per-layer P2P + disk':52s} {b['seed_total_s']:9.3f}  "
              f"init {b['seed_group_init_s']:.3f}, p2p {b['seed_p2p_s']:.3f} ({b['seed_p2p_experts']} experts), "
              f"disk {b['seed_disk_s']:.3f} ({b['seed_disk_experts']} experts)")
    k2c = e.get("kill_to_committed_s")
    crit = sum(ph.get(k, 0.0) for k in ("detect", "decide", "plan", "communicators", "transfer", "verify", "commit"))
    print(f"{'4. elastic-ep: kill -> all slots restored, verified':52s} {k2c if k2c is not None else float('nan'):9.3f}  "
          f"critical path {crit:.3f}")
    print("   phases: " + ", ".join(f"{k} {1e3 * v:.1f}ms" for k, v in ph.items()))
    for rank, t in wt.items():
        print(f"   rank {rank}: " + ", ".join(f"{k} {1e3 * v:.1f}ms" for k, v in t.items()))
    print(f"   moved: p2p {rec['bytes_p2p'] / GB:.2f} GB, host backups {rec['bytes_from_backup'] / GB:.2f} GB, "
          f"checkpoint {rec['bytes_from_checkpoint'] / GB:.2f} GB "
          f"(of the storage reads, {rec['plan'].get('bytes_relayed', 0) / GB:.2f} GB read by survivors and relayed); "
          f"verified {e['verified']}")
    reb = e["rebalance"]
    print(f"{'4. elastic-ep: load-driven rebalance':52s} {reb.total_s:9.3f}  "
          f"p2p {reb.bytes_p2p / GB:.2f} GB; transfer (packing pipelined with NCCL) at "
          f"{e['rebalance_p2p_GBps'] or 0:.0f} GB/s = {100 * (e['rebalance_p2p_GBps'] or 0) / c['bidirectional_GBps']:.0f}% "
          f"of the bidirectional ceiling")
    v = r.get("rebalance_vs_ceiling") or {}
    if v.get("efficiency"):
        print(f"   the busier direction carried {v['busier_direction_GB']:.2f} GB: at the ceiling the transfer takes "
              f"{1e3 * v['ideal_s']:.1f} ms, measured {1e3 * v['measured_s']:.1f} ms = {100 * v['efficiency']:.0f}% of "
              f"the ceiling for this traffic")
    for rank, t in reb.get("worker_timings", {}).items():
        print(f"   rank {rank}: " + ", ".join(f"{k} {1e3 * v:.1f}ms" for k, v in t.items()))
    if b and k2c:
        print()
        print(f"speed-up of elastic-ep recovery: x{b['disk_cold_s'] / k2c:.1f} vs cold disk reload, "
              f"x{b['disk_warm_s'] / k2c:.1f} vs warm, x{b['seed_total_s'] / k2c:.1f} vs seed-style")


if __name__ == "__main__":
    sys.exit(main())
