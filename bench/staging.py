"""Where a transfer's packing time goes on one GPU: allocation, packing copies, and thread contention.

Run on a GPU host:  python -m bench.staging --layers 26

Times, at DeepSeek-V2-Lite expert geometry: allocating staging cold and from torch's
cache; packing N live experts into message buffers (the executor's ``_pack``) cold
and warm; and the same packing while a second thread issues host-to-GPU copies (as
a recovery's background fetch does), to see whether the two threads slow each other.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from elastic_ep.executor import ExpertWeights, StagedUpdate, _pack, _row_index, commit  # noqa: E402


def _timed(fn) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=26)
    p.add_argument("--slots", type=int, default=40)
    p.add_argument("--moved", type=int, default=266, help="experts packed, as one rank's sends in a rebalance")
    args = p.parse_args(argv)
    dev = torch.device("cuda", 0)
    torch.cuda.set_device(dev)
    h, i = 2048, 1408
    from elastic_ep.config import ModelSpec

    w = ExpertWeights.zeros(ModelSpec(hidden=h, intermediate=i).expert_format, args.layers, args.slots, dev)
    w.rows.fill_(1)
    numel = w.row_bytes  # bytes of one expert's bundle
    rng = np.random.default_rng(0)
    layers = rng.integers(0, args.layers, args.moved)
    slots = rng.integers(0, args.slots, args.moved)
    per_msg = (1 << 30) // numel
    gb = args.moved * numel / 1e9
    rows = []

    def pack_all():
        return [_pack(w, _row_index(w, layers[a:a + per_msg], slots[a:a + per_msg])) for a in range(0, args.moved, per_msg)]

    def alloc_all():
        return [torch.empty((min(per_msg, args.moved - a), numel), dtype=torch.uint8, device=dev)
                for a in range(0, args.moved, per_msg)]

    rows.append(("allocate staging, cold (cudaMalloc)", _timed(alloc_all)))
    rows.append(("allocate staging, from torch's cache", _timed(alloc_all)))
    torch.cuda.empty_cache()
    rows.append(("pack, cold allocator", _timed(pack_all)))
    rows.append(("pack, warm allocator", _timed(pack_all)))
    live = w.rows.view(args.layers * args.slots, numel)

    def pack_byte_rows():  # the same gather on uint8 rows, without the wide int64 view
        out = []
        for a in range(0, args.moved, per_msg):
            n = min(per_msg, args.moved - a)
            flat = torch.empty(n * numel, dtype=torch.uint8, device=dev)
            index = torch.as_tensor(layers[a:a + n] * args.slots + slots[a:a + n], device=dev)
            torch.index_select(live, 0, index, out=flat.view(n, numel))
            out.append(flat)
        return out

    pack_byte_rows()
    rows.append(("pack, warm, gathers on uint8 rows (narrow)", _timed(pack_byte_rows)))

    # commit: one staged batch of `moved` distinct slots copied into the live stacks
    flat_all = torch.cat([m for m in pack_all()])
    cells = rng.permutation(args.layers * args.slots)[: args.moved]
    staged_rows = np.stack([cells // args.slots, cells % args.slots, np.zeros_like(cells)], axis=1)

    staged = StagedUpdate(epoch=1, row_bytes=numel)
    staged.add_batch(flat_all, staged_rows)

    def commit_wide():
        commit(w, staged)

    def commit_byte_rows():
        index = torch.as_tensor(staged_rows[:, 0] * args.slots + staged_rows[:, 1], device=dev)
        live.index_copy_(0, index, flat_all.view(args.moved, numel))

    commit_wide()
    commit_byte_rows()
    rows.append(("commit, indexed copies on wide rows (executor)", _timed(commit_wide)))
    rows.append(("commit, indexed copies on uint8 rows (narrow)", _timed(commit_byte_rows)))
    del flat_all, staged
    ids = torch.arange(args.layers * args.slots, device=dev)
    live[:, 0] = (ids % 256).to(torch.uint8)  # each slot tagged with its own (layer, slot) in its first bytes
    live[:, 1] = (ids // 256).to(torch.uint8)
    first = pack_all()[0]
    k = min(per_msg, args.moved)
    want = torch.stack([w.rows[a, b] for a, b in zip(layers[:k], slots[:k])])
    ok = torch.equal(first.view(k, numel), want)
    del want
    t0 = time.perf_counter()
    pack_all()
    rows.append(("pack, host time to issue (no sync)", time.perf_counter() - t0))
    torch.cuda.synchronize()

    host = torch.ones(args.moved * numel // 8, dtype=torch.bfloat16).pin_memory()
    dst = torch.empty_like(host, device=dev)
    chunks_h, chunks_d = host.chunk(512), dst.chunk(512)
    stop = threading.Event()

    def h2d_loop():
        stream = torch.cuda.Stream(dev)
        with torch.cuda.stream(stream):
            while not stop.is_set():
                for a, b in zip(chunks_d, chunks_h):
                    a.copy_(b, non_blocking=True)
                stream.synchronize()

    th = threading.Thread(target=h2d_loop, daemon=True)
    th.start()
    time.sleep(0.05)
    rows.append(("pack, warm, beside a host-to-GPU copy thread", _timed(pack_all)))
    stop.set()
    th.join()

    print(f"\nstaging on 1 x {torch.cuda.get_device_name(0)}: {args.moved} experts of "
          f"{numel / 1e6:.1f} MB = {gb:.2f} GB in {-(-args.moved // per_msg)} messages")
    print(f"packed message matches the live experts: {ok}")
    print(f"{'step':48s} {'ms':>8s} {'GB/s':>7s}")
    for name, s in rows:
        print(f"{name:48s} {1e3 * s:8.1f} {gb / s:7.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
