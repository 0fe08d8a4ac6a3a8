"""The planning core (layout, balance, plan) imports without Ray or torch."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("ray", "torch", "torch.distributed")


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)},
    )


def _check(modules: list[str]) -> None:
    code = (
        "import sys\n"
        + "".join(f"import {m}\n" for m in modules)
        + f"heavy = [m for m in {HEAVY!r} if m in sys.modules]\n"
        + "assert not heavy, f'pure planning imported {heavy}'\n"
        + "print('ok')\n"
    )
    proc = _run(code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


BALANCE = ["elastic_ep.balance"] + sorted(
    f"elastic_ep.balance.{p.stem}" for p in (ROOT / "elastic_ep" / "balance").glob("*.py") if p.stem != "__init__"
)


def test_balance_package_is_listed():
    # the list below is read from the folder: a new module of the package is checked too
    assert "elastic_ep.balance.policy" in BALANCE and "elastic_ep.balance.lpt" in BALANCE


def test_planning_core_imports_no_ray_or_torch():
    _check(["elastic_ep.layout", *BALANCE, "elastic_ep.plan", "elastic_ep.decide", "elastic_ep.serving.dispatch",
            "elastic_ep.serving_stats", "elastic_ep.degraded", "elastic_ep.migration"])


@pytest.mark.parametrize("module", ["elastic_ep", "elastic_ep.errors", "elastic_ep.layout", *BALANCE, "elastic_ep.plan",
                                    "elastic_ep.decide", "elastic_ep.serving.dispatch", "elastic_ep.serving_stats",
                                    "elastic_ep.degraded", "elastic_ep.migration", "elastic_ep.replies",
                                    "elastic_ep.report", "elastic_ep.status", "elastic_ep.room"])
def test_each_pure_module_alone(module):
    _check([module])


def test_planning_works_without_ray_or_torch():
    # Block the heavy packages outright: the planning core must still plan end to end.
    code = (
        "import sys\n"
        "for m in ('ray', 'torch'):\n"
        "    sys.modules[m] = None  # any import of them now raises ImportError\n"
        "import numpy as np\n"
        "from elastic_ep.balance import rebalance_experts\n"
        "from elastic_ep.plan import plan_transfers, apply_plan\n"
        "old = rebalance_experts(np.ones((2, 8)), [0, 1, 2, 3], 3)\n"
        "new = rebalance_experts(np.arange(16.0).reshape(2, 8), [0, 1, 2], 3, old=old, live_ranks=[0, 1, 2])\n"
        "plan = plan_transfers(old, new, [0, 1, 2])\n"
        "out = apply_plan(plan, {r: old.experts_of(r).copy() for r in (0, 1, 2)})\n"
        "assert all((out[r] == new.experts_of(r)).all() for r in new.ranks)\n"
        "print('ok')\n"
    )
    proc = _run(code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


def test_geometry_and_formats_need_no_torch():
    code = (
        "import sys, json, tempfile, pathlib\n"
        "from elastic_ep.config import ModelSpec\n"
        "from elastic_ep.checkpoint.geometry import read_spec\n"
        "spec = ModelSpec(hidden=7168, intermediate=2048, quant='fp8')\n"
        "assert spec.expert_bytes == spec.expert_format.row_bytes > 3 * 7168 * 2048\n"
        "d = pathlib.Path(tempfile.mkdtemp())\n"
        "(d / 'config.json').write_text(json.dumps({'model_type': 'mixtral', 'num_local_experts': 8, "
        "'intermediate_size': 64, 'hidden_size': 32, 'num_hidden_layers': 2}))\n"
        "assert read_spec(d)[0].num_experts == 8\n"
        f"heavy = [m for m in {HEAVY!r} if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "print('ok')\n"
    )
    proc = _run(code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"
