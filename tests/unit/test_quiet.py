"""Ray's worker-death notices are hidden (and counted) inside quiet_worker_deaths; everything else passes."""

from __future__ import annotations

import sys

from ray._private.worker import print_worker_logs

from elastic_ep.quiet import SHOW_ENV, quiet_worker_deaths

NOTICE = ("A worker died or was killed while executing a task by an unexpected system error. To troubleshoot the "
          "problem, check the logs for the dead worker. Worker PID: {pid} Worker exit type: SYSTEM_ERROR")


def _ray_prints_a_death(pid: int) -> None:
    """What Ray's driver does when the raylet reports a death: its own printing call (after de-duplication)."""
    print_worker_logs({"lines": [NOTICE.format(pid=pid)], "pid": "raylet", "is_err": False}, sys.stdout)


def test_death_notices_are_counted_not_printed(capsys):
    with quiet_worker_deaths("test kills") as sink:
        print("before")
        _ray_prints_a_death(1234)
        print("between", end="")
        print(" and after")
        _ray_prints_a_death(5678)
    out, err = capsys.readouterr()
    assert sink.hidden == 2
    assert out == "before\nbetween and after\n"
    assert "hid 2 Ray notices of worker deaths caused by test kills" in err and f"{SHOW_ENV}=1" in err


def test_the_switch_shows_them_as_ray_prints_them(capsys, monkeypatch):
    monkeypatch.setenv(SHOW_ENV, "1")
    with quiet_worker_deaths():
        _ray_prints_a_death(4321)
    out, err = capsys.readouterr()
    assert "Worker PID: 4321" in out and "hid" not in err


def test_nothing_hidden_prints_no_summary(capsys):
    with quiet_worker_deaths():
        print("quiet run")
    out, err = capsys.readouterr()
    assert out == "quiet run\n" and err == ""
