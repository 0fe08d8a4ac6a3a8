"""Integration tests of elastic_ep.transport: real local Ray, real actors, real gloo groups, no mocks.

Every tensor's values encode its identity (source, destination, index), so a transfer that lands in
the wrong buffer fails an exact comparison. Times that bound failure handling are measured inside
the actors, where the waiting happens. Each test body is bounded by pytest-timeout (``func_only``:
starting Ray and the actors in the module fixtures is bounded by their own ``ray.get`` timeouts, as
that can take a minute when the machine is shared).
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
import time
from pathlib import Path

import pytest
import ray
import ray.util.collective as col
import torch

from elastic_ep.errors import PeerDiedError, TransferError, TransferTimeoutError
from elastic_ep.transport import (
    CollectiveTransport,
    P2POp,
    StoreServer,
    form_group,
    get_group,
    group_name_for,
    leave_group,
    split_into_rounds,
)

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
SLACK_S = 1.5  # allowed lateness of a bounded failure, on a loaded 2-core machine
START_TIMEOUT_S = 180  # starting actors on a shared 2-core machine can take a minute

# ---------------------------------------------------------------------------------------------
# Identity-coded tensors. A spec is (src, dst, k, numel, dtype name): the k-th tensor src sends dst.
# ---------------------------------------------------------------------------------------------


def identity_tensor(src: int, dst: int, k: int, numel: int, dtype: str = "float32") -> torch.Tensor:
    """Values that only this (src, dst, k) produces: seeded noise for floats, an offset ramp for ints."""
    torch_dtype = getattr(torch, dtype)
    if torch_dtype.is_floating_point:
        generator = torch.Generator().manual_seed(src * 1_000_003 + dst * 1_009 + k)
        return torch.randn(numel, generator=generator).to(torch_dtype)
    return torch.arange(numel, dtype=torch_dtype) + (src * 1_000_000 + dst * 10_000 + k * 100)


def send_spec(kind: str, me: int, peer: int, k: int, numel: int, dtype: str = "float32") -> tuple:
    """One plan entry: (kind, peer, spec of the tensor moved)."""
    src, dst = (me, peer) if kind == "send" else (peer, me)
    return (kind, peer, (src, dst, k, numel, dtype))


# ---------------------------------------------------------------------------------------------
# Actors
# ---------------------------------------------------------------------------------------------


class StoreHost:
    """Holds the StoreServer, as the controller will."""

    def __init__(self):
        self.server = StoreServer()

    def address(self) -> tuple[str, int]:
        return self.server.address

    def abandon(self, group_name: str, reason: str) -> None:
        self.server.abandon(group_name, reason)


class Peer:
    """A stand-in worker: forms generation groups and moves identity-coded tensors (on CPU, or on its GPU)."""

    def __init__(self, device: str = "cpu"):
        self.device = device

    def ping(self) -> str:
        return "pong"

    def form(self, group_name, world, rank, address, timeout_s=10.0, max_ops_in_flight=64) -> dict:
        start = time.monotonic()
        group = form_group(
            group_name, world, rank, address[0], address[1], timeout_s, self.device, max_ops_in_flight
        )
        return {"elapsed_s": time.monotonic() - start, "formation_s": group.formation_s}

    def try_form(self, group_name, world, rank, address, timeout_s) -> dict:
        start = time.monotonic()
        try:
            form_group(group_name, world, rank, address[0], address[1], timeout_s, self.device)
        except Exception as exc:  # noqa: BLE001 - reported to the test
            return _error_report(exc, start)
        return {"error": None, "elapsed_s": time.monotonic() - start}

    def exchange(self, group_name, plan, timeout_s=10.0, via_transport=False, repeat=1) -> dict:
        ops, received = _build_ops(plan, self.device)
        elapsed = []
        for _ in range(repeat):
            start = time.monotonic()
            if via_transport:
                transport = CollectiveTransport(group_name)
                for op in ops:
                    (transport.add_send if op.kind == "send" else transport.add_recv)(op.tensor, op.peer)
                transport.execute(timeout_s)
                transport.close()
            else:
                get_group(group_name).exchange(ops, timeout_s)
            if self.device != "cpu":
                torch.cuda.synchronize()
            elapsed.append(time.monotonic() - start)
        return {"elapsed_s": elapsed[-1], "first_s": elapsed[0], "received": [t.cpu() for t in received]}

    def exchange_rounds(self, group_name, keyed_plan, timeout_s=10.0, fail_at=None) -> dict:
        """Run ``(key, kind, peer, spec)`` entries as rounds in key order, drawn lazily through the
        transport; a round's tensors are made only when it is drawn. ``fail_at``: the generator
        raises when asked for that key. Returns what arrived, or the error."""
        received, drawn = [], []

        def rounds():
            for key in sorted({entry[0] for entry in keyed_plan}):
                if key == fail_at:
                    raise RuntimeError(f"packing failed at round {key}")
                drawn.append(key)
                ops, got = _build_ops([e[1:] for e in keyed_plan if e[0] == key], self.device)
                received.extend(got)
                yield [(op.kind, op.tensor, op.peer) for op in ops]

        start = time.monotonic()
        transport = CollectiveTransport(group_name)
        try:
            transport.execute_rounds(rounds(), timeout_s)
        except Exception as exc:  # noqa: BLE001 - reported to the test
            return {**_error_report(exc, start), "broken": get_group(group_name).broken}
        finally:
            transport.close()
        if self.device != "cpu":
            torch.cuda.synchronize()
        return {"error": None, "received": [t.cpu() for t in received], "drawn": drawn}

    def exchange_expecting_error(self, group_name, plan, timeout_s) -> dict:
        ops, _ = _build_ops(plan, self.device)
        start = time.monotonic()
        try:
            get_group(group_name).exchange(ops, timeout_s)
        except Exception as exc:  # noqa: BLE001 - reported to the test
            return _error_report(exc, start)
        return {"error": None, "elapsed_s": time.monotonic() - start}

    def leave(self, group_name) -> float:
        start = time.monotonic()
        leave_group(group_name)
        return time.monotonic() - start

    def ray_send(self, group_name, dst, spec) -> None:
        col.send(identity_tensor(*spec).to(self.device), dst, group_name)

    def ray_recv(self, group_name, src, spec) -> torch.Tensor:
        buffer = torch.empty(spec[3], dtype=getattr(torch, spec[4]), device=self.device)
        col.recv(buffer, src, group_name)
        return buffer.cpu()

    def ray_collectives(self, group_name, rank) -> dict:
        total = torch.tensor([float(rank + 1)], dtype=torch.float64, device=self.device)
        col.allreduce(total, group_name)
        root_value = torch.tensor([float(rank * 10 + 7)], device=self.device)
        col.broadcast(root_value, 1, group_name)
        col.barrier(group_name)
        return {"sum": total.item(), "broadcast": root_value.item()}


def _build_ops(plan, device: str = "cpu") -> tuple[list[P2POp], list[torch.Tensor]]:
    ops, received = [], []
    for kind, peer, spec in plan:
        if kind == "send":
            tensor = identity_tensor(*spec).to(device)
        else:
            tensor = torch.full((spec[3],), -1, dtype=getattr(torch, spec[4]), device=device)
            received.append(tensor)
        ops.append(P2POp(kind, tensor, peer))
    return ops, received


def _error_report(exc: BaseException, start: float) -> dict:
    return {
        "error": type(exc).__name__,
        "message": str(exc),
        "elapsed_s": time.monotonic() - start,
        "is_transfer_error": isinstance(exc, TransferError),
        "is_timeout": isinstance(exc, TimeoutError),
        "peers": getattr(exc, "peers", None),
    }


def expected_received(plan) -> list[torch.Tensor]:
    return [identity_tensor(*spec) for kind, _, spec in plan if kind == "recv"]


def assert_received(result: dict, plan) -> None:
    expected = expected_received(plan)
    assert len(result["received"]) == len(expected)
    for got, want in zip(result["received"], expected):
        assert got.dtype == want.dtype
        assert torch.equal(got, want), f"received {got[:4]} expected {want[:4]}"


# ---------------------------------------------------------------------------------------------
# Fixtures: Ray once per module, a store host and four peers shared by the tests
# ---------------------------------------------------------------------------------------------

_names = iter(range(10_000))


def fresh_name() -> str:
    """A group name never used before in this module (names are not reusable on one store)."""
    return group_name_for("t", next(_names))


@pytest.fixture(scope="module")
def ray_session():
    temp_dir = tempfile.mkdtemp(prefix="eep", dir="/tmp")  # short: Ray's socket paths live under it
    old_path = os.environ.get("PYTHONPATH")
    # workers inherit the driver's environment: let them import elastic_ep and this module
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), str(HERE), old_path) if p)
    ray.init(num_cpus=4, include_dashboard=False, _temp_dir=temp_dir, configure_logging=False)
    try:
        yield
    finally:
        ray.shutdown()
        if old_path is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old_path
        shutil.rmtree(temp_dir, ignore_errors=True)


def start_peers(n: int) -> list:
    peers = [ray.remote(num_cpus=0)(Peer).remote() for _ in range(n)]
    ray.get([p.ping.remote() for p in peers], timeout=START_TIMEOUT_S)
    return peers


@pytest.fixture(scope="module")
def cluster(ray_session):
    """A store host, four peers the tests share and three spares that tests kill, all started at once."""
    host = ray.remote(num_cpus=0)(StoreHost).remote()
    actors = [ray.remote(num_cpus=0)(Peer).remote() for _ in range(7)]
    address = ray.get(host.address.remote(), timeout=START_TIMEOUT_S)
    ray.get([a.ping.remote() for a in actors], timeout=START_TIMEOUT_S)
    yield address, actors[:4], actors[4:], host
    for actor in [host, *actors]:
        ray.kill(actor)


@pytest.fixture(scope="module")
def store(cluster):
    return cluster[0]


@pytest.fixture(scope="module")
def peers(cluster):
    return cluster[1]


@pytest.fixture(scope="module")
def store_host(cluster):
    return cluster[3]  # the StoreServer's holder, as the controller is


@pytest.fixture(scope="module")
def spares(cluster):
    return cluster[2]  # each test that kills a member pops its victims here


def form(actors, address, timeout_s=10.0, **kwargs) -> tuple[str, list[dict]]:
    """Form a fresh group over ``actors`` (rank = position) and return its name and timings."""
    name = fresh_name()
    refs = [a.form.remote(name, len(actors), rank, address, timeout_s, **kwargs) for rank, a in enumerate(actors)]
    return name, ray.get(refs, timeout=timeout_s + 30)


def ring_plans(world: int, numel: int) -> list[list[tuple]]:
    """Each rank sends to its right and receives from its left, sends listed first (naive order deadlocks)."""
    return [
        [send_spec("send", r, (r + 1) % world, 0, numel), send_spec("recv", r, (r - 1) % world, 0, numel)]
        for r in range(world)
    ]


# ---------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------


@pytest.mark.timeout(60, func_only=True)
def test_rounds_keep_partners_together():
    """Pure: op k of a direction with a peer lands in the same round on both ends."""
    tensor = torch.zeros(1)
    a_ops = [P2POp("send", tensor, 1) for _ in range(5)] + [P2POp("recv", tensor, 1) for _ in range(3)]
    b_ops = [P2POp("recv", tensor, 0) for _ in range(5)] + [P2POp("send", tensor, 0) for _ in range(3)]
    random.Random(0).shuffle(b_ops)  # order between directions does not matter
    a_rounds = split_into_rounds(a_ops, 2, 4)
    b_rounds = split_into_rounds(b_ops, 2, 4)
    assert [len(r) for r in a_rounds] == [4, 3, 1]  # two per direction per round
    for a_round, b_round in zip(a_rounds, b_rounds):
        assert sorted(op.kind for op in a_round) == sorted(
            "send" if op.kind == "recv" else "recv" for op in b_round
        )
    assert split_into_rounds([], 4, 64) == []


@pytest.mark.timeout(60, func_only=True)
@pytest.mark.parametrize("world", [2, 4])
def test_ring_exchange_in_one_call(peers, store, world):
    numel = 1 << 20  # 4 MiB of float32 per rank
    name, timings = form(peers[:world], store)
    plans = ring_plans(world, numel)
    results = ray.get([p.exchange.remote(name, plans[r]) for r, p in enumerate(peers[:world])], timeout=30)
    for result, plan in zip(results, plans):
        assert_received(result, plan)
    slowest = max(r["elapsed_s"] for r in results)
    print(
        f"\nring world={world}: formation {max(t['formation_s'] for t in timings) * 1e3:.1f} ms, "
        f"exchange of {numel * 4 / 2**20:.0f} MiB per rank in {slowest * 1e3:.1f} ms "
        f"({world * numel * 4 / slowest / 2**30:.2f} GiB/s aggregate)"
    )
    ray.get([p.leave.remote(name) for p in peers[:world]], timeout=10)


@pytest.mark.timeout(60, func_only=True)
def test_bidirectional_exchange_over_several_rounds(peers, store):
    """Five tensors each way, mixed dtypes and sizes, one call, two ops per direction per round."""
    name, _ = form(peers[:2], store, max_ops_in_flight=4)
    sizes = [(1, "float32"), (4096, "bfloat16"), (777, "int64"), (65536, "float16"), (3, "float32")]
    plans = []
    for me in range(2):
        other = 1 - me
        plan = [send_spec("send", me, other, k, n, d) for k, (n, d) in enumerate(sizes)]
        plan += [send_spec("recv", me, other, k, n, d) for k, (n, d) in enumerate(sizes)]
        plans.append(plan)
    plans[1] = [op for op in plans[1] if op[0] == "recv"] + [op for op in plans[1] if op[0] == "send"]  # receives first
    results = ray.get([p.exchange.remote(name, plans[r]) for r, p in enumerate(peers[:2])], timeout=30)
    for result, plan in zip(results, plans):
        assert_received(result, plan)
    ray.get([p.leave.remote(name) for p in peers[:2]], timeout=10)


@pytest.mark.timeout(60, func_only=True)
def test_all_to_all_with_shuffled_orders_through_transport(peers, store):
    """Four ranks, three tensors to every peer; each rank interleaves its ops at random (per-direction order kept)."""
    world, per_pair = 4, 3
    name, _ = form(peers[:world], store, max_ops_in_flight=4)  # one op per direction per round: many rounds
    rng = random.Random(2)

    def numel_of(k: int, receiver: int) -> int:  # both ends compute the same size
        return 100 + 10 * k + receiver

    plans = []
    for me in range(world):
        queues = []
        for peer in range(world):
            if peer != me:
                queues.append([send_spec("send", me, peer, k, numel_of(k, peer)) for k in range(per_pair)])
                queues.append([send_spec("recv", me, peer, k, numel_of(k, me)) for k in range(per_pair)])
        plan = []
        while any(queues):
            plan.append(rng.choice([q for q in queues if q]).pop(0))
        plans.append(plan)
    results = ray.get(
        [p.exchange.remote(name, plans[r], via_transport=True) for r, p in enumerate(peers[:world])], timeout=30
    )
    for result, plan in zip(results, plans):
        assert_received(result, plan)
    ray.get([p.leave.remote(name) for p in peers[:world]], timeout=10)


@pytest.mark.timeout(60, func_only=True)
def test_ray_collective_api_through_registered_backend(peers, store):
    name, _ = form(peers[:3], store)
    spec = (0, 1, 0, 1000, "float32")
    send_ref = peers[0].ray_send.remote(name, 1, spec)
    received = ray.get(peers[1].ray_recv.remote(name, 0, spec), timeout=30)
    ray.get(send_ref, timeout=30)
    assert torch.equal(received, identity_tensor(*spec))
    reports = ray.get([p.ray_collectives.remote(name, r) for r, p in enumerate(peers[:3])], timeout=30)
    assert all(r["sum"] == 6.0 for r in reports)  # 1 + 2 + 3
    assert all(r["broadcast"] == 17.0 for r in reports)  # rank 1's value
    ray.get([p.leave.remote(name) for p in peers[:3]], timeout=10)


@pytest.mark.timeout(60, func_only=True)
def test_reform_after_a_death_in_the_same_processes(peers, store, spares):
    victim, replacement = spares.pop(), spares.pop()
    gen0 = [peers[0], peers[1], victim]
    name0, _ = form(gen0, store)
    plans = ring_plans(3, 4096)
    results = ray.get([p.exchange.remote(name0, plans[r]) for r, p in enumerate(gen0)], timeout=30)
    for result, plan in zip(results, plans):
        assert_received(result, plan)

    ray.kill(victim, no_restart=True)
    killed_at = time.monotonic()
    leave_s = ray.get([p.leave.remote(name0) for p in gen0[:2]], timeout=10)
    gen1 = [peers[1], replacement, peers[0]]  # survivors renumbered, the newcomer in the middle
    name1, timings = form(gen1, store, timeout_s=5.0)
    plans = ring_plans(3, 4096)
    results = ray.get([p.exchange.remote(name1, plans[r]) for r, p in enumerate(gen1)], timeout=30)
    recovered_s = time.monotonic() - killed_at
    for result, plan in zip(results, plans):
        assert_received(result, plan)
    formation_s = max(t["formation_s"] for t in timings)
    print(
        f"\nreform: leave {max(leave_s) * 1e3:.1f} ms, formation {formation_s * 1e3:.1f} ms, "
        f"kill to verified exchange {recovered_s:.2f} s"
    )
    assert max(leave_s) < 1.0, leave_s
    assert formation_s < 3.0, timings  # measured inside the actors
    assert recovered_s < 10.0  # wall time through Ray calls: loose, the machine may be shared
    ray.get([p.leave.remote(name1) for p in gen1], timeout=10)


@pytest.mark.timeout(60, func_only=True)
def test_peer_killed_while_survivor_waits(peers, store, spares):
    victim = spares.pop()
    name, _ = form([peers[0], victim], store)
    timeout_s = 3.0
    plan = [send_spec("recv", 0, 1, 0, 1 << 16), send_spec("send", 0, 1, 0, 1 << 16)]
    waiting = peers[0].exchange_expecting_error.remote(name, plan, timeout_s)  # the victim never posts
    time.sleep(0.5)
    ray.kill(victim, no_restart=True)
    report = ray.get(waiting, timeout=timeout_s + 10)
    assert report["error"] in ("PeerDiedError", "TransferTimeoutError"), report
    assert report["elapsed_s"] < timeout_s + SLACK_S, report
    assert report["peers"] == [1], report
    start = time.monotonic()
    assert ray.get(peers[0].ping.remote(), timeout=5) == "pong"
    assert time.monotonic() - start < 2.0  # the survivor answers at once (a Ray round trip)
    print(f"\npeer killed: {report['error']} after {report['elapsed_s']:.2f} s (victim killed at ~0.5 s)")

    broken_again = ray.get(peers[0].exchange_expecting_error.remote(name, plan, timeout_s), timeout=10)
    assert broken_again["error"] == "TransferError" and "broken" in broken_again["message"], broken_again
    assert ray.get(peers[0].leave.remote(name), timeout=5) < 1.0


@pytest.mark.timeout(60, func_only=True)
def test_member_that_never_joins(peers, store):
    timeout_s = 2.0
    name = fresh_name()
    refs = [peers[r].try_form.remote(name, 3, r, store, timeout_s) for r in range(2)]  # rank 2 never comes
    reports = ray.get(refs, timeout=timeout_s + 20)
    for report in reports:
        assert report["is_transfer_error"] and report["is_timeout"], report
        assert "[2]" in report["message"], report
        assert report["elapsed_s"] < timeout_s + SLACK_S, report
    assert ray.get(peers[0].ping.remote(), timeout=5) == "pong"


@pytest.mark.timeout(60, func_only=True)
def test_abandoned_formation_releases_the_waiting_ranks(peers, store, store_host):
    """The controller calls a formation off (a member died before joining): the members
    already waiting raise FormationAbandoned with the reason instead of waiting out their timeout."""
    timeout_s = 30.0
    name = fresh_name()
    refs = [peers[r].try_form.remote(name, 3, r, store, timeout_s) for r in range(2)]  # rank 2 never comes
    time.sleep(0.3)  # let both ranks reach their wait (abandoning earlier releases them the same way)
    ray.get(store_host.abandon.remote(name, "worker w9 failed to join: RayActorError"), timeout=10)
    reports = ray.get(refs, timeout=20)
    for report in reports:
        assert report["error"] == "FormationAbandoned" and report["is_transfer_error"], report
        assert "w9 failed to join" in report["message"] and "[2]" in report["message"], report
        assert report["elapsed_s"] < timeout_s, report  # released, not timed out
    assert ray.get(peers[0].ping.remote(), timeout=5) == "pong"


@pytest.mark.timeout(60, func_only=True)
def test_timeout_breaks_the_group_for_good(peers, store):
    """A receive whose sender never sends times out, and the group refuses further work on both ends."""
    name, _ = form(peers[:2], store)
    timeout_s = 1.5
    plan = [send_spec("recv", 0, 1, 0, 16)]
    report = ray.get(peers[0].exchange_expecting_error.remote(name, plan, timeout_s), timeout=timeout_s + 10)
    assert report["error"] == "TransferTimeoutError" and report["is_timeout"], report
    assert report["peers"] == [1], report
    assert timeout_s - 0.1 < report["elapsed_s"] < timeout_s + SLACK_S, report

    again = ray.get(peers[0].exchange_expecting_error.remote(name, plan, timeout_s), timeout=10)
    assert again["error"] == "TransferError" and "broken" in again["message"], again
    assert again["elapsed_s"] < 0.5, again

    # the other end still thinks the group works: its send fails (closed or timed out) within its bound
    other = ray.get(
        peers[1].exchange_expecting_error.remote(name, [send_spec("send", 1, 0, 0, 16)], timeout_s), timeout=10
    )
    assert other["is_transfer_error"], other
    assert other["elapsed_s"] < timeout_s + SLACK_S, other
    ray.get([p.leave.remote(name) for p in peers[:2]], timeout=10)


@pytest.mark.timeout(60, func_only=True)
def test_error_types_are_transfer_errors():
    """The typed errors the transport raises share one base, and timeouts are TimeoutErrors."""
    assert issubclass(TransferTimeoutError, TransferError) and issubclass(TransferTimeoutError, TimeoutError)
    assert issubclass(PeerDiedError, TransferError)


# ---------------------------------------------------------------------------------------------
# EEP_NCCL: needs two CUDA devices (skipped elsewhere). Same code path as the workers on GPU hosts.
# ---------------------------------------------------------------------------------------------


def start_gpu_peers(n: int) -> list:
    actors = [ray.remote(num_cpus=0, num_gpus=1)(Peer).remote("cuda") for _ in range(n)]
    ray.get([a.ping.remote() for a in actors], timeout=120)
    return actors


@pytest.fixture(scope="module")
def gpu_peers(ray_session):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    actors = start_gpu_peers(2)
    yield actors  # a test may replace a member it killed
    for actor in actors:
        ray.kill(actor)


def keyed_all_pairs(world: int, numel: int) -> list[list[tuple]]:
    """Per rank, ``(key, kind, peer, spec)``: pair (a, b) swaps ``1 + (a + b) % 3`` messages each
    way, message k in round k, so ranks skip the rounds they have nothing in."""
    plans = [[] for _ in range(world)]
    for me in range(world):
        for peer in range(world):
            if peer == me:
                continue
            for k in range(1 + (me + peer) % 3):
                size = numel + 7 * k + me + peer  # both ends compute the same size
                plans[me] += [(k, *send_spec("send", me, peer, k, size)), (k, *send_spec("recv", me, peer, k, size))]
    return plans


def assert_keyed_received(result: dict, plan) -> None:
    expected = [identity_tensor(*spec) for key in sorted({e[0] for e in plan})
                for k, kind, _, spec in plan if k == key and kind == "recv"]
    assert result["error"] is None, result
    assert len(result["received"]) == len(expected)
    for got, want in zip(result["received"], expected):
        assert torch.equal(got, want), f"received {got[:4]} expected {want[:4]}"


@pytest.mark.timeout(60, func_only=True)
def test_rounds_drawn_lazily_with_skipped_keys(peers, store):
    """Four ranks, rounds made on demand by a generator; each pair swaps a different number of messages."""
    world = 4
    name, _ = form(peers[:world], store)
    plans = keyed_all_pairs(world, 1000)
    results = ray.get([p.exchange_rounds.remote(name, plans[r]) for r, p in enumerate(peers[:world])], timeout=30)
    for result, plan in zip(results, plans):
        assert_keyed_received(result, plan)
        assert result["drawn"] == sorted({e[0] for e in plan})
    ray.get([p.leave.remote(name) for p in peers[:world]], timeout=10)


@pytest.mark.timeout(60, func_only=True)
def test_failing_round_generator_breaks_the_group_and_the_peer_learns_in_bounded_time(peers, store):
    name, _ = form(peers[:2], store)
    plans = keyed_all_pairs(2, 1000)[:2]  # pair (0, 1): two messages each way, rounds 0 and 1
    refs = [peers[0].exchange_rounds.remote(name, plans[0], 3.0, fail_at=1),
            peers[1].exchange_rounds.remote(name, plans[1], 3.0)]
    failed, waited = ray.get(refs, timeout=30)
    assert failed["is_transfer_error"] and "packing failed at round 1" in failed["message"]
    assert failed["broken"] is not None  # round 0 may be posted: the group cannot be trusted again
    # the peer learns within its bound: gloo sees the aborted connection at once, NCCL at the deadline
    assert waited["is_transfer_error"] and waited["error"] in ("PeerDiedError", "TransferTimeoutError")
    assert waited["peers"] == [0] and waited["elapsed_s"] < 3.0 + 2.0
    ray.get([p.leave.remote(name) for p in peers[:2]], timeout=10)


@pytest.mark.gpu
@pytest.mark.timeout(240, func_only=True)
def test_nccl_rounds_in_flight_drawn_lazily(gpu_peers, store):
    """Six rounds each way (more than are ever in flight), drawn lazily, arrive intact over NCCL."""
    name, _ = form(gpu_peers, store, timeout_s=60)
    plans = [[(k, *send_spec(kind, me, 1 - me, k, (1 << 20) + k)) for k in range(6) for kind in ("send", "recv")]
             for me in range(2)]
    results = ray.get([p.exchange_rounds.remote(name, plans[r], 60.0) for r, p in enumerate(gpu_peers)], timeout=120)
    for result, plan in zip(results, plans):
        assert_keyed_received(result, plan)
    ray.get([p.leave.remote(name) for p in gpu_peers], timeout=30)


@pytest.mark.gpu
@pytest.mark.timeout(240, func_only=True)
def test_nccl_ring_rounds_and_ray_api(gpu_peers, store):
    numel = 64 << 20  # 256 MiB of float32 each way
    name, timings = form(gpu_peers, store, timeout_s=60)
    plans = ring_plans(2, numel)
    results = ray.get([p.exchange.remote(name, plans[r], repeat=3) for r, p in enumerate(gpu_peers)], timeout=120)
    for result, plan in zip(results, plans):
        assert_received(result, plan)
    steady_s = max(r["elapsed_s"] for r in results)
    print(
        f"\nnccl: formation {max(t['formation_s'] for t in timings):.2f} s, first exchange "
        f"{max(r['first_s'] for r in results) * 1e3:.1f} ms, steady {steady_s * 1e3:.2f} ms for 256 MiB each way "
        f"({numel * 4 / steady_s / 1e9:.0f} GB/s per direction)"
    )

    spec = (0, 1, 0, 1000, "bfloat16")
    send_ref = gpu_peers[0].ray_send.remote(name, 1, spec)
    assert torch.equal(ray.get(gpu_peers[1].ray_recv.remote(name, 0, spec), timeout=60), identity_tensor(*spec))
    ray.get(send_ref, timeout=60)
    reports = ray.get([p.ray_collectives.remote(name, r) for r, p in enumerate(gpu_peers)], timeout=60)
    assert all(r["sum"] == 3.0 and r["broadcast"] == 17.0 for r in reports), reports
    ray.get([p.leave.remote(name) for p in gpu_peers], timeout=30)

    name, _ = form(gpu_peers, store, timeout_s=60, max_ops_in_flight=4)  # two ops per direction per round
    sizes = [(1, "float32"), (4096, "bfloat16"), (777, "int64"), (65536, "float16"), (3, "float32")]
    plans = [
        [send_spec("send", me, 1 - me, k, n, d) for k, (n, d) in enumerate(sizes)]
        + [send_spec("recv", me, 1 - me, k, n, d) for k, (n, d) in enumerate(sizes)]
        for me in range(2)
    ]
    plans[1] = plans[1][len(sizes) :] + plans[1][: len(sizes)]  # rank 1 lists its receives first
    results = ray.get(
        [p.exchange.remote(name, plans[r], via_transport=True) for r, p in enumerate(gpu_peers)], timeout=60
    )
    for result, plan in zip(results, plans):
        assert_received(result, plan)
    ray.get([p.leave.remote(name) for p in gpu_peers], timeout=30)


@pytest.mark.gpu
@pytest.mark.timeout(240, func_only=True)
def test_nccl_timeout_aborts_and_the_worker_lives_on(gpu_peers, store):
    name, _ = form(gpu_peers, store, timeout_s=60)
    timeout_s = 3.0
    report = ray.get(
        gpu_peers[0].exchange_expecting_error.remote(name, [send_spec("recv", 0, 1, 0, 1 << 16)], timeout_s),
        timeout=timeout_s + 30,
    )
    assert report["error"] == "TransferTimeoutError" and report["peers"] == [1], report
    assert report["elapsed_s"] < timeout_s + SLACK_S, report
    again = ray.get(
        gpu_peers[0].exchange_expecting_error.remote(name, [send_spec("recv", 0, 1, 0, 16)], timeout_s), timeout=30
    )
    assert again["error"] == "TransferError" and "broken" in again["message"], again
    leave_s = ray.get([p.leave.remote(name) for p in gpu_peers], timeout=30)
    assert max(leave_s) < 2.0, leave_s

    name, timings = form(gpu_peers, store, timeout_s=60)  # the same processes and GPUs work in the next generation
    print(
        f"\nnccl timeout: raised after {report['elapsed_s']:.2f} s (timeout {timeout_s} s), leave "
        f"{max(leave_s) * 1e3:.0f} ms, next generation formed in {max(t['formation_s'] for t in timings):.2f} s"
    )
    plans = ring_plans(2, 4096)
    results = ray.get([p.exchange.remote(name, plans[r]) for r, p in enumerate(gpu_peers)], timeout=60)
    for result, plan in zip(results, plans):
        assert_received(result, plan)
    ray.get([p.leave.remote(name) for p in gpu_peers], timeout=30)


@pytest.mark.gpu
@pytest.mark.timeout(240, func_only=True)
def test_nccl_peer_killed_then_reform(gpu_peers, store):
    name, _ = form(gpu_peers, store, timeout_s=60)
    timeout_s = 5.0
    plan = [send_spec("recv", 0, 1, 0, 1 << 16), send_spec("send", 0, 1, 0, 1 << 16)]
    waiting = gpu_peers[0].exchange_expecting_error.remote(name, plan, timeout_s)
    time.sleep(1.0)
    ray.kill(gpu_peers[1], no_restart=True)
    report = ray.get(waiting, timeout=timeout_s + 30)
    assert report["error"] in ("PeerDiedError", "TransferTimeoutError"), report
    assert report["elapsed_s"] < timeout_s + SLACK_S, report
    assert ray.get(gpu_peers[0].ping.remote(), timeout=5) == "pong"
    assert ray.get(gpu_peers[0].leave.remote(name), timeout=30) < 2.0
    print(f"\nnccl peer killed: {report['error']} after {report['elapsed_s']:.2f} s")

    gpu_peers[1] = start_gpu_peers(1)[0]
    name, timings = form(gpu_peers, store, timeout_s=60)
    plans = ring_plans(2, 4096)
    results = ray.get([p.exchange.remote(name, plans[r]) for r, p in enumerate(gpu_peers)], timeout=60)
    for result, plan in zip(results, plans):
        assert_received(result, plan)
    print(f"nccl re-formed with a replacement: formation {max(t['formation_s'] for t in timings):.2f} s")
    ray.get([p.leave.remote(name) for p in gpu_peers], timeout=30)
