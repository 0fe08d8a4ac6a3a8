"""HealthMonitor: holds a pending ``watch`` call on every live worker; tells a callback when one dies."""

from __future__ import annotations

import threading
from typing import Callable, Optional

import ray
from ray.exceptions import RayError


class HealthMonitor:
    """A daemon thread that notices deaths within milliseconds of the process going away.

    ``wanted()`` gives {worker id: actor handle} of the workers to watch now;
    ``on_death(wid)`` is called once per death noticed; ``on_tick()`` after every wait
    (where the owner decides whether to start a recovery). Imports nothing of the controller.
    """

    def __init__(self, wanted: Callable[[], dict], on_death: Callable[[str], None], on_tick: Callable[[], None]):
        self._wanted = wanted
        self._on_death = on_death
        self._on_tick = on_tick
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def start(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        self._thread = threading.Thread(target=self._loop, name="eep-monitor", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _loop(self) -> None:
        pending: dict = {}  # ObjectRef of a pending watch call -> worker id
        while not self._stop.is_set():
            for wid, handle in self._wanted().items():
                if wid not in pending.values():
                    pending[handle.watch.remote()] = wid
            if not pending:
                self._stop.wait(0.2)
                continue
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=0.5)
            for ref in ready:
                wid = pending.pop(ref)
                try:
                    ray.get(ref, timeout=0)
                except RayError:
                    self._on_death(wid)
            self._on_tick()
