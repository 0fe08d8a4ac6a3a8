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

from elastic_ep.executor import ExpertWeights, StagedUpdate, _halves, _pack, _row_index, commit  # noqa: E402


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
    w = ExpertWeights(
        w13=torch.ones((args.layers, args.slots, 2 * i, h), dtype=torch.bfloat16, device=dev),
        w2=torch.ones((args.layers, args.slots, h, i), dtype=torch.bfloat16, device=dev),
        experts=np.zeros((args.layers, args.slots), dtype=np.int64),
    )
    n13 = 2 * i * h
    rng = np.random.default_rng(0)
    layers = rng.integers(0, args.layers, args.moved)
    slots = rng.integers(0, args.slots, args.moved)
    per_msg = (1 << 30) // (w.expert_numel * 2)
    gb = args.moved * w.expert_numel * 2 / 1e9
    rows = []

    def pack_all():
        return [_pack(w, _row_index(w, layers[a:a + per_msg], slots[a:a + per_msg]), n13) for a in range(0, args.moved, per_msg)]

    def alloc_all():
        return [torch.empty((min(per_msg, args.moved - a), w.expert_numel), dtype=torch.bfloat16, device=dev)
                for a in range(0, args.moved, per_msg)]

    rows.append(("allocate staging, cold (cudaMalloc)", _timed(alloc_all)))
    rows.append(("allocate staging, from torch's cache", _timed(alloc_all)))
    torch.cuda.empty_cache()
    rows.append(("pack, cold allocator", _timed(pack_all)))
    rows.append(("pack, warm allocator", _timed(pack_all)))

    def pack_bf16_rows():  # the same two gathers on bf16 rows, as before rows were viewed as int64
        out = []
        for a in range(0, args.moved, per_msg):
            n = min(per_msg, args.moved - a)
            flat = torch.empty(n * w.expert_numel, dtype=torch.bfloat16, device=dev)
            index = torch.as_tensor(layers[a:a + n] * args.slots + slots[a:a + n], device=dev)
            a13, a2 = _halves(flat, n, n13)
            torch.index_select(w.w13.view(args.layers * args.slots, -1), 0, index, out=a13)
            torch.index_select(w.w2.view(args.layers * args.slots, -1), 0, index, out=a2)
            out.append(flat)
        return out

    pack_bf16_rows()
    rows.append(("pack, warm, gathers on bf16 rows (before)", _timed(pack_bf16_rows)))

    # commit: one staged batch of `moved` distinct slots copied into the live stacks
    flat_all = torch.cat([m for m in pack_all()])
    cells = rng.permutation(args.layers * args.slots)[: args.moved]
    staged_rows = np.stack([cells // args.slots, cells % args.slots, np.zeros_like(cells)], axis=1)

    staged = StagedUpdate(epoch=1, n13=n13)
    staged.add_batch(flat_all, staged_rows, tuple(w.w13.shape[2:]), tuple(w.w2.shape[2:]))

    def commit_wide():
        commit(w, staged)

    def commit_bf16_rows():
        index = torch.as_tensor(staged_rows[:, 0] * args.slots + staged_rows[:, 1], device=dev)
        a13, a2 = _halves(flat_all, args.moved, n13)
        w.w13.view(args.layers * args.slots, -1).index_copy_(0, index, a13)
        w.w2.view(args.layers * args.slots, -1).index_copy_(0, index, a2)

    commit_wide()
    commit_bf16_rows()
    rows.append(("commit, indexed copies on wide rows (executor)", _timed(commit_wide)))
    rows.append(("commit, indexed copies on bf16 rows (before)", _timed(commit_bf16_rows)))
    del flat_all, staged
    ids = torch.arange(args.layers * args.slots, device=dev)
    for t in (w.w13, w.w2):  # each slot tagged with its own (layer, slot) in its first two elements
        rows_view = t.view(args.layers * args.slots, -1)
        rows_view[:, 0] = (ids % 256).to(t.dtype)
        rows_view[:, 1] = (ids // 256).to(t.dtype)
    first = pack_all()[0]
    k = min(per_msg, args.moved)
    want13 = torch.stack([w.w13[a, b].reshape(-1) for a, b in zip(layers[:k], slots[:k])])
    want2 = torch.stack([w.w2[a, b].reshape(-1) for a, b in zip(layers[:k], slots[:k])])
    ok = torch.equal(first[: k * n13].view(k, n13), want13) and torch.equal(first[k * n13:].view(k, -1), want2)
    del want13, want2
    t0 = time.perf_counter()
    pack_all()
    rows.append(("pack, host time to issue (no sync)", time.perf_counter() - t0))
    torch.cuda.synchronize()

    host = torch.ones(args.moved * w.expert_numel // 4, dtype=torch.bfloat16).pin_memory()
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
          f"{w.expert_numel * 2 / 1e6:.1f} MB = {gb:.2f} GB in {-(-args.moved // per_msg)} messages")
    print(f"packed message matches the live experts: {ok}")
    print(f"{'step':48s} {'ms':>8s} {'GB/s':>7s}")
    for name, s in rows:
        print(f"{name:48s} {1e3 * s:8.1f} {gb / s:7.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
