"""WorkerGroup: the one interface to the workers (spawn, call all with one deadline, kill, ping) and their records."""

from __future__ import annotations

import enum
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, replace
from typing import Any, Optional

from elastic_ep.errors import ElasticEPError, TransferError
from elastic_ep.replies import WorkerPing
from elastic_ep.room import add_asks, describe_room, workers_that_fit


class Lifecycle(str, enum.Enum):
    """Where a worker is in its life; a dead worker keeps its role until a decision replaces it."""

    LIVE = "live"
    DEAD = "dead"
    RELEASED = "released"  # let go on purpose (shrink beyond the spare pool, drain): its death is no failure


@dataclass(frozen=True)
class WorkerRecord:
    """Everything the controller knows of one worker; persisted and restored as one list.

    role: "member" (serves ``rank``), "spare", or None (retired, being let go).
    device_key: "node:gpus" on GPUs (two members of one NCCL group never share one), else the id.
    """

    worker_id: str
    node: int  # logical node it was asked for
    state: Lifecycle = Lifecycle.LIVE
    role: Optional[str] = None
    rank: Optional[int] = None
    gpu_share: float = 1.0
    device_key: Optional[str] = None
    spare_order: int = 0  # spares are taken in this order (start order, then order of joining)
    died_at: Optional[float] = None  # wall clock the death was noticed
    share_reused: bool = False  # a later worker took the GPU share this dead one left free

    def to_dict(self) -> dict:
        return {**asdict(self), "state": self.state.value}

    @classmethod
    def from_dict(cls, d: dict) -> "WorkerRecord":
        return cls(**{**d, "state": Lifecycle(d["state"])})


Call = tuple[str, str, tuple]  # (worker id, method name, positional args)


class WorkerGroup(ABC):
    """The workers of one cluster. Only this class talks to worker processes and marks one dead.

    Membership views (``members``, ``spares``, ``dead``) are derived from the records, so
    each fact lives in one place. Subclasses implement how a worker is started, called,
    killed and pinged; ``RayWorkerGroup`` (actors/ray_workers.py) with Ray actors, tests with
    in-process objects.
    """

    def __init__(self, records: Optional[list[WorkerRecord]] = None, next_worker: int = 0):
        self._lock = threading.RLock()
        self.records: dict[str, WorkerRecord] = {r.worker_id: r for r in (records or [])}
        self.next_worker = next_worker
        self._order = max([r.spare_order for r in self.records.values()] + [0]) + 1
        self.first_death: Optional[float] = None  # the earliest death not yet healed (for reports)

    # -- what subclasses provide ---------------------------------------------------------------

    @abstractmethod
    def _spawn(self, wid: str, node: int, gpu_share: float) -> None:
        """Start worker ``wid`` on logical ``node`` (returns at once; ``wait_started`` waits)."""

    @abstractmethod
    def wait_started(self, wids: list[str], timeout_s: float) -> None:
        """Wait until every worker answers; raise WorkerStartupError naming the ones that did not."""

    @abstractmethod
    def call_all(self, calls: dict[Any, Call], timeout_s: float, what: str, tolerate_dead: bool = False,
                 typed: Optional[list] = None) -> dict:
        """Run ``calls`` {key: (worker id, method, args)} at once, with one deadline; {key: result} of those that
        answered. A worker that died is marked dead. Failures raise TransferError unless ``tolerate_dead``; a
        typed error (an ElasticEPError other than TransferError) goes to ``typed`` as (key, error) when given,
        else is raised once every call is done."""

    @abstractmethod
    def probe(self, wids: list[str], timeout_s: float, restart_wait_s: float = 0.0) -> set[str]:
        """Ping ``wids`` with one deadline; mark those that do not answer dead. With ``restart_wait_s`` a worker
        Ray is restarting is waited for that long; one that comes back empty (epoch < 0) is marked alive and
        returned (it takes its rank back empty)."""

    @abstractmethod
    def kill(self, wid: str, restart: bool = False) -> None:
        """Kill a worker's process (returns once it is gone unless ``restart``)."""

    @abstractmethod
    def ping(self, wid: str, timeout_s: float) -> Optional[WorkerPing]:
        """The worker's ping reply (elastic_ep.replies.WorkerPing), or None if it is dead or did not answer in time."""

    @abstractmethod
    def submit(self, wid: str, method: str, *args):
        """Start one call without waiting for it (background work); a handle to wait on later."""

    @abstractmethod
    def handle(self, wid: str):
        """What a caller outside the controller uses to reach the worker (an ActorHandle on Ray)."""

    def reattach(self, wids: list[str]) -> None:
        """After a controller restart: reconnect to these workers (mark dead those that are gone)."""

    def shutdown(self) -> None:
        """Stop every worker."""

    # -- records -----------------------------------------------------------------------------------

    def spawn(self, node: int, fractions: Optional[tuple[float, ...]] = None) -> str:
        """Start a new worker (no role yet) on logical ``node``; returns its id.

        Its GPU share: the configured fraction for its index at start; later, the share a
        dead worker left free (so a replacement lands where the dead one was), else one GPU.
        """
        with self._lock:
            wid = f"w{self.next_worker}"
            ((gpu_share, reused),) = self._next_shares(1, fractions)
            self.next_worker += 1
            if reused is not None:
                self._update(reused, share_reused=True)
            self.records[wid] = WorkerRecord(wid, node=int(node), gpu_share=float(gpu_share))
        self._spawn(wid, node, gpu_share)
        return wid

    def _next_shares(self, n: int, fractions: Optional[tuple[float, ...]]) -> list[tuple[float, Optional[str]]]:
        """(GPU share, id of the dead worker whose share it reuses or None) of the next ``n`` spawns."""
        with self._lock:
            freed = [r.worker_id for r in self.records.values() if r.state is Lifecycle.DEAD and not r.share_reused]
            out = []
            for index in range(self.next_worker, self.next_worker + n):
                if fractions is not None and index < len(fractions):
                    out.append((float(fractions[index]), None))
                elif freed:
                    wid = freed.pop(0)
                    out.append((self.records[wid].gpu_share, wid))
                else:
                    out.append((1.0, None))
            return out

    def free_resources(self) -> Optional[tuple[dict[str, float], bool]]:
        """({resource: amount free now}, whether workers are pinned to nodes); None: no limit known."""
        return None

    def ask(self, gpu_share: float, pinned: bool) -> dict[str, float]:
        """The resources one worker with ``gpu_share`` asks for ({} : nothing)."""
        return {}

    def room(self, n: int, fractions: Optional[tuple[float, ...]] = None) -> tuple[Optional[int], str]:
        """How many of the next ``n`` workers may be started now (None: no limit known), and the numbers why.

        Resources of dead workers that still hold a role (members and spares a decision has not
        replaced yet) count as free: Ray releases them once it notices the death, so a
        replacement is never refused for what its dead predecessor still holds.
        """
        got = self.free_resources()
        if got is None:
            return None, ""
        free, pinned = got
        asks = [self.ask(share, pinned) for share, _ in self._next_shares(n, fractions)]
        with self._lock:
            held = [r for r in self.records.values() if r.state is Lifecycle.DEAD and r.role is not None]
        freed = add_asks([self.ask(r.gpu_share, pinned) for r in held])
        fit = workers_that_fit(add_asks([free, freed]), asks)
        if fit is None:
            return None, ""
        return fit, describe_room(free, freed, asks[0], fit)

    def _update(self, wid: str, **changes) -> None:
        with self._lock:
            self.records[wid] = replace(self.records[wid], **changes)

    def forget(self, wid: str) -> None:
        with self._lock:
            self.records.pop(wid, None)

    @property
    def members(self) -> dict[int, str]:
        """rank -> worker id (dead members included until a decision replaces them)."""
        with self._lock:
            return {r.rank: w for w, r in self.records.items() if r.role == "member"}

    @property
    def spares(self) -> list[str]:
        """Spare worker ids in the order they are taken (dead ones included until replenished)."""
        with self._lock:
            recs = sorted((r for r in self.records.values() if r.role == "spare"), key=lambda r: r.spare_order)
            return [r.worker_id for r in recs]

    @property
    def dead(self) -> frozenset:
        with self._lock:
            return frozenset(w for w, r in self.records.items() if r.state is Lifecycle.DEAD)

    def is_dead(self, wid: str) -> bool:
        rec = self.records.get(wid)
        return rec is not None and rec.state is Lifecycle.DEAD

    def live(self, wids) -> list[str]:
        return [w for w in wids if not self.is_dead(w)]

    def set_members(self, members: dict[int, str]) -> None:
        """Make exactly these workers the members; former members not named lose their role."""
        with self._lock:
            named = set(members.values())
            for wid, rec in list(self.records.items()):
                if rec.role == "member" and wid not in named:
                    self.records[wid] = replace(rec, role=None, rank=None)
            for rank, wid in members.items():
                self._update(wid, role="member", rank=int(rank))

    def set_spares(self, spares: list[str]) -> None:
        """Make exactly these workers the spares, in this order."""
        with self._lock:
            for wid, rec in list(self.records.items()):
                if rec.role == "spare" and wid not in spares:
                    self.records[wid] = replace(rec, role=None)
            for wid in spares:
                rec = self.records[wid]
                if rec.role != "spare":
                    self.records[wid] = replace(rec, role="spare", rank=None, spare_order=self._order)
                    self._order += 1

    def mark_dead(self, wid: str) -> bool:
        """Record a death (the only place one is recorded); False if already dead, released or unknown."""
        with self._lock:
            rec = self.records.get(wid)
            if rec is None or rec.state is not Lifecycle.LIVE:
                return False
            now = time.time()
            self.records[wid] = replace(rec, state=Lifecycle.DEAD, died_at=now)
            self.first_death = self.first_death or now
            return True

    def mark_alive(self, wid: str) -> None:
        """A worker Ray restarted in place (state lost) is live again."""
        self._update(wid, state=Lifecycle.LIVE, died_at=None)

    def release(self, wid: str) -> None:
        """Let a worker go on purpose: killed, and its death is not a failure."""
        self._update(wid, state=Lifecycle.RELEASED, role=None, rank=None)
        self.kill(wid, restart=True)  # no wait: nobody needs it to be gone before going on

    def forget_dead_spares(self) -> list[str]:
        """Drop dead spares from the pool (their records stay, as dead); returns them."""
        with self._lock:
            gone = [w for w in self.spares if self.is_dead(w)]
            for wid in gone:
                self._update(wid, role=None)
            return gone

    def death_times(self) -> dict[str, float]:
        with self._lock:
            return {w: r.died_at for w, r in self.records.items() if r.died_at is not None}

    def to_list(self) -> list[dict]:
        with self._lock:
            return [r.to_dict() for r in self.records.values()]

    @staticmethod
    def records_from(data: list[dict]) -> list[WorkerRecord]:
        return [WorkerRecord.from_dict(d) for d in data]


def collect(results: dict, errors: list[str], typed_errors: list, typed: Optional[list], what: str,
            tolerate_dead: bool) -> dict:
    """The common tail of ``call_all``: route typed errors, raise TransferError for the rest."""
    if typed is not None:
        typed.extend(typed_errors)
    elif typed_errors:
        raise typed_errors[0][1]
    if errors and not tolerate_dead:
        raise TransferError(f"{what} failed on " + "; ".join(errors))
    return results


def is_typed(exc: BaseException) -> bool:
    """An error trying again cannot fix (an ElasticEPError other than a transfer failure)."""
    return isinstance(exc, ElasticEPError) and not isinstance(exc, TransferError)

