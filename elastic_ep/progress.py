"""Progress bars in the driver for long work the controller does (start-up loads, backups, checkpoint reads).

The controller keeps ``progress: {step: (done, total)}`` up to date; a driver waiting on
one of its calls polls that dict and draws one tqdm bar per step it knows. Bars show
only on a terminal (tqdm's ``disable=None``) unless asked for.
"""

from __future__ import annotations

import time
from typing import Callable, Optional

POLL_S = 0.25  # how often the driver asks the controller for progress
# Controller step -> bar title (other steps, e.g. per-transfer waits, are too short to draw).
STEPS = {
    "start": "starting workers",
    "load": "loading experts (ranks)",
    "backup": "host backups (stores)",
    "checkpoint": "reading the checkpoint (layers)",
}


def _read(read_progress: Callable[[], dict]) -> dict:
    try:
        return dict(read_progress())
    except Exception:  # noqa: BLE001  bars are best effort; the call itself decides the outcome
        return {}


def wait_with_bars(submit: Callable[[], object], read_progress: Callable[[], dict], timeout_s: float,
                   show: Optional[bool] = None):
    """``ray.get(submit())`` within ``timeout_s``, drawing bars from ``read_progress()`` meanwhile.

    ``show``: True always draws, False never, None only on a terminal. Errors of the call
    propagate as ``ray.get`` raises them. Steps left over from earlier calls are skipped
    until they change.
    """
    import ray
    from tqdm.auto import tqdm

    if show is False:
        return ray.get(submit(), timeout=timeout_s)
    before = _read(read_progress)
    ref = submit()
    bars: dict = {}
    deadline = time.monotonic() + timeout_s
    try:
        finished = False
        while not finished and time.monotonic() < deadline:
            finished = bool(ray.wait([ref], timeout=min(POLL_S, max(0.0, deadline - time.monotonic())))[0])
            for step, (done, total) in _read(read_progress).items():
                if step not in STEPS or (step not in bars and before.get(step) == (done, total)):
                    continue
                if step not in bars:
                    bars[step] = tqdm(total=total, desc=STEPS[step], disable=None if show is None else not show,
                                      leave=False)
                bar = bars[step]
                bar.total = max(bar.total or 0, total)
                bar.update(done - bar.n)
        return ray.get(ref, timeout=max(0.01, deadline - time.monotonic()))
    finally:
        for bar in bars.values():
            bar.close()
