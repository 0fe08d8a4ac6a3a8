"""Kill and recover: a hot spare takes over a killed rank; with no spare left the cluster shrinks.

Runs on an embedded local Ray on the CPU (Gloo), from the repository root:

    python examples/02_kill_and_recover.py

or as a job on a running Ray cluster: `ray job submit --working-dir . -- python examples/02_kill_and_recover.py`.

Part 1 starts 4 ranks x 6 slots plus 1 hot spare and kills rank 2's worker: the
controller notices on its own, the spare takes rank 2 over (its experts come from
peers and host backups, not the checkpoint) and a new spare is started. Part 2
starts a cluster with no spare and kills rank 3: the survivors re-place its experts
among themselves: a shrink to 3 ranks, whose 18 slots still hold all 16 experts.
Each part verifies every slot against the checkpoint; the script exits 1 if any
differs.
"""

from __future__ import annotations

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
from elastic_ep.quiet import quiet_worker_deaths  # noqa: E402
from elastic_ep.report import format_report  # noqa: E402
from elastic_ep.storage import write_synthetic_checkpoint  # noqa: E402

SPEC = ModelSpec(num_layers=4, num_experts=16, hidden=64, intermediate=32)  # 12 KiB per expert
ON_CLUSTER = "RAY_ADDRESS" in os.environ  # under `ray job submit`: join that cluster


def kill_and_heal(cfg: ClusterConfig, rank: int) -> bool:
    """Start a cluster, kill ``rank``'s worker, wait for the automatic recovery; True if verified."""
    with ElasticEPCluster(cfg, ray_init_kwargs=None if ON_CLUSTER else {"num_cpus": 2}) as cluster:
        before = cluster.status()
        print(f"ranks {before['ranks']}, spares {before['spares']}")
        victim = cluster.kill(rank)
        print(f"killed rank {rank} ({victim})")
        after = cluster.wait_healthy(timeout_s=120)
        recovery = next(h for h in reversed(after["history"]) if h["reason"] == "recover")
        print(format_report(recovery))
        print(f"ranks {after['ranks']}, spares {after['spares']}, dead {after['dead']}; "
              f"{recovery['committed_at'] - after['death_times'][victim]:.2f}s from death noticed to recovered")
        ver = cluster.verify(against_checkpoint=True)
        print(f"verified {ver.slots_checked} slots against the checkpoint: {'OK' if ver.ok else 'FAILED'}")
        if not ver.ok:
            print(ver.bad, file=sys.stderr)
        return ver.ok


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="eep-recover-") as work:
        ckpt = write_synthetic_checkpoint(Path(work) / "checkpoint", SPEC)

        def config(num_spares: int, name: str) -> ClusterConfig:
            return ClusterConfig(model=SPEC, checkpoint=str(ckpt), num_ranks=4, slots_per_rank=6,
                                 num_spares=num_spares, name=name, state_dir=str(Path(work) / name),
                                 address="auto" if ON_CLUSTER else None)

        print("== 1. kill a rank; the hot spare takes over and a new spare starts")
        ok = kill_and_heal(config(num_spares=1, name="with-spare"), rank=2)
        print("\n== 2. kill a rank with no spare left; the survivors take its experts (shrink)")
        ok = kill_and_heal(config(num_spares=0, name="no-spare"), rank=3) and ok
    print("KILL-AND-RECOVER OK" if ok else "KILL-AND-RECOVER FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    with quiet_worker_deaths("this example's kills"):  # Ray prints a paragraph per killed worker otherwise
        code = main()
    sys.exit(code)
