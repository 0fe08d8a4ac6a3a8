"""How a round fails: the internal error, classifying backend messages, bounded calls, disposal."""

from __future__ import annotations

import logging
import threading

from ..errors import TransferTimeoutError

logger = logging.getLogger(__name__)

JOIN_SLACK_S = 0.5  # grace past a deadline for helper threads to report before we give up on them
_DISPOSE_WAIT_S = 1.0  # destroy_group waits at most this long for a process group to be released

_PEER_CLOSED_MARKERS = (
    "connection closed by peer",
    "connection reset by peer",
    "broken pipe",
    "econnreset",
    "epipe",
    "remote process exited",
    "remote peer",
    "ncclremoteerror",
)
_TIMEOUT_MARKERS = ("timed out", "timeout")


class RoundFailed(Exception):
    """Internal: one round failed; ``exchange`` turns it into a public error."""

    def __init__(self, cause: str, peers: set[int], detail: str):
        super().__init__(detail)
        self.cause = cause  # "timeout" | "peer_died" | "aborted" | "failed"
        self.peers = peers
        self.detail = detail


def classify(message: str) -> str:
    text = message.lower()
    if any(marker in text for marker in _PEER_CLOSED_MARKERS):
        return "peer_died"
    if any(marker in text for marker in _TIMEOUT_MARKERS):
        return "timeout"
    return "failed"


def short(message: str, limit: int = 300) -> str:
    """One line, without gloo's source-location prefix, at most ``limit`` characters."""
    message = " ".join(str(message).split())
    if message.startswith("[") and "] " in message:
        message = message.split("] ", 1)[1]
    return message if len(message) <= limit else message[: limit - 3] + "..."


def run_bounded(fn, timeout_s: float, what: str):
    """Run ``fn()`` in a daemon thread; return its result, or raise TransferTimeoutError after ``timeout_s``.

    A call that never returns is left behind in its thread (it cannot be cancelled).
    """
    box: dict[str, object] = {}

    def target() -> None:
        try:
            box["result"] = fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=target, name=f"eep-{what}", daemon=True)
    thread.start()
    thread.join(max(timeout_s, 0.0))
    if thread.is_alive():
        raise TransferTimeoutError(f"{what} did not finish within {timeout_s:.1f} s")
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box.get("result")


def dispose(pg, what: str) -> None:
    """Abort ``pg`` and drop the last reference in a daemon thread; wait at most ``_DISPOSE_WAIT_S``.

    Dropping a process group runs its C++ destructor, which can block (for gloo, until a stuck
    collective times out); doing it in a thread keeps ``destroy_group`` from ever hanging.
    """
    holder = [pg]
    del pg

    def release() -> None:
        group = holder.pop()
        try:
            group.abort()
        except Exception as exc:  # noqa: BLE001 - best effort: the group is being dropped anyway
            logger.debug("%s: abort failed: %s", what, exc)
        del group

    thread = threading.Thread(target=release, name=f"eep-dispose-{what}", daemon=True)
    thread.start()
    thread.join(_DISPOSE_WAIT_S)
    if thread.is_alive():
        logger.warning(
            "%s: process group still releasing after %.1f s; left to a background thread", what, _DISPOSE_WAIT_S
        )

