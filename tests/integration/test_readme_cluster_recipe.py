"""The README's "On a Ray cluster" commands, run as a new user types them: token auth stays on.

The commands are read from README.md and run by bash exactly as written (the final
`ray stop` excepted: it would stop every Ray on the machine, so the test stops its own
head instead). "A new user" is a fresh HOME (no ~/.ray/auth_token) and an environment
without any RAY_* variable; RAY_TMPDIR only moves Ray's session folder into the test's
own folder so nothing leaks. Every process the commands start stays in one process
group, which the test kills at the end.

One known Ray race is allowed for: right after `ray start --head` the dashboard answers
before the job agent has registered, and `ray job submit` fails with "No available agent
to submit job, please try again later". On exactly that message, and only then, the
submit line alone is run again, at most SUBMIT_ATTEMPTS times in all, SUBMIT_RETRY_S
apart (tests/integration/test_job_submission.py does the same); any other failure ends
the commands at once.
"""

from __future__ import annotations

import os
import re
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

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]

ROOT = Path(__file__).resolve().parents[2]
RECIPE_TIMEOUT_S = 360.0
DASHBOARD = "http://127.0.0.1:8265"  # the address the README's commands use
# GCS, dashboard and job-agent ports `ray start --head` takes by default; with 52365 held by another Ray
# the head's job agent never serves, and every submit fails with NO_AGENT however often it is retried.
DEFAULT_PORTS = (6379, 8265, 52365)
NO_AGENT = "No available agent to submit job, please try again later"  # Ray's message while the agent registers
SUBMIT_ATTEMPTS = 5
SUBMIT_RETRY_S = 3.0


def readme_cluster_commands() -> list[str]:
    """The shell lines of the README's first bash block under "## On a Ray cluster", minus `ray stop`."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## On a Ray cluster", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    lines = [line.strip() for line in block.splitlines()]
    return [line for line in lines if line and not line.startswith("#") and not line.startswith("ray stop")]


def recipe_script(commands: list[str]) -> str:
    """The commands as one bash script (``set -e``), the ``ray job submit`` line re-run only on NO_AGENT."""
    lines = ["set -e"]
    for command in commands:
        if not command.startswith("ray job submit"):
            lines.append(command)
            continue
        lines += [
            "n=0",
            "until out=$(exec 2>&1",  # the line on its own, so that a trailing comment stays a comment
            command,
            "); do",
            "  rc=$?; n=$((n + 1)); printf '%s\\n' \"$out\"",
            f"  case \"$out\" in *\"{NO_AGENT}\"*) ;; *) exit $rc ;; esac",
            f"  [ $n -lt {SUBMIT_ATTEMPTS} ] || exit $rc",
            f"  echo \"(the job agent has not registered yet: submitting again in {SUBMIT_RETRY_S:g} s)\"",
            f"  sleep {SUBMIT_RETRY_S:g}",
            "done",
            "printf '%s\\n' \"$out\"",
        ]
    return "\n".join(lines) + "\n"


def _port_taken(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _unauthenticated_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


def _kill_group_and_marker(pgid: int, marker: str) -> None:
    """SIGKILL the commands' process group and any process whose command line names ``marker``."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if marker in cmdline:
            try:
                os.kill(int(entry.name), signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_readme_cluster_recipe_runs_as_written_with_token_auth_on():
    commands = readme_cluster_commands()
    assert any(c.startswith("ray start --head") for c in commands), commands
    assert any(c.startswith("ray job submit") and "01_quickstart.py" in c for c in commands), commands
    busy = [p for p in DEFAULT_PORTS if _port_taken(p)]
    assert not busy, f"ports {busy} are taken by another Ray on this machine; the README's commands use the defaults"

    work = tempfile.mkdtemp(prefix="eep-rd-", dir="/tmp")  # short: Ray puts unix sockets under it
    home = Path(work) / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_") and k not in ("PYTHONPATH", "HOME")}
    env.update(
        HOME=str(home),  # a new user: no token file yet
        RAY_TMPDIR=work,  # Ray's session folder inside the test's own folder
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",  # the activated venv
    )
    script = recipe_script(commands)
    proc = subprocess.Popen(["bash", "-c", script], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        try:
            output, _ = proc.communicate(timeout=RECIPE_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            output = proc.communicate()[0]
            pytest.fail(f"the README's commands did not finish in {RECIPE_TIMEOUT_S}s:\n{output[-6000:]}")
        # The head is still up: a request without the token must be refused.
        status = _unauthenticated_status(f"{DASHBOARD}/api/jobs/")
    finally:
        _kill_group_and_marker(proc.pid, work)
        time.sleep(0.5)
        _kill_group_and_marker(proc.pid, work)
        shutil.rmtree(work, ignore_errors=True)
    assert proc.returncode == 0, f"the README's commands exited {proc.returncode}:\n{output[-6000:]}"
    for line in ("rebalance: epoch 0 -> 1", "balance (max/mean rank load): before", "QUICKSTART OK"):
        assert line in output, output[-6000:]  # the quickstart example's own checks, run as a job
    assert "FAILED" not in output
    assert status == 401, f"the head answered an unauthenticated request with {status}: token auth is off"
