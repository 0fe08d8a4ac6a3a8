"""ray_cluster.yaml passes Ray's own cluster-config validation and says what the project needs.

Validation is what `ray up` runs before it calls the cloud: the JSON schema and
cross-field checks of `validate_config`, on the raw file and after `prepare_config`
(defaults merged, head/worker setup commands expanded). Nothing here needs AWS.
"""

from __future__ import annotations

import copy
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[2]
CONFIG_PATH = ROOT / "ray_cluster.yaml"


@pytest.fixture(scope="module")
def raw() -> dict:
    with open(CONFIG_PATH) as f:
        return yaml.safe_load(f)


@pytest.fixture
def config(raw: dict) -> dict:
    return copy.deepcopy(raw)


@pytest.fixture(scope="module")
def prepared(raw: dict) -> dict:
    """The config as `ray up` holds it just before contacting the provider."""
    out = prepare_config(copy.deepcopy(raw))
    validate_config(out)
    return out


def _head(config: dict) -> dict:
    return config["available_node_types"][config["head_node_type"]]


def _workers(config: dict) -> dict[str, dict]:
    return {k: v for k, v in config["available_node_types"].items() if k != config["head_node_type"]}


# -- Ray's validation -------------------------------------------------------------------


def test_raw_file_passes_ray_validation(config: dict) -> None:
    validate_config(config)


def test_prepared_config_passes_ray_validation(prepared: dict) -> None:
    assert prepared["provider"]["type"] == "aws"
    assert prepared["head_node_type"] in prepared["available_node_types"]


# -- what elastic-ep needs from the cluster -------------------------------------------


def test_head_has_no_gpus(prepared: dict) -> None:
    head = _head(prepared)
    assert head["resources"].get("GPU", 0) == 0, head["resources"]
    assert head["max_workers"] == 0
    start = " ".join(prepared["head_start_ray_commands"])
    assert "--head" in start and "--num-gpus=0" in start


def test_a_worker_type_has_gpus(prepared: dict) -> None:
    gpus = {name: t["resources"].get("GPU", 0) for name, t in _workers(prepared).items()}
    assert any(isinstance(n, int) and n > 0 for n in gpus.values()), gpus
    start = " ".join(prepared["worker_start_ray_commands"])
    assert "--num-gpus=0" not in start  # workers advertise the GPUs they have


def test_max_workers_are_consistent(prepared: dict) -> None:
    workers = _workers(prepared)
    total_min = sum(t.get("min_workers", 0) for t in workers.values())
    assert 0 <= total_min <= prepared["max_workers"]
    for name, t in workers.items():
        assert 0 <= t["min_workers"] <= t["max_workers"] <= prepared["max_workers"], name
    assert any(t["max_workers"] > 0 for t in workers.values())


def test_every_node_installs_elastic_ep_after_pinned_torch(prepared: dict) -> None:
    for key in ("head_setup_commands", "worker_setup_commands"):  # setup_commands merged in
        cmds = prepared[key]
        torch_at = next(i for i, c in enumerate(cmds) if "pip install" in c and '"torch==' in c)
        eep_at = next(i for i, c in enumerate(cmds) if "pip install" in c and "elastic-ep" in c)
        assert torch_at < eep_at, f"{key}: torch must be pinned before elastic-ep resolves it"
    assert any("elastic-ep[gpu]" in c for c in prepared["worker_setup_commands"])
    assert "~/elastic-ep" in prepared["file_mounts"]


def test_nodes_share_token_auth_and_nccl_settings(raw: dict) -> None:
    env_cmd = " ".join(raw["setup_commands"])
    for var in ("RAY_AUTH_MODE=token", "NCCL_SOCKET_IFNAME=", "TORCH_NCCL_ASYNC_ERROR_HANDLING="):
        assert var in env_cmd, var
    assert "~/.ray/auth_token" in raw["file_mounts"]
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = [c for c in raw[key] if "ray start" in c]
        assert start and all("elastic-ep.env" in c for c in start), key
    assert any("$RAY_HEAD_IP" in c for c in raw["worker_start_ray_commands"])


# -- validation does reject bad configs ------------------------------------------------


def test_misspelled_top_level_key_fails(config: dict) -> None:
    config["max_worker"] = config.pop("max_workers")
    with pytest.raises(jsonschema.ValidationError, match="max_worker"):
        validate_config(config)


def test_wrong_type_fails(config: dict) -> None:
    _head(config)["resources"]["GPU"] = "none"
    with pytest.raises(jsonschema.ValidationError):
        validate_config(config)


def test_min_workers_above_global_max_fails(config: dict) -> None:
    config["max_workers"] = 0
    with pytest.raises(ValueError, match="max_workers"):
        validate_config(config)


def test_unknown_head_node_type_fails(config: dict) -> None:
    config["head_node_type"] = "head.gpu"
    with pytest.raises(ValueError, match="head_node_type"):
        validate_config(config)
