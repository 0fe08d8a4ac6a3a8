"""Bad input to a running cluster (real local Ray): a typed error naming the bad value, nothing lost,
the cluster still serving. Checkpoint damage is tried at start and at recovery time."""

import json
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from elastic_ep.cluster import ElasticEPCluster
from elastic_ep.config import ModelSpec
from elastic_ep.errors import (
    CapacityError,
    CheckpointError,
    ExpertsLostError,
    LoadStatsError,
    UnknownRankError,
)
from elastic_ep.layout import ExpertLayout
from elastic_ep.storage import INDEX_FILE
from elastic_ep.testing import SMALL, small_config

pytestmark = pytest.mark.timeout(240)

SHARD2 = "model-00002-of-00002.safetensors"  # SMALL in 2 shards: layers 0-1, then layer 2


def _copy(src, dst) -> Path:
    shutil.copytree(src, dst)
    return Path(dst)


def _truncate(path: Path) -> None:
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 64)


def _garble_header(path: Path) -> None:
    with open(path, "r+b") as f:
        f.seek(8)
        f.write(b"{not json at all")


def _edit_index(ckpt: Path, edit) -> None:
    index = json.loads((ckpt / INDEX_FILE).read_text())
    edit(index["weight_map"])
    (ckpt / INDEX_FILE).write_text(json.dumps(index))


def _no_actors_left(ray, prefix: str, timeout_s: float = 20.0) -> bool:
    """Poll until no named actor of this cluster exists (ray.kill releases names asynchronously)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)]
        if not [n for n in names if n.startswith(prefix)]:
            return True
        time.sleep(0.1)
    return False


# -- at start: every kind of damage is caught before a single worker starts ---------------------


def _escape(ckpt: Path) -> None:
    (ckpt.parent / "outside.safetensors").write_bytes((ckpt / SHARD2).read_bytes())
    _edit_index(ckpt, lambda wm: wm.update({k: "../outside.safetensors" for k, v in wm.items() if v == SHARD2}))


def _drop_tensors(ckpt: Path) -> None:
    _edit_index(ckpt, lambda wm: [wm.pop(k) for k in list(wm) if ".experts.5." in k])


DAMAGE = {
    "missing_shard": (lambda c: (c / SHARD2).unlink(), r"shard file 'model-00002-of-00002.safetensors' .* missing"),
    "truncated_shard": (lambda c: _truncate(c / SHARD2), r"cannot read shard 'model-00002-of-00002.safetensors'"),
    "corrupted_header": (lambda c: _garble_header(c / SHARD2), r"cannot read shard 'model-00002-of-00002.*corrupted"),
    "index_escapes_folder": (_escape, r"'\.\./outside\.safetensors' is absolute or contains '\.\.'"),
    "missing_expert_tensors": (_drop_tensors, r"9 expert tensors missing .*experts\.5\."),
}


@pytest.mark.parametrize("kind", sorted(DAMAGE))
def test_damaged_checkpoint_at_start(ray_local, small_checkpoint, tmp_path, kind):
    damage, match = DAMAGE[kind]
    ckpt = _copy(small_checkpoint, tmp_path / "ckpt")
    damage(ckpt)
    c = ElasticEPCluster(small_config(ckpt, tmp_path, name=f"bad-{kind[:8]}"))
    with pytest.raises(CheckpointError, match=match):
        c.start()
    assert _no_actors_left(ray_local, c.prefix)  # a failed start leaves no detached worker behind


@pytest.mark.parametrize("field, value, match", [
    ("hidden", 64, r"has shape \(16, 32\), the model spec needs \(16, 64\)"),
    ("dtype", "float16", r"has dtype BF16, the model spec needs F16 \(float16\)"),
])
def test_checkpoint_that_does_not_match_the_model_spec(ray_local, small_checkpoint, tmp_path, field, value, match):
    spec = ModelSpec(**{**SMALL.__dict__, field: value})
    c = ElasticEPCluster(small_config(small_checkpoint, tmp_path, model=spec, name=f"spec-{field}"))
    with pytest.raises(CheckpointError, match=match):
        c.start()
    assert _no_actors_left(ray_local, c.prefix)


# -- one running cluster for the rest ----------------------------------------------------------


@pytest.fixture(scope="module")
def served(ray_local, small_checkpoint, tmp_path_factory):
    """A cluster (with host backups) over its own copy of the checkpoint, which tests may damage."""
    root = tmp_path_factory.mktemp("served")
    ckpt = _copy(small_checkpoint, root / "ckpt")
    c = ElasticEPCluster(small_config(ckpt, root, name="served"))
    c.start()
    yield c, ckpt, Path(small_checkpoint)
    c.shutdown()


def _serving(c, before=None):
    """Every slot verifies; with ``before``, nothing moved either."""
    st = c.status()
    ver = c.verify()
    assert ver.ok, ver
    if before is not None:
        assert st["layout"] == before["layout"] and st["epoch"] == before["epoch"]
    return st


def test_damaged_checkpoint_at_recovery_is_bridged_by_backups(served):
    c, ckpt, pristine = served
    _truncate(ckpt / SHARD2)
    try:
        c.kill(1)
        st = c.wait_healthy(timeout_s=90)
        rec = next(h for h in reversed(st["history"]) if h["reason"] == "recover")
        assert rec["bytes_from_checkpoint"] == 0 and rec["bytes_from_backup"] > 0
        assert st["lost"] == [] and st["unserved"] == []
        _serving(c)
        with pytest.raises(CheckpointError, match="model-00002-of-00002"):  # the damage is reported
            c.verify(against_checkpoint=True)
    finally:
        shutil.copy(pristine / SHARD2, ckpt / SHARD2)
    assert c.verify(against_checkpoint=True).ok


def test_damaged_checkpoint_at_recovery_without_backups(ray_local, small_checkpoint, tmp_path):
    ckpt = _copy(small_checkpoint, tmp_path / "ckpt")
    with ElasticEPCluster(small_config(ckpt, tmp_path, keep_backups=False, name="nobackup")) as c:
        before = c.status()
        _truncate(ckpt / SHARD2)
        c.kill(1)
        with pytest.raises(ExpertsLostError, match="model-00002-of-00002") as info:
            c.recover()
        lost = info.value.lost
        # Only what rank 1 alone held in the damaged shard's layer is lost; layers 0-1 were readable.
        held = ExpertLayout.from_dict(before["layout"])
        alone = {(2, int(e)) for e in held.experts_of(1)[2] if held.logcnt[2, e] == 1}
        assert set(map(tuple, lost)) == alone and alone
        st = c.status()
        assert sorted(map(tuple, st["lost"])) == sorted(alone) and "ExpertsLostError" in st["last_error"]
        assert st["layout"] == before["layout"] and st["epoch"] == before["epoch"]
        ver = c.verify()
        assert ver.num_bad == 0 and ver.ranks_unreachable == (1,)  # the survivors serve on, intact
        # Repaired: the same recovery now succeeds and nothing was lost for good.
        shutil.copy(Path(small_checkpoint) / SHARD2, ckpt / SHARD2)
        rep = c.recover()
        assert rep.epoch_to == before["epoch"] + 1
        st = c.wait_healthy(timeout_s=60)
        assert st["lost"] == [] and st["unserved"] == [] and st["last_error"] is None
        assert c.verify(against_checkpoint=True).ok


@pytest.mark.parametrize("make, match", [
    (lambda a: a.__setitem__((1, 2), np.nan) or a, r"load\[1, 2\] = nan is not finite"),
    (lambda a: a.__setitem__((0, 3), -5.0) or a, r"load\[0, 3\] = -5.0 is negative"),
    (lambda a: a[:2], r"load must have shape \[3, 12\], got \[2, 12\]"),
])
def test_bad_load_statistics(served, make, match):
    c = served[0]
    before = c.status()
    bad = make(np.ones((SMALL.num_layers, SMALL.num_experts)))
    with pytest.raises(LoadStatsError, match=match):
        c.report_load(bad)
    with pytest.raises(LoadStatsError, match=match):
        c.rebalance(bad)
    assert c.status()["load_reports"] == before["load_reports"]  # nothing recorded
    _serving(c, before)


def test_shrink_below_capacity(served):
    c = served[0]
    before = c.status()
    with pytest.raises(CapacityError, match=r"would leave 2 ranks x 4 slots = 8 slots for 12 logical experts"):
        c.shrink([0, 1])
    _serving(c, before)


def test_unknown_ranks_and_phases(served):
    c = served[0]
    before = c.status()
    with pytest.raises(UnknownRankError, match="no rank 99"):
        c.kill(99)
    with pytest.raises(UnknownRankError, match="no worker 'w999'"):
        c.kill("w999")
    with pytest.raises(UnknownRankError, match="no rank 99"):
        c.shrink([99])
    with pytest.raises(UnknownRankError, match="no rank 42"):
        c.arm_worker_fault(42, "idle")
    with pytest.raises(UnknownRankError, match="a rank is an int id"):
        c.kill(1.5)
    with pytest.raises(ValueError, match="unknown fault phase 'commit'"):
        c.arm_worker_fault(0, "commit")
    with pytest.raises(ValueError, match="unknown fault phase 'bogus'"):
        c.arm_controller_fault("bogus")
    with pytest.raises(ValueError, match="grow needs num_ranks >= 1, got 0"):
        c.grow(0)
    assert c.status()["dead"] == before["dead"]
    _serving(c, before)


def test_concurrent_rebalances_run_one_after_the_other(served):
    c = served[0]
    before = c.status()
    L, E = SMALL.num_layers, SMALL.num_experts
    hot_low = np.tile(1.0 / np.arange(1, E + 1) ** 2, (L, 1)) * 1e4  # experts 0.. hot
    hot_high = hot_low[:, ::-1].copy()  # experts ..11 hot
    reports, errors = [], []

    def call(load):
        try:
            reports.append(c.rebalance(load))
        except Exception as exc:  # noqa: BLE001 - surfaced by the asserts below
            errors.append(exc)

    threads = [threading.Thread(target=call, args=(load,)) for load in (hot_low, hot_high)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors and len(reports) == 2
    first, second = sorted(reports, key=lambda r: r["epoch_from"])
    assert first["epoch_from"] == before["epoch"]
    assert first["epoch_to"] == first["epoch_from"] + 1 == second["epoch_from"]
    assert second["epoch_to"] == second["epoch_from"] + 1
    assert first["finished_at"] <= second["started_at"]  # not interleaved
    assert c.status()["epoch"] == before["epoch"] + 2
    assert c.verify(against_checkpoint=True).ok
