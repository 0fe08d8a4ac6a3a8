"""Keep Ray's per-kill "a worker died" notices off the terminal while kills are deliberate (chaos, demo, drills).

Ray's driver prints every worker death the raylet reports for its job to stdout
(``(raylet) A worker died or was killed ...``), whatever ``log_to_driver`` says: one
long paragraph per kill, which buries a chaos run's own report. Inside
``quiet_worker_deaths()`` those notices are counted instead of printed, and one line
at the end says how many were hidden and how to see them. Everything else passes.
Set ``ELASTIC_EP_SHOW_RAY_DEATHS=1`` to print them as Ray does.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
from typing import Iterator

# Ray 2.60's raylet notices for a worker that died (SIGKILL, os._exit, ray.kill mid-task).
DEATH_NOTICES = (
    "A worker died or was killed while executing a task",
    "The actor died unexpectedly before finishing this task",
)
SHOW_ENV = "ELASTIC_EP_SHOW_RAY_DEATHS"


class DeathNoticeFilter(io.TextIOBase):
    """A text stream that forwards every write to ``target`` except Ray's worker-death notices.

    Ray prints each notice as one ``print`` call: the notice in one write, then the
    newline in a second one, which is dropped too.
    """

    def __init__(self, target):
        super().__init__()
        self.target = target
        self.hidden = 0
        self._drop_newline = False

    def write(self, text: str) -> int:
        if any(n in text for n in DEATH_NOTICES):
            self.hidden += 1
            self._drop_newline = not text.endswith("\n")
            return len(text)
        if self._drop_newline and text == "\n":
            self._drop_newline = False
            return len(text)
        self._drop_newline = False
        return self.target.write(text)

    def flush(self) -> None:
        self.target.flush()

    def isatty(self) -> bool:
        return self.target.isatty()

    def fileno(self) -> int:
        return self.target.fileno()

    @property
    def encoding(self):
        return getattr(self.target, "encoding", "utf-8")


@contextlib.contextmanager
def quiet_worker_deaths(what: str = "deliberate kills") -> Iterator[DeathNoticeFilter]:
    """Hide Ray's worker-death notices on stdout for the block; print one summary line to stderr after it."""
    if os.environ.get(SHOW_ENV) == "1":
        yield DeathNoticeFilter(sys.stdout)  # counts nothing: nothing is routed through it
        return
    original = sys.stdout
    sink = DeathNoticeFilter(original)
    sys.stdout = sink
    try:
        yield sink
    finally:
        if sys.stdout is sink:
            sys.stdout = original
        if sink.hidden:
            print(f"(hid {sink.hidden} Ray notices of worker deaths caused by {what}; {SHOW_ENV}=1 shows them)",
                  file=sys.stderr, flush=True)
