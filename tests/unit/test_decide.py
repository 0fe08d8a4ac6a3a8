"""decide(): the membership table, case by case, and its invariants over random views (hypothesis)."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from elastic_ep.decide import ClusterView, Decision, Request, WorkerStart, decide
from elastic_ep.errors import CapacityError, UnknownRankError
from elastic_ep.room import add_asks, describe_room, workers_that_fit


def view(n=4, spr=4, experts=12, spares=("s0",), dead=(), num_spares=1, **kw) -> ClusterView:
    members = kw.pop("members", {r: f"w{r}" for r in range(n)})
    return ClusterView(members=members, rank_nodes=kw.pop("rank_nodes", {r: 0 for r in members}),
                       spares=tuple(spares), dead=frozenset(dead), num_experts=experts, slots_per_rank=spr,
                       num_spares=num_spares, layout_ranks=tuple(sorted(members)), **kw)


# -- the table, one named case each -----------------------------------------------------------


def test_nothing_dead_recover_changes_nothing():
    d = decide(view(), Request("recover"))
    assert d.members == {0: "w0", 1: "w1", 2: "w2", 3: "w3"} and d.spares == ("s0",)
    assert not d.changes_membership and d.starts == () and d.spare_starts == ()


def test_member_dies_with_a_warm_spare():
    d = decide(view(dead={"w2"}), Request("recover"))
    assert d.members[2] == "s0" and d.replaced == {2: "s0"} and d.fresh == {2}
    assert d.starts == () and d.spares == () and d.spare_starts == (0,)  # the pool is refilled


def test_member_dies_without_spare_and_the_rest_has_room_shrinks():
    d = decide(view(spares=(), num_spares=0, dead={"w3"}), Request("recover"))
    assert d.dropped == (3,) and d.shrinks and d.ranks == [0, 1, 2] and d.starts == ()


def test_member_dies_without_spare_and_no_room_starts_a_cold_replacement():
    v = view(spr=3, spares=("s0",), dead={"s0", "w1"}, rank_nodes={0: 0, 1: 1, 2: 0, 3: 1}, num_nodes=2)
    d = decide(v, Request("recover"))
    assert d.starts == (WorkerStart(node=1, rank=1),)  # on the dead rank's node
    assert d.fresh == {1} and d.dropped == () and d.ranks == [0, 1, 2, 3]
    assert d.spare_starts == (0,)  # and the dead spare is replaced


def test_no_room_and_no_worker_may_start_is_refused_with_the_numbers():
    v = view(spr=3, spares=(), num_spares=0, dead={"w1"}, startable=0)
    with pytest.raises(CapacityError, match=r"1 workers must be started \(ranks \[1\]\) but only 0 may be; "
                                            r"without them 3 ranks x 3 slots = 9 slots cannot hold 12"):
        decide(v, Request("recover"))


def test_spare_dies_nothing_moves_and_a_new_spare_is_started():
    d = decide(view(spares=("s0", "s1"), num_spares=2, dead={"s0"}, num_nodes=2), Request("recover"))
    assert not d.changes_membership and d.spares == ("s1",) and d.spare_starts == (1,)


def test_several_die_at_once_spares_go_in_rank_order_then_shrink_then_cold():
    d = decide(view(n=6, spr=3, spares=("s0",), dead={"w1", "w4", "w5"}), Request("recover"))
    # s0 takes rank 1; 12 experts need 4 ranks of 3: ranks 4 dropped? no: 4 live -> both dropped
    assert d.replaced == {1: "s0"} and d.dropped == (4, 5) and d.starts == () and len(d.ranks) == 4
    d = decide(view(n=5, spr=3, spares=(), num_spares=0, dead={"w1", "w3", "w4"}), Request("recover"))
    assert [s.rank for s in d.starts] == [1, 3] and d.dropped == (4,) and d.ranks == [0, 1, 2, 3]


def test_restarted_member_takes_its_rank_back_empty():
    d = decide(view(restarted=frozenset({"w2"})), Request("recover"))
    assert d.members[2] == "w2" and d.fresh == {2} and d.replaced == {}


def test_grow_uses_spares_then_cold_workers_on_nodes_in_order():
    v = view(n=4, spares=("s0",), num_nodes=2, ranks_per_node=2, rank_nodes={0: 0, 1: 0, 2: 1, 3: 1})
    d = decide(v, Request("grow", add=2))
    assert d.added == (4, 5) and d.members[4] == "s0" and d.starts == (WorkerStart(node=0, rank=5),)
    assert d.rank_nodes[4] == d.rank_nodes[5] == 0 and d.fresh == {4, 5}  # ranks_per_node=2: 4, 5 share node 0
    assert d.spare_starts == (0,)


def test_grow_beyond_what_may_start_is_refused():
    with pytest.raises(CapacityError, match="but only 1 may be"):
        decide(view(spares=(), num_spares=0, startable=1), Request("grow", add=2))


def test_shrink_retires_into_the_pool_then_releases():
    d = decide(view(n=6, spares=(), num_spares=1), Request("shrink", ranks=(4, 5)))
    assert d.dropped == (4, 5) and d.retired == ("w4", "w5") and d.keep_as_spares == ("w4",)
    assert d.released == ("w5",) and d.spare_starts == () and d.ranks == [0, 1, 2, 3]


def test_shrink_below_capacity_is_refused_with_the_numbers():
    with pytest.raises(CapacityError, match=r"would leave 2 ranks x 4 slots = 8 slots for 12 logical experts"):
        decide(view(), Request("shrink", ranks=(0, 1)))


def test_drain_moves_a_rank_off_and_releases_its_worker():
    d = decide(view(), Request("drain", ranks=(2,)))
    assert d.drain == 2 and d.dropped == (2,) and d.retired == ("w2",) and d.released == ("w2",)
    assert d.keep_as_spares == () and d.ranks == [0, 1, 3]


@pytest.mark.parametrize("v, rank, match", [
    (view(n=3), 1, r"draining rank 1 would leave 2 ranks x 4 slots = 8 slots cannot hold 12"),
    (view(n=1, experts=2), 0, "the last rank"),
    (view(draining=frozenset({2})), 2, "already draining"),
    (view(dead={"w2"}), 2, "is dead"),
])
def test_drain_refusals(v, rank, match):
    with pytest.raises(CapacityError, match=match):
        decide(v, Request("drain", ranks=(rank,)))


def test_rebalance_heals_like_recover():
    assert decide(view(dead={"w0"}), Request("rebalance")).replaced == {0: "s0"}


@pytest.mark.parametrize("req", [Request("shrink", ranks=(9,)), Request("drain", ranks=(9,))])
def test_unknown_rank_is_named(req):
    with pytest.raises(UnknownRankError, match="no rank 9"):
        decide(view(), req)


@pytest.mark.parametrize("kw, match", [
    (dict(kind="explode"), "unknown request"), (dict(kind="grow", add=0), "add >= 1"),
    (dict(kind="shrink"), "at least one rank"), (dict(kind="drain", ranks=(1, 2)), "one rank at a time"),
])
def test_bad_requests(kw, match):
    with pytest.raises(ValueError, match=match):
        Request(**kw)


# -- invariants over random views and requests --------------------------------------------------


@st.composite
def views_and_requests(draw):
    n = draw(st.integers(1, 8))
    spr = draw(st.integers(1, 5))
    experts = draw(st.integers(1, n * spr))
    num_spares = draw(st.integers(0, 3))
    spares = tuple(f"s{i}" for i in range(draw(st.integers(0, 3))))
    members = {r: f"w{r}" for r in range(n)}
    workers = list(members.values()) + list(spares)
    dead = frozenset(draw(st.lists(st.sampled_from(workers), unique=True)))
    alive_members = [w for w in members.values() if w not in dead]
    restarted = frozenset(draw(st.lists(st.sampled_from(sorted(dead & set(members.values()))), unique=True))
                          if dead & set(members.values()) else [])
    num_nodes = draw(st.integers(1, 3))
    v = ClusterView(members=members, rank_nodes={r: r % num_nodes for r in members}, spares=spares,
                    dead=dead - restarted, num_experts=experts, slots_per_rank=spr, num_spares=num_spares,
                    num_nodes=num_nodes, ranks_per_node=max(1, n // num_nodes), layout_ranks=tuple(members),
                    restarted=restarted, startable=draw(st.none() | st.integers(0, 4)))
    kind = draw(st.sampled_from(["recover", "rebalance", "grow", "shrink", "drain"]))
    if kind == "grow":
        req = Request(kind, add=draw(st.integers(1, 3)))
    elif kind in ("shrink", "drain"):
        k = 1 if kind == "drain" else draw(st.integers(1, n))
        req = Request(kind, ranks=tuple(draw(st.lists(st.sampled_from(sorted(members)), min_size=k, max_size=k,
                                                      unique=True))))
    else:
        req = Request(kind)
    del alive_members
    return v, req


def _check(v: ClusterView, req: Request, d: Decision) -> None:
    ranks = d.ranks
    # capacity and one worker per rank
    assert len(ranks) * v.slots_per_rank >= v.num_experts
    workers = list(d.members.values())
    assert len(workers) == len(set(workers))
    assert not set(d.members) & {s.rank for s in d.starts}
    # nobody dead serves; spares left are live and serve no rank
    assert all(w not in v.dead for w in workers)
    assert all(w not in v.dead and w not in workers for w in d.spares)
    live_spares = [w for w in v.spares if w not in v.dead]
    # a live member keeps its rank unless it is shrunk or drained away
    for r, w in v.members.items():
        if w not in v.dead and r not in req.ranks:
            assert d.members.get(r) == w
    # every dead member's rank is taken over (fresh) or dropped
    for r, w in v.members.items():
        if w in v.dead and r not in req.ranks:
            assert (r in d.fresh) != (r in d.dropped)
    # cold workers only once no spare is left; a dead rank is started cold only when dropping it breaks capacity
    if d.starts:
        assert d.spares == ()
    cold_dead = [s.rank for s in d.starts if s.rank in v.members]
    if cold_dead:
        assert (len(ranks) - 1) * v.slots_per_rank < v.num_experts
    if v.startable is not None:
        assert len(d.starts) <= v.startable
    # the pool is refilled to num_spares
    assert len(d.spares) + len(d.keep_as_spares) + len(d.spare_starts) == max(
        v.num_spares, len(d.spares) + len(d.keep_as_spares))
    assert set(d.keep_as_spares) | set(d.released) == set(d.retired)
    assert len(d.spares) <= len(live_spares)
    if req.kind == "grow":
        assert len(d.added) == req.add and all(r in d.fresh for r in d.added)
    assert set(d.rank_nodes) == set(ranks)
    assert decide(v, req) == d  # deterministic


@settings(max_examples=600, deadline=None)
@given(views_and_requests())
def test_invariants_hold_or_the_refusal_is_typed(vr):
    v, req = vr
    try:
        d = decide(v, req)
    except CapacityError as exc:
        msg = str(exc)
        assert "slots" in msg or "last rank" in msg or "draining" in msg or "dead" in msg or (
            req.kind == "grow" and v.startable is not None and f"only {v.startable} may be" in msg)
        return
    _check(v, req, d)


# -- room on Ray: how many workers may start (elastic_ep.room) --------------------------------


def test_workers_fit_in_order_until_one_does_not():
    asks = [{"GPU": 0.5, "CPU": 1.0}, {"GPU": 1.0, "CPU": 1.0}, {"GPU": 0.5, "CPU": 1.0}]
    assert workers_that_fit({"GPU": 1.0, "CPU": 8.0}, asks) == 1  # the second (a whole GPU) does not fit
    assert workers_that_fit({"GPU": 2.0, "CPU": 2.0}, asks) == 2  # two CPUs: the third waits
    assert workers_that_fit({"GPU": 2.0, "CPU": 3.0}, asks) == 3
    assert workers_that_fit({}, [{}, {"CPU": 0.0}]) is None  # nobody asks for anything: no limit
    assert workers_that_fit({"CPU": 0.003 - 1e-9}, [{"CPU": 0.001}] * 5) == 3  # fixed-point rounding tolerated


def test_resources_dead_workers_hold_count_as_free_and_are_named():
    free, freed, ask = {"GPU": 0.0, "CPU": 3.0}, add_asks([{"GPU": 1.0, "CPU": 1.0}] * 2), {"GPU": 1.0, "CPU": 1.0}
    assert freed == {"GPU": 2.0, "CPU": 2.0}
    assert workers_that_fit(add_asks([free, freed]), [ask] * 3) == 2
    assert describe_room(free, freed, ask, 2) == (
        "Ray has 0 GPU, 3 CPU free (+2 GPU, 2 CPU that dead workers hold until Ray releases them): "
        "room for 2 more workers asking 1 GPU, 1 CPU each")
    assert "dead workers" not in describe_room(free, {}, ask, 0)


def test_a_grow_without_room_is_refused_naming_what_ray_has():
    note = "Ray has 0.5 GPU free: room for 0 more workers asking 1 GPU each"
    with pytest.raises(CapacityError) as err:
        decide(view(spares=(), num_spares=0, startable=0, startable_note=note), Request("grow", add=1))
    assert str(err.value) == f"1 workers must be started (ranks [4]) but only 0 may be ({note})"


def test_a_cold_replacement_that_fits_is_not_refused():
    v = view(spr=3, spares=(), num_spares=0, dead={"w1"}, startable=1, startable_note="room for 1")
    assert decide(v, Request("recover")).starts == (WorkerStart(node=0, rank=1),)
