"""CommunicatorGroups: the collective groups of one communicator generation, formed over the workers."""

from __future__ import annotations

import time
from typing import Optional

import ray
from ray.exceptions import RayError

from elastic_ep.errors import ConfigError

from .ray_workers import RayWorkerGroup


def _now() -> float:
    return time.perf_counter()


class CommunicatorGroups:
    """Forms, finds and replaces the groups workers exchange experts over.

    Each formation is a new *generation* (its number is part of every group name), held
    by the TCP store this object serves; after a controller restart the generation moves
    on (the old store died with the old controller).
    """

    def __init__(self, workers: RayWorkerGroup, prefix: str, transfer_timeout_s: float, call_timeout_s: float,
                 generation: int = 0):
        from elastic_ep.transport import StoreServer

        self.workers = workers
        self.prefix = prefix
        self.transfer_timeout_s = transfer_timeout_s
        self.call_timeout_s = call_timeout_s
        self.store = StoreServer()
        self.generation = generation
        self.groups: dict[str, list[str]] = {}  # group name -> worker ids in group-rank order
        self.ok = True  # False once an attempt failed: the current groups may be broken

    def _sets(self) -> list[list[str]]:
        """Member sets for this generation's groups: no two members of a set share a GPU.

        The main set holds every rank (and spares on GPUs of their own); each spare that
        shares a GPU with a rank gets a set of its own: the main set minus that rank, plus
        the spare, so that when the rank dies the spare's communicators already exist.
        """
        w = self.workers
        members, spares = w.live(sorted(w.members.values())), w.live(w.spares)
        main, used = list(members), {}
        for x in members:  # NCCL refuses two ranks of one communicator on one GPU (ncclInvalidUsage)
            key = w.device_key(x)
            if key in used:
                raise ConfigError(f"workers {used[key]} and {x} serve two ranks on one GPU ({key}): NCCL needs a GPU "
                                  "per rank; use num_ranks <= GPUs (hot spares may share a rank's GPU)")
            used[key] = x
        shared = []
        for s in spares:
            key = w.device_key(s)
            if key in used:
                shared.append(s)
            else:
                main.append(s)
                used[key] = s
        sets = [sorted(main)]
        for s in shared:
            key = w.device_key(s)
            sets.append(sorted([x for x in main if w.device_key(x) != key] + [s]))
        return sets

    def form(self, exactly: Optional[list[str]] = None) -> float:
        """Fresh groups for a new generation (see ``_sets``), or one group of ``exactly`` these workers."""
        from elastic_ep.transport import group_name_for

        t0 = _now()
        self.generation += 1
        base = group_name_for(self.prefix, self.generation)
        sets = [sorted(exactly)] if exactly is not None else self._sets()
        host, port = self.store.address
        formed: dict[str, list[str]] = {}
        for k, wids in enumerate(sets):
            if len(wids) < 2 and exactly is None:
                continue
            name = f"{base}-{k}"
            calls = {w: (w, "form_group", (name, len(wids), i, host, port, self.transfer_timeout_s))
                     for i, w in enumerate(wids)}
            self._await_formation(name, calls, self.transfer_timeout_s + self.call_timeout_s)
            formed[name] = wids
        if exactly is None:
            keep = list(formed)
            for w in {w for ws in formed.values() for w in ws}:
                self.workers.submit(w, "leave_groups", keep)
            self.groups = formed
        else:
            self.groups.update(formed)
        self.ok = True
        return _now() - t0

    def _await_formation(self, name: str, calls: dict, timeout_s: float) -> None:
        """Wait for every member's ``form_group``; raise TransferError if any failed.

        At the first failure (typically a member that died before joining) the formation is
        abandoned in the store, so the members still waiting for it give up within ms
        instead of waiting out the transfer timeout; the caller then re-plans.
        """
        refs = {w: (w, self.workers.submit(w, m, *args)) for w, (_, m, args) in calls.items()}
        deadline = _now() + timeout_s
        pending = {ref: wid for wid, (_, ref) in refs.items()}
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=max(0.01, deadline - _now()))
            if not ready:
                break  # past the deadline: wait_all below names who
            wid = pending.pop(ready[0])
            try:
                ray.get(ready[0], timeout=max(0.01, deadline - _now()))
            except RayError as exc:
                self.store.abandon(name, f"worker {wid} failed to join: {type(exc).__name__}")
                break
        self.workers.wait_all(refs, max(0.01, deadline - _now()), f"form_group {name}")

    def group_for(self, wids: set[str]) -> Optional[str]:
        """A formed group holding every worker in ``wids``, if any."""
        for name, members in self.groups.items():
            if wids <= set(members):
                return name
        return None

    def close(self) -> None:
        self.store.close()
