"""Backups: which BackupStore holds each expert's host copy; making, finding and restoring those copies."""

from __future__ import annotations

from typing import Optional

import ray
from ray.exceptions import GetTimeoutError, RayError

from elastic_ep.config import ClusterConfig
from elastic_ep.layout import ExpertLayout

from .ray_workers import NodePins, RayWorkerGroup


class Backups:
    """One host copy of each (layer, expert), in a BackupStore actor on a logical node other than its source's.

    Stores are detached named actors (names never reused), so a controller restart
    reattaches them by name; a store that died (with its node) is forgotten along with
    what it held, and its experts are copied again from live replicas.
    """

    def __init__(self, cfg: ClusterConfig, prefix: str, workers: RayWorkerGroup, pins: NodePins):
        self.cfg = cfg
        self.prefix = prefix
        self.workers = workers
        self.pins = pins
        self.stores: list = []
        self.names: list[str] = []  # actor name of each logical node's store ("" where none was started)
        self.next_store = 0  # stores started so far
        self.backup_of: dict[tuple[int, int], int] = {}  # (layer, expert) -> store index
        self.preparing: dict = {}  # worker id -> ObjectRef of its prepare_backups call

    # -- persistence ------------------------------------------------------------------------

    def to_dict(self) -> dict:
        return {"backup_of": [[l, e, s] for (l, e), s in self.backup_of.items()], "backup_names": self.names,
                "next_store": self.next_store}

    def restore(self, state: dict) -> None:
        self.backup_of = {(int(l), int(e)): int(s) for l, e, s in state["backup_of"]}
        self.names = list(state["backup_names"])
        self.next_store = int(state.get("next_store", len(self.names)))
        self.stores = []
        for name in self.names:
            try:
                self.stores.append(ray.get_actor(name) if name else None)
            except ValueError:
                self.stores.append(None)

    # -- stores -----------------------------------------------------------------------------

    def _store_for(self, node: int):
        from actors.backup import BackupStore

        while len(self.stores) <= node:
            self.stores.append(None)
            self.names.append("")
        if self.stores[node] is None:  # first use, or its store died (with its node): a new one
            name = f"{self.prefix}-backup{node}-{self.next_store}"
            self.next_store += 1
            opts = {"name": name, "lifetime": "detached", "num_cpus": 0, **self.pins.options(node, "cpu")}
            self.stores[node] = ray.remote(BackupStore).options(**opts).remote(node)
            self.names[node] = name
        return self.stores[node]

    def drop_dead_stores(self) -> None:
        """Forget stores that do not answer (their objects died with them), and what they held."""
        refs = {s: (None, h.ping.remote()) for s, h in enumerate(self.stores) if h is not None}
        got = self.workers.wait_all(refs, self.cfg.call_timeout_s, "backup ping", tolerate_dead=True)
        for s in set(refs) - set(got):
            self._forget(s)

    def _forget(self, s: int) -> None:
        self.stores[s] = None
        for k in [k for k, v in self.backup_of.items() if v == s]:
            del self.backup_of[k]

    def make(self, layout: ExpertLayout, members: dict[int, str], rank_nodes: dict[int, int],
             keys: Optional[list[tuple[int, int]]] = None) -> int:
        """Copy each expert from a live holder into a store on the next logical node; returns bytes stored."""
        from actors.backup import INGEST_CHUNK_BYTES

        spec = self.cfg.model
        num_nodes = max(1, self.cfg.num_nodes)
        want = keys if keys is not None else [(l, e) for l in range(spec.num_layers) for e in range(spec.num_experts)]
        want = [k for k in want if k not in self.backup_of]
        by_pair: dict[tuple[str, int], list] = {}
        log2phy = layout.log2phy
        for layer, expert in want:
            holders = [layout.ranks[p // layout.slots_per_rank] for p in log2phy[layer, expert] if p >= 0]
            holders = [r for r in holders if not self.workers.is_dead(members.get(r, ""))]
            if not holders:
                continue
            src = holders[0]
            node = (rank_nodes.get(src, 0) + 1) % num_nodes
            by_pair.setdefault((members[src], node), []).append((layer, expert))
        refs = {}
        for (wid, node), ks in by_pair.items():
            refs[(wid, node)] = (None, self._store_for(node).ingest.remote(
                self.workers.handle(wid), ks, self.cfg.call_timeout_s, expert_bytes=spec.expert_bytes))
            for k in ks:
                self.backup_of[k] = node
        chunks = 1 + len(want) * spec.expert_bytes // INGEST_CHUNK_BYTES  # export calls per ingest, at most
        got = self.workers.wait_all(refs, self.cfg.call_timeout_s * (1 + chunks), "backup", tolerate_dead=True)
        for pair, ks in by_pair.items():
            if pair not in got:
                for k in ks:
                    self.backup_of.pop(k, None)
        return int(sum(got.values()))

    def missing(self) -> list[tuple[int, int]]:
        spec = self.cfg.model
        return [(l, e) for l in range(spec.num_layers) for e in range(spec.num_experts) if (l, e) not in self.backup_of]

    def refs(self, keys: list[tuple[int, int]]) -> dict:
        """ObjectRefs of the backups of ``keys`` that a live store holds (missing keys left out)."""
        by_store: dict[int, list] = {}
        for k in keys:
            s = self.backup_of.get(k)
            if s is not None and self.stores[s] is not None:
                by_store.setdefault(s, []).append(k)
        out = {}
        for s, ks in by_store.items():
            try:
                out.update(ray.get(self.stores[s].refs.remote(ks), timeout=self.cfg.call_timeout_s))
            except (RayError, GetTimeoutError):
                self._forget(s)
        return out

    # -- warming spares ---------------------------------------------------------------------

    def prepare(self, spares: list[str], members: list[str], striping: bool) -> None:
        """Have each live spare map (and on GPUs page-lock) every host backup, in the background.

        With striped reads, members map every backup too (what they could read for a dead
        peer: all of them, since a rebalance changes what each holds), with no extra
        staging reserve. Page-locking is in place: no second host copy. Off the critical
        path: the calls are not awaited. A worker that needs a backup before it finishes
        reads it the slow way; ``status()`` shows progress.
        """
        if not (self.cfg.prepare_spares and self.cfg.keep_backups):
            return
        refs = self.refs(sorted(self.backup_of))
        if not refs:
            return
        timeout = self.cfg.startup_timeout_s
        for wid in self.workers.live(spares):
            self.preparing[wid] = self.workers.submit(wid, "prepare_backups", refs, timeout)
        if striping:
            for wid in self.workers.live(members):
                self.preparing[wid] = self.workers.submit(wid, "prepare_backups", refs, timeout, 0.0)

    def prepared(self, wids: set[str]) -> dict:
        """Per worker in ``wids``: its prepare_backups result, "preparing", or the error it raised."""
        out = {}
        for wid, ref in list(self.preparing.items()):
            if self.workers.is_dead(wid):
                self.preparing.pop(wid, None)
                continue
            if wid not in wids:
                continue
            if not ray.wait([ref], timeout=0)[0]:
                out[wid] = "preparing"
                continue
            try:
                out[wid] = ray.get(ref, timeout=1.0)
            except (RayError, GetTimeoutError) as exc:
                out[wid] = f"failed: {type(exc).__name__}: {str(exc)[:200]}"
        return out

    def shutdown(self) -> None:
        for s in self.stores:
            if s is not None:
                try:
                    ray.kill(s)
                except Exception:  # noqa: BLE001 - already gone
                    pass
