"""Membership decisions as data: the cluster's view + a request -> a frozen Decision (pure; no Ray, no torch).

Glossary: a *member* is a worker serving a rank; a *spare* a started worker serving
none; a *dead* worker one the worker group saw die; a *cold* worker one started for
this decision (it loads its rank from peers, host backups and the checkpoint).

The table ``decide`` implements, case by case (``num_spares`` is always refilled):

=========================================  ===============================================
case                                        decision
=========================================  ===============================================
member dies, warm spare left                the first live spare takes the rank over
member dies, no spare, survivors have room  the rank is dropped (the cluster shrinks)
member dies, no spare, no room              a cold worker is started on the rank's node
                                            and takes it over (enough of them to fit)
... and no worker may be started            refused: CapacityError with the numbers
member restarted by Ray (state lost)        it takes its own rank back empty
spare dies                                  nothing moves; a new spare is started
several die at once                         each row above, ranks in ascending order
grow n                                      spares first, else cold workers, new ranks
                                            max(rank) + 1, ...; nodes filled in order
shrink ranks                                those ranks retire (refill spares, rest released);
                                            refused below capacity, with the numbers
drain rank                                  its experts move off, it commits, then the worker
                                            is released; refused for the last rank, a rank
                                            already draining, or when the rest cannot hold
                                            every expert
rebalance by load                           membership as for recover (dead ranks healed)
=========================================  ===============================================
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from .errors import CapacityError, UnknownRankError

REQUESTS = ("recover", "rebalance", "grow", "shrink", "drain")


@dataclass(frozen=True)
class ClusterView:
    """What the controller knows when it decides.

    members: rank -> worker id (dead ones included; ``dead`` says which).
    rank_nodes: rank -> logical node, as the committed layout has it.
    spares: worker ids of spares in start order (dead ones included).
    restarted: members Ray restarted in place (alive, slots empty).
    startable: how many more workers may be started (None: no limit known), from what Ray
    says is free with dead members' and spares' resources counted as freed (elastic_ep.room);
    startable_note: the numbers behind it, quoted by a refusal.
    """

    members: dict[int, str]
    rank_nodes: dict[int, int]
    spares: tuple[str, ...]
    dead: frozenset[str]
    num_experts: int
    slots_per_rank: int
    num_spares: int
    num_nodes: int = 1
    ranks_per_node: int = 1
    layout_ranks: tuple[int, ...] = ()
    restarted: frozenset[str] = frozenset()
    draining: frozenset[int] = frozenset()
    startable: Optional[int] = None
    startable_note: str = ""


@dataclass(frozen=True)
class Request:
    """What was asked: ``kind`` in REQUESTS; ``add`` ranks to grow; ``ranks`` to shrink or drain."""

    kind: str = "recover"
    add: int = 0
    ranks: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in REQUESTS:
            raise ValueError(f"unknown request {self.kind!r}; known: {list(REQUESTS)}")
        if self.kind == "grow" and (isinstance(self.add, bool) or not isinstance(self.add, int) or self.add <= 0):
            raise ValueError(f"grow needs add >= 1, got {self.add!r}")
        if self.kind in ("shrink", "drain") and not self.ranks:
            raise ValueError(f"{self.kind} needs at least one rank")
        if self.kind == "drain" and len(self.ranks) != 1:
            raise ValueError(f"drain takes one rank at a time, got {list(self.ranks)}")


@dataclass(frozen=True)
class WorkerStart:
    """A worker to start on logical ``node``; it takes ``rank`` (None: it joins the spares)."""

    node: int
    rank: Optional[int] = None


@dataclass(frozen=True)
class Decision:
    """Who serves which rank after the reconfiguration, and what to start or let go.

    members: rank -> worker id for ranks served by a worker that exists now.
    starts: cold workers to start before the transfer, each taking its ``rank``.
    fresh: ranks whose worker starts empty (replacements, restarts, new ranks).
    rank_nodes: rank -> logical node of every rank after the change (the placement to request).
    spares: live spares left after the decision (those that took a rank removed).
    retired: workers leaving a rank (shrink, drain); ``keep_as_spares`` of them refill the
    pool, ``released`` are let go. spare_starts: nodes of the spares to start after commit.
    """

    request: Request
    members: dict[int, str]
    starts: tuple[WorkerStart, ...]
    fresh: frozenset[int]
    rank_nodes: dict[int, int]
    spares: tuple[str, ...]
    replaced: dict[int, str] = field(default_factory=dict)  # rank -> spare id that took it
    dropped: tuple[int, ...] = ()
    added: tuple[int, ...] = ()
    retired: tuple[str, ...] = ()
    keep_as_spares: tuple[str, ...] = ()
    released: tuple[str, ...] = ()
    spare_starts: tuple[int, ...] = ()
    drain: Optional[int] = None

    @property
    def ranks(self) -> list[int]:
        """Every rank after the change, ascending."""
        return sorted(set(self.members) | {s.rank for s in self.starts if s.rank is not None})

    @property
    def shrinks(self) -> bool:
        return bool(self.dropped)

    @property
    def changes_membership(self) -> bool:
        return bool(self.fresh or self.dropped or self.retired)


def _capacity_message(num_ranks: int, view: ClusterView) -> str:
    slots = num_ranks * view.slots_per_rank
    return (f"{num_ranks} ranks x {view.slots_per_rank} slots = {slots} slots cannot hold "
            f"{view.num_experts} logical experts")


def _check_ranks(view: ClusterView, ranks: tuple[int, ...]) -> list[int]:
    out = []
    for r in ranks:
        if isinstance(r, bool) or not isinstance(r, int) or r not in view.members:
            raise UnknownRankError(f"no rank {r!r}; ranks: {sorted(view.members)}")
        out.append(int(r))
    return sorted(set(out))


def decide(view: ClusterView, request: Request) -> Decision:
    """The one place membership is decided: see the module docstring's table.

    Raises CapacityError (refusals, with the numbers) or UnknownRankError (a rank not in
    ``view.members``). Deterministic: the same view and request give the same decision.
    """
    spr, need = view.slots_per_rank, view.num_experts
    live_spares = [w for w in view.spares if w not in view.dead]
    startable = view.startable
    members: dict[int, str] = {}
    starts: list[WorkerStart] = []
    fresh: set[int] = set()
    replaced: dict[int, str] = {}
    dropped: list[int] = []
    added: list[int] = []
    retired: list[str] = []
    rank_nodes = {r: view.rank_nodes.get(r, 0) for r in view.members}

    remove: list[int] = []
    if request.kind in ("shrink", "drain"):
        remove = _check_ranks(view, request.ranks)
    if request.kind == "drain":
        (rank,) = remove
        if rank in view.draining:
            raise CapacityError(f"rank {rank} is already draining")
        if len(view.members) == 1:
            raise CapacityError(f"rank {rank} is the last rank: draining it would leave no rank to hold experts")
        if view.members[rank] in view.dead:
            raise CapacityError(f"rank {rank} is dead: it has nothing to drain (recover() heals it)")
        left = len(view.members) - 1
        if left * spr < need:
            raise CapacityError(f"draining rank {rank} would leave " + _capacity_message(left, view))
    if request.kind == "shrink":
        left = len(view.members) - len(remove)
        if left * spr < need:
            raise CapacityError(f"shrinking ranks {remove} would leave {left} ranks x {spr} slots = "
                                f"{left * spr} slots for {need} logical experts")

    # Step 1: dead and restarted members: a spare, else dropped (decided below whether cold)
    orphans: list[int] = []  # dead ranks no spare took
    for rank, wid in sorted(view.members.items()):
        if rank in remove:
            continue
        if wid in view.restarted:
            members[rank] = wid
            fresh.add(rank)
        elif wid in view.dead:
            if live_spares:
                members[rank] = replaced[rank] = live_spares.pop(0)
                fresh.add(rank)
            else:
                orphans.append(rank)
        else:
            members[rank] = wid

    # Step 2: shrink / drain: those ranks' workers retire
    for rank in remove:
        wid = view.members[rank]
        if wid not in view.dead:
            retired.append(wid)
        dropped.append(rank)

    # Step 3: grow: spares first, then cold workers; new ranks fill nodes in order
    per_node = max(1, view.ranks_per_node)
    next_rank = max(list(view.members) + list(view.layout_ranks) + [-1]) + 1
    count = len(members) + len(orphans)
    for _ in range(request.add if request.kind == "grow" else 0):
        rank, next_rank = next_rank, next_rank + 1
        node = count // per_node % max(1, view.num_nodes)
        count += 1
        rank_nodes[rank] = node
        if live_spares:
            members[rank] = live_spares.pop(0)
        else:
            starts.append(WorkerStart(node=node, rank=rank))
        fresh.add(rank)
        added.append(rank)

    # Step 4: dead ranks with no spare: dropped while the rest has room, else started cold
    short = max(0, -(-need // spr) - (len(members) + len(starts)))  # ranks missing for capacity
    cold = orphans[:short]
    if startable is not None and len(starts) + len(cold) > startable:
        why = (f"{len(starts) + len(cold)} workers must be started (ranks {[s.rank for s in starts] + cold}) but only "
               f"{startable} may be")
        if cold:
            why += "; without them " + _capacity_message(len(members) + min(len(starts), startable), view)
        raise CapacityError(why + (f" ({view.startable_note})" if view.startable_note else ""))
    for rank in orphans:
        if rank in cold:
            starts.append(WorkerStart(node=rank_nodes[rank], rank=rank))
            fresh.add(rank)
        else:
            dropped.append(rank)
    for rank in dropped:
        rank_nodes.pop(rank, None)

    total = len(members) + len(starts)
    if total == 0:
        raise CapacityError("no live rank is left to hold experts")
    if total * spr < need:
        raise CapacityError(_capacity_message(total, view))

    # Step 5: the spare pool: retired workers refill it (drained ones never), then new spares
    keep = [] if request.kind == "drain" else retired[: max(0, view.num_spares - len(live_spares))]
    released = [w for w in retired if w not in keep]
    pool = len(live_spares) + len(keep)
    spare_starts = tuple((pool + k) % max(1, view.num_nodes) for k in range(max(0, view.num_spares - pool)))
    return Decision(
        request=request, members=members, starts=tuple(starts), fresh=frozenset(fresh),
        rank_nodes=dict(sorted(rank_nodes.items())), spares=tuple(live_spares), replaced=replaced,
        dropped=tuple(sorted(dropped)), added=tuple(added), retired=tuple(retired), keep_as_spares=tuple(keep),
        released=tuple(released), spare_starts=spare_starts,
        drain=remove[0] if request.kind == "drain" else None,
    )


def layout_for(decision: Decision, old, load, slots_per_rank: int, live_ranks, num_groups: int = 1,
               policy: str = "sticky"):
    """The layout a decision leads to: ``load`` [num_layers, num_experts] placed over ``decision.ranks``.

    ``old`` is the committed ExpertLayout; ``live_ranks`` the ranks whose slots still hold
    their experts (they keep what they can under the sticky policy). Pure and deterministic,
    so the controller and the chaos harness reach the same layout from the same inputs.
    """
    from .balance import rebalance_experts

    ranks = decision.ranks
    return rebalance_experts(
        load, ranks, slots_per_rank, rank_nodes=[decision.rank_nodes.get(r, 0) for r in ranks],
        num_groups=num_groups, old=old, live_ranks=sorted(live_ranks), policy=policy,
    )
