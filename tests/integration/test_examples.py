"""The numbered examples run end to end, as a user runs them: `python examples/NN_name.py` from the repo root.

Each script starts its own embedded local Ray (CPU, Gloo), so each runs in its own
process; none of them may see a RAY_ADDRESS (that would make it join a cluster). 01 is
not run here: the README's job-submission test (test_readme_cluster_recipe.py) runs it
with its defaults and checks the same lines. The skewed workload of 03 is cut to 4
batches x 1024 tokens through its own ``--batches``/``--tokens`` options (default
16 x 8192): the same calls, fewer tokens.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

ROOT = Path(__file__).resolve().parents[2]
SCRIPT_TIMEOUT_S = 240  # each takes ~30-90 s on a loaded 2-core machine
SMALL_WORKLOAD = ["--batches", "4", "--tokens", "1024"]
ARGS = {"03_grow_and_shrink.py": SMALL_WORKLOAD}

# script -> lines its stdout must contain
EXPECTED = {
    "02_kill_and_recover.py": ["replaced: rank 2 -> ", "dropped ranks: [3]", "KILL-AND-RECOVER OK"],
    "03_grow_and_shrink.py": ["added ranks: [4]", "dropped ranks: [4]", "GROW-AND-SHRINK OK"],
}


@pytest.mark.parametrize("script", sorted(EXPECTED))
def test_example_runs_and_verifies(script):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / script), *ARGS.get(script, [])],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=SCRIPT_TIMEOUT_S,
    )
    out = proc.stdout
    assert proc.returncode == 0, f"{script} exited {proc.returncode}\n--- stdout\n{out}\n--- stderr\n{proc.stderr[-4000:]}"
    for line in EXPECTED[script]:
        assert line in out, f"{script}: {line!r} not in stdout\n{out}"
    assert "FAILED" not in out
