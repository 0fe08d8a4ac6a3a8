"""Host-to-GPU copy paths for host backups in the Ray object store, side by side.

Run on a GPU host:  python -m bench.host_to_gpu --gb 8

A recovered rank pulls the experts no survivor holds from host backups. Those live in
the Ray object store (shared memory), read zero-copy as numpy arrays. This measures
what one GPU actor gets from them:

1. pageable: ``torch.from_numpy(a).to("cuda")`` straight from the object store;
2. registered: the same buffers page-locked in place with ``cudaHostRegister`` ahead of
   time (no second copy in host memory), then asynchronous copies;
3. pinned mirror: a second copy in pinned host memory made ahead of time, then
   asynchronous copies (costs as much host memory again);
and how long the ahead-of-time preparation of 2 and 3 takes; then the executor's own
background fetcher over 2., alone, beside a busy main thread, and without fingerprints.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import ray  # noqa: E402

HIDDEN, INTER = 2048, 1408  # DeepSeek-V2-Lite expert geometry
W13_ELEMS, W2_ELEMS = 2 * INTER * HIDDEN, HIDDEN * INTER
EXPERT_BYTES = (W13_ELEMS + W2_ELEMS) * 2  # bf16


@ray.remote(num_cpus=1)
class Holder:
    """Owns the objects, like elastic-ep's BackupStore: one byte row (the expert's whole bundle) per expert."""

    def put(self, n: int) -> list:
        base = np.arange(EXPERT_BYTES // 2, dtype=np.int16)
        self.refs = [ray.put((base + i).view(np.uint8)) for i in range(n)]
        return self.refs


@ray.remote(num_gpus=1, num_cpus=1)
class Reader:
    """A GPU actor that copies the objects to its GPU by each path."""

    def __init__(self):
        import torch

        torch.cuda.set_device(0)
        self.dev = torch.device("cuda", 0)

    def run(self, refs: list) -> dict:
        import threading

        import torch

        import elastic_ep.executor as executor
        from elastic_ep.hostmem import PinnedRegion

        arrays = ray.get(refs)
        total = sum(a.nbytes for a in arrays)
        out = {"bytes": total, "objects": len(arrays)}
        dst = torch.empty(total, dtype=torch.uint8, device=self.dev)

        def copy_all(tensors):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            off = 0
            for t in tensors:
                dst[off: off + t.numel()].copy_(t, non_blocking=True)
                off += t.numel()
            torch.cuda.synchronize()
            return time.perf_counter() - t0

        host = [torch.from_numpy(a) for a in arrays]
        copy_all(host[:2])  # warm-up
        out["pageable_s"] = copy_all(host)
        t0 = time.perf_counter()
        region = PinnedRegion([a for a in arrays])
        out["register_s"] = time.perf_counter() - t0
        out["registered_ranges"] = region.num_ranges
        out["registered_s"] = copy_all(host)
        ok = torch.equal(dst[: host[0].numel()].cpu(), host[0]) and torch.equal(dst[-host[-1].numel():].cpu(), host[-1])

        # The executor's background fetcher on the same registered backups, alone and beside
        # the work a recovery's main thread does meanwhile.
        from elastic_ep.config import ModelSpec

        weights = executor.ExpertWeights.zeros(ModelSpec(hidden=HIDDEN, intermediate=INTER).expert_format, 1, 1,
                                               self.dev)
        got = {(0, i): host[i] for i in range(len(arrays))}
        fetches = np.array([[0, i, -1, i] for i in range(len(arrays))], dtype=np.int64)

        def fetcher(main_work=None) -> dict:
            timings: dict = {}
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            f = executor._Fetcher(fetches, lambda keys: got, weights, timings)
            f.start()
            if main_work is not None:
                main_work(f.thread)
            flat, rows, sums = f.join(600.0)
            timings["wall"] = time.perf_counter() - t0
            nonlocal ok
            ok = ok and torch.equal(flat[: host[0].numel()].cpu(), host[0])
            del flat
            return timings

        def spin(thread):  # a Python loop that never lets go of the GIL on its own
            while thread.is_alive():
                pass

        def small_gpu_ops(thread):  # what packing and posting receives look like from the host
            while thread.is_alive():
                idx = torch.as_tensor(np.arange(64, dtype=np.int64), device=self.dev)
                torch.empty(1 << 20, dtype=torch.bfloat16, device=self.dev)
                del idx

        out["fetcher_alone"] = fetcher()
        out["fetcher_beside_python_spin"] = fetcher(spin)
        out["fetcher_beside_small_gpu_ops"] = fetcher(small_gpu_ops)
        real_sums = executor.fingerprint_sums
        executor.fingerprint_sums = lambda a13, a2: torch.zeros((2, a13.shape[0]), dtype=torch.int64, device=a13.device)
        try:
            out["fetcher_no_fingerprint"] = fetcher()
        finally:
            executor.fingerprint_sums = real_sums

        t0 = time.perf_counter()
        region.release()
        out["unregister_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        mirror = [torch.empty_like(t, pin_memory=True) for t in host]
        for m, t in zip(mirror, host):
            m.copy_(t)
        out["mirror_prepare_s"] = time.perf_counter() - t0
        out["mirror_s"] = copy_all(mirror)
        out["copied_correctly"] = bool(ok)
        return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gb", type=float, default=8.0, help="bytes of backups to copy, in GB")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    n = max(2, int(args.gb * 1e9 / EXPERT_BYTES))
    ray.init(include_dashboard=False, log_to_driver=False)
    holder = Holder.remote()
    refs = ray.get(holder.put.remote(n))
    r = ray.get(Reader.remote().run.remote(refs))
    gb = r["bytes"] / 1e9
    print(f"\nhost backups -> GPU: {r['objects']} objects of {EXPERT_BYTES / 1e6:.1f} MB, {gb:.2f} GB in all; "
          f"copied correctly: {r['copied_correctly']}")
    print(f"{'path':38s} {'prepare s':>10s} {'copy s':>8s} {'GB/s':>7s}")
    print(f"{'1. pageable, from the object store':38s} {'':>10s} {r['pageable_s']:8.3f} {gb / r['pageable_s']:7.1f}")
    print(f"{'2. registered in place (cudaHostRegister)':38s} {r['register_s']:10.3f} {r['registered_s']:8.3f} "
          f"{gb / r['registered_s']:7.1f}   ({r['registered_ranges']} ranges; unregister {r['unregister_s']:.3f}s)")
    print(f"{'3. pinned mirror (second host copy)':38s} {r['mirror_prepare_s']:10.3f} {r['mirror_s']:8.3f} "
          f"{gb / r['mirror_s']:7.1f}")
    print("\nthe executor's background fetcher (2.) into one packed batch, chunked fingerprints on a second stream:")
    print(f"{'case':38s} {'wall s':>8s} {'GB/s':>7s} {'copy stream s':>14s} {'issue-done wait s':>18s}")
    for case in ("fetcher_alone", "fetcher_beside_python_spin", "fetcher_beside_small_gpu_ops", "fetcher_no_fingerprint"):
        t = r[case]
        print(f"{case:38s} {t['wall']:8.3f} {gb / t['wall']:7.1f} {t.get('fetch_dma', 0):14.3f} "
              f"{t.get('fetch_copy_wait', 0):18.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=2))
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
