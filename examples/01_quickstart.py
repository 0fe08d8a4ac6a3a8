"""Quickstart: start a cluster, route a skewed workload, rebalance by it, verify every slot.

Runs on an embedded local Ray on the CPU (Gloo), from the repository root:

    python examples/01_quickstart.py

or as a job on a running Ray cluster (then it joins that cluster instead):

    ray job submit --working-dir . -- python examples/01_quickstart.py

It writes a small synthetic checkpoint to a temp dir, starts 4 ranks x 5 slots,
routes Zipf-skewed batches (16 x 8192 tokens; `--batches N --tokens N` for fewer),
rebalances by the recorded load and prints what moved and how even the ranks' loads
are before and after. Exits 1 if any slot's weights differ from the checkpoint.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

try:
    import elastic_ep  # noqa: F401
except ImportError:  # not installed: use the repository this script sits in
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from elastic_ep.cluster import ElasticEPCluster  # noqa: E402
from elastic_ep.config import ClusterConfig, ModelSpec  # noqa: E402
from elastic_ep.layout import ExpertLayout  # noqa: E402
from elastic_ep.report import format_report  # noqa: E402
from elastic_ep.storage import write_synthetic_checkpoint  # noqa: E402

SPEC = ModelSpec(num_layers=4, num_experts=16, hidden=64, intermediate=32)  # 12 KiB per expert


def imbalance(layout: ExpertLayout, load: np.ndarray) -> float:
    """Max over mean rank load, averaged over layers (1.0 is perfectly even)."""
    rank_load = layout.rank_loads(load)  # [num_layers, num_ranks]
    return float((rank_load.max(axis=1) / rank_load.mean(axis=1)).mean())


def main(batches: int, tokens: int) -> int:
    on_cluster = "RAY_ADDRESS" in os.environ  # under `ray job submit`: join that cluster
    with tempfile.TemporaryDirectory(prefix="eep-quickstart-") as work:
        ckpt = write_synthetic_checkpoint(Path(work) / "checkpoint", SPEC)
        cfg = ClusterConfig(model=SPEC, checkpoint=str(ckpt), num_ranks=4, slots_per_rank=5, num_spares=0,
                            state_dir=str(Path(work) / "state"), address="auto" if on_cluster else None)
        with ElasticEPCluster(cfg, ray_init_kwargs=None if on_cluster else {"num_cpus": 2}) as cluster:
            info = cluster.last_start
            print(f"started {cfg.num_ranks} ranks x {cfg.slots_per_rank} slots in {info.start_s:.1f}s "
                  f"({info.checkpoint_bytes // 1024} KiB read from the checkpoint)")

            before = ExpertLayout.from_dict(cluster.status()["layout"])
            load = cluster.run_workload(batches=batches, tokens_per_batch=tokens, zipf_s=1.5)
            hottest = load.max(axis=1) / load.sum(axis=1)  # [num_layers]
            print(f"routed {batches} batches x {tokens} tokens; the hottest expert of each layer got "
                  f"{', '.join(f'{x:.0%}' for x in hottest)} of its layer's load")

            report = cluster.rebalance()
            print(format_report(report))
            after = ExpertLayout.from_dict(cluster.status()["layout"])
            print(f"balance (max/mean rank load): before {imbalance(before, load):.3f}, "
                  f"after {imbalance(after, load):.3f}; most replicas of one expert: {after.logcnt.max()}")

            ver = cluster.verify(against_checkpoint=True)
            print(f"verified {ver.slots_checked} slots against the checkpoint: {'OK' if ver.ok else 'FAILED'}")
            if not ver.ok:
                print(ver.bad, file=sys.stderr)
                return 1
    print("QUICKSTART OK")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=16, help="batches of the skewed workload (default 16)")
    parser.add_argument("--tokens", type=int, default=8192, help="tokens per batch (default 8192; fewer is quicker)")
    args = parser.parse_args()
    sys.exit(main(args.batches, args.tokens))
