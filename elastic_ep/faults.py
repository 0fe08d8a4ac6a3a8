"""Fault injection: arm a process to die at a named phase, for chaos tests and users' drills."""

from __future__ import annotations

import enum
import os
import threading
from dataclasses import dataclass
from typing import Callable, Optional

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


class Step(str, enum.Enum):
    """The states of the controller's reconfiguration state machine, in order; also its fault phases and the
    report's phase names. A controller death on entering a step up to PERSIST rolls the reconfiguration
    back on restart; from COMMIT on (the new layout is durable) it rolls forward."""

    DETECT = "detect"  # ping every worker; mark the silent ones dead
    DECIDE = "decide"  # decide(): who serves which rank; start cold workers
    PLAN = "plan"  # the new layout and the transfer plan (pure)
    COMMUNICATORS = "communicators"  # groups holding every worker that moves weights
    TRANSFER = "transfer"  # peers, backups and the checkpoint into staging on every participant
    VERIFY = "verify"  # every staged slot against its expert's reference fingerprint
    PERSIST = "persist"  # the new layout written with pending_commit: the decision
    COMMIT = "commit"  # every participant makes its staging live; retired workers let go
    REPLENISH = "replenish"  # spares refilled, communicators re-formed, backups restored
    DONE = "done"


CONTROLLER_PHASES = tuple(s.value for s in Step if s is not Step.DONE)
ROLLED_FORWARD = tuple(s.value for s in (Step.COMMIT, Step.REPLENISH))  # a death here keeps the new layout

EXIT_CODE = 17


@dataclass(frozen=True)
class Fault:
    """Die at ``phase``, ``delay_s`` seconds after entering it (0: at once)."""

    phase: str
    delay_s: float = 0.0


class FaultInjector:
    """Holds the faults armed in this process and fires them (``os._exit``, as a crash would)."""

    def __init__(self, phases: tuple[str, ...], fire: Optional[Callable[[], None]] = None):
        self.phases = phases
        self._fire = fire or (lambda: os._exit(EXIT_CODE))  # tests hand in one that raises instead
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
            self._fire()
            return
        timer = threading.Timer(fault.delay_s, self._fire)
        timer.daemon = True
        timer.start()
