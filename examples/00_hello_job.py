"""Hello job: a Ray job whose workers import elastic_ep from the uploaded working dir.

Meant for `ray job submit`, which uploads the repo and puts it on the workers' path
(the package need not be installed on the cluster):

    ray job submit --address http://127.0.0.1:8265 --working-dir . \\
        -- python examples/00_hello_job.py

Run plainly (`python examples/00_hello_job.py`) it starts a local Ray instead, and
then elastic_ep must be importable (installed, or the repo on PYTHONPATH).

Each task balances a random load over 4 ranks of 5 slots with the sticky EPLB
policy and checks the layout; the driver prints one line:

    HELLO-JOB OK layers=12 max/mean=1.04 elastic_ep=<where the workers imported it>
"""

from __future__ import annotations

import os
import time

import numpy as np
import ray

NUM_TASKS = 3  # Ray tasks, each balancing its own layers
LAYERS_PER_TASK = 4  # MoE layers per task
NUM_EXPERTS = 16  # logical experts per layer
RANKS = [0, 1, 2, 3]  # expert-parallel ranks
SLOTS_PER_RANK = 5  # 20 slots: 16 experts + 4 replicas


@ray.remote(num_cpus=1)
def balance_layers(seed: int) -> dict:
    """Balance a skewed random load: [LAYERS_PER_TASK, NUM_EXPERTS] -> rank loads and a summary."""
    # Imported here, on the worker, so the job's working_dir upload is what is tested.
    import elastic_ep
    from elastic_ep.balance import rebalance_experts
    from elastic_ep.layout import ExpertLayout

    rng = np.random.default_rng(seed)
    load = rng.zipf(1.5, size=(LAYERS_PER_TASK, NUM_EXPERTS)).clip(max=1000).astype(np.float64)
    layout = rebalance_experts(load, ranks=RANKS, slots_per_rank=SLOTS_PER_RANK)
    layout.validate()
    again = ExpertLayout.from_dict(layout.to_dict())  # the form that crosses actor boundaries
    if again != layout:
        raise RuntimeError("ExpertLayout did not survive to_dict/from_dict")
    rank_load = layout.rank_loads(load)  # [layers, ranks]
    return {
        "layers": layout.num_layers,
        "max_over_mean": float((rank_load.max(axis=1) / rank_load.mean(axis=1)).max()),
        "package": os.path.dirname(os.path.abspath(elastic_ep.__file__)),
    }


def main() -> None:
    start = time.perf_counter()
    ray.init()  # under `ray job submit` the address comes from RAY_ADDRESS; no num_cpus here
    results = ray.get([balance_layers.remote(seed) for seed in range(NUM_TASKS)])
    layers = sum(r["layers"] for r in results)
    worst = max(r["max_over_mean"] for r in results)
    packages = sorted({r["package"] for r in results})
    print(
        f"HELLO-JOB OK layers={layers} max/mean={worst:.2f} "
        f"elastic_ep={','.join(packages)} took_s={time.perf_counter() - start:.1f}"
    )


if __name__ == "__main__":
    main()
