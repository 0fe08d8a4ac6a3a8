"""Grow and shrink: add a rank to a running cluster, then retire it again, verifying after each step.

Runs on an embedded local Ray on the CPU (Gloo), from the repository root:

    python examples/03_grow_and_shrink.py

or as a job on a running Ray cluster: `ray job submit --working-dir . -- python examples/03_grow_and_shrink.py`.

Starts 4 ranks x 5 slots with no spare and balances a skewed load (16 batches x 8192
tokens; `--batches N --tokens N` for fewer). grow(1) starts a
fifth worker and fills its slots from its peers; shrink() moves what the retired
rank holds onto the others before it leaves, so nothing is read from the checkpoint
(its worker stays on as a spare). Prints the bytes moved each time; exits 1 if verification
against the checkpoint fails or the shrink read the checkpoint.
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

from elastic_ep.cluster import ElasticEPCluster  # noqa: E402
from elastic_ep.config import ClusterConfig, ModelSpec  # noqa: E402
from elastic_ep.report import RebalanceReport, format_report  # noqa: E402
from elastic_ep.storage import write_synthetic_checkpoint  # noqa: E402

SPEC = ModelSpec(num_layers=4, num_experts=16, hidden=64, intermediate=32)  # 12 KiB per expert


def moved(report: RebalanceReport) -> str:
    """Where one reconfiguration's bytes came from, in KiB."""
    kib = {k: getattr(report, f"bytes_{k}") // 1024 for k in ("p2p", "from_backup", "from_checkpoint")}
    return (f"{sum(kib.values())} KiB moved: {kib['p2p']} KiB from peers, {kib['from_backup']} KiB from "
            f"host backups, {kib['from_checkpoint']} KiB from the checkpoint")


def verified(cluster: ElasticEPCluster) -> bool:
    """Check every slot against a fresh read of the checkpoint and print the outcome."""
    ver = cluster.verify(against_checkpoint=True)
    print(f"verified {ver.slots_checked} slots against the checkpoint: {'OK' if ver.ok else 'FAILED'}")
    if not ver.ok:
        print(ver.bad, file=sys.stderr)
    return ver.ok


def main(batches: int, tokens: int) -> int:
    on_cluster = "RAY_ADDRESS" in os.environ  # under `ray job submit`: join that cluster
    with tempfile.TemporaryDirectory(prefix="eep-grow-") as work:
        ckpt = write_synthetic_checkpoint(Path(work) / "checkpoint", SPEC)
        cfg = ClusterConfig(model=SPEC, checkpoint=str(ckpt), num_ranks=4, slots_per_rank=5, num_spares=0,
                            state_dir=str(Path(work) / "state"), address="auto" if on_cluster else None)
        with ElasticEPCluster(cfg, ray_init_kwargs=None if on_cluster else {"num_cpus": 2}) as cluster:
            cluster.run_workload(batches=batches, tokens_per_batch=tokens, zipf_s=1.5)  # workers count tokens
            rebalance = cluster.rebalance()  # collects those counts: grow and shrink plan by them too
            print(f"started ranks {cluster.status()['ranks']}; balanced a skewed load ({moved(rebalance)})")

            print("\n== grow by one rank")
            grow = cluster.grow(1)
            print(format_report(grow))
            print(f"ranks {cluster.status()['ranks']}; {moved(grow)}")
            ok = verified(cluster)

            print(f"\n== shrink rank {grow.added[0]} away")
            shrink = cluster.shrink(grow.added[0])
            print(format_report(shrink))
            st = cluster.status()
            print(f"ranks {st['ranks']}, spares {st['spares']}; {moved(shrink)}")
            ok = verified(cluster) and ok
            if shrink["bytes_from_checkpoint"]:
                print("FAILED: the shrink read the checkpoint", file=sys.stderr)
                ok = False
    print("GROW-AND-SHRINK OK" if ok else "GROW-AND-SHRINK FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=16, help="batches of the skewed workload (default 16)")
    parser.add_argument("--tokens", type=int, default=8192, help="tokens per batch (default 8192; fewer is quicker)")
    args = parser.parse_args()
    sys.exit(main(args.batches, args.tokens))
