"""`elastic-ep start | status | rebalance | verify | grow | drain | shrink | stop` against a real `ray start --head`.

Each command runs in its own process, as a person types it, and attaches to the
cluster by name; bad input (no cluster at the address, an unknown name, a drain of a
rank that does not exist, a shrink below capacity) must exit non-zero with a clear message and leave
the cluster as it was.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_job_submission import LocalHead, _free_port

from elastic_ep.storage import write_synthetic_checkpoint
from elastic_ep.testing import SMALL

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]

ROOT = Path(__file__).resolve().parents[2]
CLI_TIMEOUT_S = 150.0
SPEC_ARGS = ["--layers", str(SMALL.num_layers), "--experts", str(SMALL.num_experts), "--hidden", str(SMALL.hidden),
             "--intermediate", str(SMALL.intermediate), "--first-layer", "0"]


@pytest.fixture(scope="module")
def head():
    h = LocalHead()
    try:
        h.start()
        yield h
    finally:
        h.stop()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return str(write_synthetic_checkpoint(tmp_path_factory.mktemp("ckpt"), SMALL, num_shards=2))


def cli(head: LocalHead, *args: str, address: str | None = None,
        token_mode: bool = True) -> subprocess.CompletedProcess:
    """One `elastic-ep` command against the head (token auth on, as the head's env sets it, unless told)."""
    env = dict(head.env, PYTHONPATH=str(ROOT))
    if not token_mode:
        env.pop("RAY_AUTH_MODE")
    cmd = [sys.executable, "-m", "elastic_ep.cli", *args, "--address", address or f"127.0.0.1:{head.gcs_port}"]
    return subprocess.run(cmd, env=env, cwd=head.temp_dir, capture_output=True, text=True, timeout=CLI_TIMEOUT_S)


def ok(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 0, f"exit {done.returncode}\n--- stdout\n{done.stdout}\n--- stderr\n{done.stderr[-4000:]}"
    return done.stdout


def refused(done: subprocess.CompletedProcess, *words: str) -> str:
    """A bad input: exit 2, one error line naming the problem, no traceback."""
    assert done.returncode == 2, f"exit {done.returncode}\n{done.stdout}\n{done.stderr[-4000:]}"
    assert "Traceback" not in done.stderr, done.stderr[-4000:]
    for w in words:
        assert w in done.stderr, f"{w!r} not in {done.stderr[-2000:]}"
    return done.stderr


def status(head: LocalHead, name: str) -> dict:
    return json.loads(ok(cli(head, "status", "--name", name, "--json")))


def test_commands_attach_by_name_and_change_the_running_cluster(head, checkpoint, tmp_path):
    started = json.loads(ok(cli(head, "start", "--name", "opsx", "--checkpoint", checkpoint, *SPEC_ARGS,
                                "--ranks", "4", "--slots", "4", "--spares", "1", "--state-dir", str(tmp_path / "s"),
                                "--json")))
    assert started["cluster"].startswith("opsx-") and started["checkpoint_bytes"] > 0

    # The start command has exited: the cluster outlives it.
    text = ok(cli(head, "status", "--name", "opsx"))
    assert f"cluster {started['cluster']}: epoch 0, 4 ranks, 1 spares" in text and "all experts served" in text
    st = status(head, "opsx")
    assert st["cluster"] == started["cluster"] and sorted(st["ranks"]) == ["0", "1", "2", "3"]

    assert "rebalance: epoch 0 -> " in ok(cli(head, "rebalance", "--name", "opsx"))
    assert "-> OK" in ok(cli(head, "verify", "--name", "opsx", "--checkpoint"))

    grown = json.loads(ok(cli(head, "grow", "1", "--name", "opsx", "--json")))
    assert grown["added"] == [4]
    assert sorted(status(head, "opsx")["ranks"]) == ["0", "1", "2", "3", "4"]

    text = ok(cli(head, "drain", "4", "--name", "opsx"))
    assert "drain" in text or "shrink" in text
    assert "safe to terminate" in text and "NOT" not in text
    after = status(head, "opsx")
    assert sorted(after["ranks"]) == ["0", "1", "2", "3"]
    assert "-> OK" in ok(cli(head, "verify", "--name", "opsx"))

    # Too few slots left: refused with the numbers, nothing changed.
    refused(cli(head, "shrink", "0", "1", "--name", "opsx"), "CapacityError", "8 slots for 12 logical experts")
    refused(cli(head, "drain", "9", "--name", "opsx"), "no rank 9")
    assert status(head, "opsx")["epoch"] == after["epoch"]

    # A second cluster of the same name would make attaching ambiguous: refused.
    refused(cli(head, "start", "--name", "opsx", "--checkpoint", checkpoint, *SPEC_ARGS, "--ranks", "4", "--slots",
                "4"), "already runs")

    assert "stopped cluster" in ok(cli(head, "stop", "--name", "opsx"))
    refused(cli(head, "status", "--name", "opsx"), "no elastic-ep cluster named 'opsx'")


def test_bad_addresses_and_names_exit_with_a_clear_message(head):
    refused(cli(head, "status", address=f"127.0.0.1:{_free_port()}"), "no Ray cluster answers at")
    refused(cli(head, "status", address=head.address), "dashboard URL")
    refused(cli(head, "status", "--name", "nosuch"), "no elastic-ep cluster named 'nosuch'")
    # Ray 2.60 sends the token only in token mode: a client without it is told the fix.
    refused(cli(head, "status", token_mode=False), "export RAY_AUTH_MODE=token")
