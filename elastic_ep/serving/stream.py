"""A background serving stream: threads that call a MoEClient without pause, a sample checked against the oracle."""

from __future__ import annotations

from typing import Optional

import threading
from dataclasses import dataclass

import numpy as np
import torch

from ..storage import torch_dtype
from .oracle import output_tolerance


@dataclass(frozen=True)
class StreamConfig:
    """What the stream sends: ``tokens`` per call, ``top_k`` experts per token, every ``check_every``-th call checked."""

    tokens: int = 16  # tokens per layer call
    top_k: int = 2  # experts per token
    threads: int = 1  # serving threads, each its own loop over the layers
    check_every: int = 1  # 1: every call against the oracle; 0: none
    seed: int = 0


class ServingStream:
    """Serve random router decisions through every layer from background threads until ``stop()``.

    Each call records itself in the client's ServingLog (``client.log``) with ``wrong`` set when
    checked; exceptions other than the client's own errors stop the thread and are re-raised by ``stop()``.
    """

    def __init__(self, client, oracle=None, config: StreamConfig = StreamConfig()):
        self.client, self.oracle, self.config = client, oracle, config
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._errors: list[BaseException] = []
        self.wrong = 0
        self.failed = 0
        self.first_failure: Optional[str] = None  # why the first failed call failed (type and message)
        self.stopped = False
        self._lock = threading.Lock()

    def start(self) -> "ServingStream":
        for i in range(self.config.threads):
            t = threading.Thread(target=self._loop, args=(self.config.seed + 1000 * i,), daemon=True,
                                 name=f"serving-stream-{i}")
            t.start()
            self._threads.append(t)
        return self

    def stop(self, timeout_s: float = 60.0) -> None:
        """Stop the threads (each finishes its call in flight) and raise what broke one, if anything did."""
        self._stop.set()
        self.stopped = True
        for t in self._threads:
            t.join(timeout_s)
        alive = [t.name for t in self._threads if t.is_alive()]
        if alive:
            raise TimeoutError(f"serving threads {alive} did not stop within {timeout_s}s")
        if self._errors:
            raise self._errors[0]

    def __enter__(self) -> "ServingStream":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _check(self, layer: int, hidden: torch.Tensor, ids: np.ndarray, weights: np.ndarray):
        def wrong(out: torch.Tensor) -> bool:
            ref = self.oracle(layer, hidden, ids, weights)
            bad = float((out.float() - ref).abs().max()) > output_tolerance(ref, out.dtype)
            if bad:
                with self._lock:
                    self.wrong += 1
            return bad
        return wrong

    def _loop(self, seed: int) -> None:
        from ..errors import ServingError, ExpertsUnavailableError

        spec, cfg = self.client.spec, self.config
        rng = np.random.default_rng(seed)
        dtype = torch_dtype(spec)
        n = 0
        try:
            while not self._stop.is_set():
                for layer in range(spec.num_layers):
                    ids = np.argsort(rng.random((cfg.tokens, spec.num_experts)), axis=1)[:, :cfg.top_k]
                    weights = rng.random((cfg.tokens, cfg.top_k)).astype(np.float32)
                    hidden = torch.from_numpy(rng.standard_normal((cfg.tokens, spec.hidden)).astype(np.float32)).to(dtype)
                    checked = self.oracle is not None and cfg.check_every and n % cfg.check_every == 0
                    try:
                        self.client.moe(layer, hidden, ids, weights,
                                        check=self._check(layer, hidden, ids, weights) if checked else None)
                    except (ServingError, ExpertsUnavailableError) as exc:
                        with self._lock:
                            self.failed += 1  # recorded by the client as a failed call
                            self.first_failure = self.first_failure or f"{type(exc).__name__}: {exc}"
                    n += 1
        except BaseException as exc:  # noqa: BLE001 - re-raised by stop()
            self._errors.append(exc)


def summary_line(summary, wrong: int) -> str:
    """One line for a report: calls, wrong, failed, longest gap, steady p50/p99."""
    gap = summary.longest_gap.length_s if summary.longest_gap is not None else 0.0
    p50 = "n/a" if summary.steady_p50_s is None else f"{1e3 * summary.steady_p50_s:.1f}ms"
    p99 = "n/a" if summary.steady_p99_s is None else f"{1e3 * summary.steady_p99_s:.1f}ms"
    return (f"{summary.calls} calls, {wrong} wrong of {summary.checked_calls} checked, {summary.failed_calls} failed, "
            f"{summary.retried_tokens} tokens re-sent, longest gap {1e3 * gap:.0f}ms, steady p50 {p50} p99 {p99}")
