"""Fault injection: arm a process to die at a named phase, for chaos tests and users' drills."""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from typing import Optional

# Phases a worker passes through; arming one kills the worker there.
WORKER_PHASES = (
    "idle",  # right away
    "form_group",  # while communicators are being formed
    "transfer_send",  # mid-transfer, as a sender
    "transfer_recv",  # mid-transfer, as a receiver
    "fetch",  # while loading from backups or the checkpoint
    "staged",  # between staging and commit
    "load",  # while loading its slots at start or on takeover
)
# Phases the controller passes through during a rebalance. A controller death at or before
# "committing" rolls the reconfiguration back on restart; at "decided" (the new layout is
# durable, worker commits in flight) or "committed" it rolls forward.
CONTROLLER_PHASES = ("planned", "executing", "verified", "committing", "decided", "committed")

EXIT_CODE = 17


@dataclass(frozen=True)
class Fault:
    """Die at ``phase``, ``delay_s`` seconds after entering it (0: at once)."""

    phase: str
    delay_s: float = 0.0


class FaultInjector:
    """Holds the faults armed in this process and fires them (``os._exit``, as a crash would)."""

    def __init__(self, phases: tuple[str, ...]):
        self.phases = phases
        self._armed: dict[str, Fault] = {}
        self._lock = threading.Lock()

    def arm(self, phase: str, delay_s: float = 0.0) -> None:
        if phase not in self.phases:
            raise ValueError(f"unknown fault phase {phase!r}; known: {list(self.phases)}")
        if delay_s < 0:
            raise ValueError(f"delay_s must be >= 0, got {delay_s}")
        with self._lock:
            self._armed[phase] = Fault(phase, float(delay_s))
        if phase == "idle":
            self.hit("idle")

    def disarm(self, phase: Optional[str] = None) -> None:
        with self._lock:
            if phase is None:
                self._armed.clear()
            else:
                self._armed.pop(phase, None)

    def armed(self) -> list[str]:
        with self._lock:
            return sorted(self._armed)

    def hit(self, phase: str) -> None:
        """Called by the process as it enters ``phase``: dies now or after the armed delay."""
        with self._lock:
            fault = self._armed.pop(phase, None)
        if fault is None:
            return
        if fault.delay_s <= 0:
            os._exit(EXIT_CODE)
        timer = threading.Timer(fault.delay_s, os._exit, args=(EXIT_CODE,))
        timer.daemon = True
        timer.start()
