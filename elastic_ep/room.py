"""How many more workers fit in the resources Ray says are free (pure): the ``startable`` of a ClusterView.

A resource request (an *ask*) is a {resource name: amount} dict, e.g. {"GPU": 0.5, "CPU": 1.0}
for a worker on half a GPU. Workers start in order, so the count is of a prefix of the asks.
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

# Ray keeps resource amounts in fixed point (1e-4 units): a smaller shortfall is rounding.
TOLERANCE = 1e-6


def add_asks(asks: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """The sum of several asks, per resource."""
    out: dict[str, float] = {}
    for ask in asks:
        for k, v in ask.items():
            out[k] = out.get(k, 0.0) + float(v)
    return out


def workers_that_fit(free: Mapping[str, float], asks: Sequence[Mapping[str, float]]) -> Optional[int]:
    """How many of ``asks`` (in start order) fit in ``free`` together; None when none asks for anything.

    Totals only: free resources split across nodes or GPUs may hold fewer (Ray then queues the
    rest), so a refusal based on this count is never wrong, only sometimes missing.
    """
    if not any(v > 0 for ask in asks for v in ask.values()):
        return None
    left = {k: float(v) for k, v in free.items()}
    n = 0
    for ask in asks:
        if any(left.get(k, 0.0) + TOLERANCE < v for k, v in ask.items()):
            break
        for k, v in ask.items():
            left[k] = left.get(k, 0.0) - v
        n += 1
    return n


def describe_room(free: Mapping[str, float], freed: Mapping[str, float], ask: Mapping[str, float], fit: int) -> str:
    """The numbers behind a count, for a refusal: what is free, what dead workers still hold, what one asks.

    >>> describe_room({"GPU": 1.0, "CPU": 6.0}, {"GPU": 1.0, "CPU": 1.0}, {"GPU": 1.0, "CPU": 1.0}, 2)
    'Ray has 1 GPU, 6 CPU free (+1 GPU, 1 CPU that dead workers hold until Ray releases them): room for 2 more workers asking 1 GPU, 1 CPU each'
    """
    keys = [k for k in ("GPU", "CPU") if k in ask] + sorted(k for k in ask if k not in ("GPU", "CPU"))

    def amounts(d: Mapping[str, float]) -> str:
        return ", ".join(f"{float(d.get(k, 0.0)):g} {k}" for k in keys)

    held = f" (+{amounts(freed)} that dead workers hold until Ray releases them)" if any(
        freed.get(k, 0.0) > 0 for k in keys) else ""
    return f"Ray has {amounts(free)} free{held}: room for {fit} more workers asking {amounts(ask)} each"
