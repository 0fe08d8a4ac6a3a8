"""`ray job submit` against a real local head node, as a user would run examples on a cluster.

The head runs in its own process group with its own temp dir and token, so the test
stops exactly that head and no other Ray cluster on the machine (`ray stop` would
kill them all). The repo reaches the job's workers only through the working_dir
upload: the package need not be installed.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

ROOT = Path(__file__).resolve().parents[2]
RAY = Path(sys.executable).with_name("ray")  # the venv's CLI, whatever is on PATH
HEAD_START_TIMEOUT_S = 60.0
JOB_TIMEOUT_S = 150.0
STOP_GRACE_S = 3.0
SUBMIT_ATTEMPTS = 3
# Kept out of the upload (Ray also honours .gitignore): it must stay small and fast.
UPLOAD_EXCLUDES = [".venv", ".venv-ci", ".git", ".whl", "*.whl", "**/__pycache__", ".pytest_cache", ".hypothesis"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _pids_using(marker: str) -> list[int]:
    """Pids of processes whose command line mentions ``marker`` (this head's temp dir)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmdline:
            pids.append(int(entry.name))
    return pids


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


class LocalHead:
    """A `ray start --head --block` in its own session; stop() kills only its processes."""

    def __init__(self) -> None:
        # Short path: Ray puts unix sockets under it (108-byte limit).
        self.temp_dir = tempfile.mkdtemp(prefix="eep-ray-", dir="/tmp")
        self.dashboard_port = _free_port()
        self.agent_port = _free_port()
        self.gcs_port = _free_port()  # `ray start --address` / ray.init address: 127.0.0.1:<gcs_port>
        self.address = f"http://127.0.0.1:{self.dashboard_port}"
        self.token = secrets.token_hex(32)
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_") and k != "PYTHONPATH"}
        env.update(
            RAY_AUTH_MODE="token",  # cluster and client must agree (Ray 2.60 defaults differ)
            RAY_AUTH_TOKEN=self.token,  # this cluster's own token; ~/.ray/auth_token untouched
            PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",  # `python` in entrypoints
        )
        self.env = env
        self.log_path = Path(self.temp_dir) / "ray_start.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        cmd = [
            str(RAY), "start", "--head", "--block",
            "--num-cpus=2", "--disable-usage-stats",
            "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
            f"--port={self.gcs_port}", f"--temp-dir={self.temp_dir}",
            # Ports that default to fixed numbers: a second Ray on the machine (another
            # test's ray.init()) holding 52365 leaves this head's job agent without HTTP,
            # and every submission then fails with "No available agent".
            f"--dashboard-agent-listen-port={self.agent_port}",
            f"--ray-client-server-port={_free_port()}",
        ]  # fmt: skip
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + HEAD_START_TIMEOUT_S
        self._wait_for_jobs_api(deadline)
        self._wait_for_agent(deadline)

    def _wait_for_jobs_api(self, deadline: float) -> None:
        """Poll the dashboard's job API (with the token) until it answers 200."""
        request = urllib.request.Request(
            f"{self.address}/api/jobs/", headers={"Authorization": f"Bearer {self.token}"}
        )
        last = "no answer"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray start exited with {self.proc.returncode}:\n{self.log()}")
            try:
                with urllib.request.urlopen(request, timeout=2) as resp:
                    if resp.status == 200:
                        return
                    last = f"HTTP {resp.status}"
            except (urllib.error.URLError, OSError) as exc:
                last = repr(exc)
            time.sleep(0.5)
        raise TimeoutError(f"dashboard not ready after {HEAD_START_TIMEOUT_S} s ({last}):\n{self.log()}")

    def _wait_for_agent(self, deadline: float) -> None:
        """Wait until the job agent's HTTP port accepts connections (jobs are run through it)."""
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.agent_port), timeout=1):
                    return
            except OSError:
                time.sleep(0.5)
        raise TimeoutError(f"job agent not listening on {self.agent_port}:\n{self.log()}")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def stop(self) -> None:
        """SIGTERM this head's process group, SIGKILL it after a grace period, sweep its temp dir.

        The raylet and `ray start --block` outlive SIGTERM for 20 s and more, so the grace
        period is short: nothing of this throwaway cluster needs a clean shutdown.
        """
        if self.proc is not None:
            for sig, grace_s in ((signal.SIGTERM, STOP_GRACE_S), (signal.SIGKILL, 10.0)):
                try:
                    os.killpg(self.proc.pid, sig)
                except ProcessLookupError:
                    break  # the group is gone
                try:
                    self.proc.wait(timeout=grace_s)
                except subprocess.TimeoutExpired:
                    continue
                if not _group_alive(self.proc.pid):
                    break
        for pid in _pids_using(self.temp_dir):  # anything that left the group
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(self.temp_dir, ignore_errors=True)


@pytest.fixture
def local_head():
    head = LocalHead()
    try:
        head.start()
        yield head
    finally:
        head.stop()


def _submit(head: LocalHead, entrypoint: list[str]) -> tuple[subprocess.CompletedProcess, float]:
    """`ray job submit` and wait; retried while the head's job agent is still starting.

    The dashboard answers before the agent has registered its address, and the job API
    waits only 10 s for it, which a loaded 2-core machine can exceed.
    """
    cmd = [
        str(RAY), "job", "submit",
        "--address", head.address,
        "--working-dir", str(ROOT),
        "--runtime-env-json", json.dumps({"excludes": UPLOAD_EXCLUDES}),
        "--", *entrypoint,
    ]  # fmt: skip
    start = time.perf_counter()
    for _ in range(SUBMIT_ATTEMPTS):
        left_s = JOB_TIMEOUT_S - (time.perf_counter() - start)
        done = subprocess.run(cmd, env=head.env, cwd=head.temp_dir, capture_output=True, text=True, timeout=left_s)
        if done.returncode == 0 or "No available agent" not in done.stdout + done.stderr:
            break
        time.sleep(2.0)
    return done, time.perf_counter() - start


def test_hello_job_runs_from_uploaded_working_dir(local_head: LocalHead) -> None:
    done, took_s = _submit(local_head, ["python", "examples/00_hello_job.py"])
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"ray job submit exited {done.returncode} after {took_s:.1f} s:\n{output[-6000:]}"
    lines = [line for line in output.splitlines() if "HELLO-JOB OK" in line]
    assert lines, f"no HELLO-JOB OK line in:\n{output[-6000:]}"
    assert "layers=12" in lines[-1]
    # The workers imported elastic_ep from the upload, unpacked under this head's temp dir.
    package = lines[-1].split("elastic_ep=")[1].split()[0]
    assert package.startswith(os.path.realpath(local_head.temp_dir)) or package.startswith(local_head.temp_dir), package
    assert not package.startswith(str(ROOT)), package
