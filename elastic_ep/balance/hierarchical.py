"""Hierarchical placement (DeepSeek EPLB): expert groups onto nodes, then experts onto each node's ranks."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .slots import EMPTY, gather_rows, relabel_to_old
from .sticky import solve


def hierarchy(nodes: Sequence[int], num_groups: int, num_experts: int, spr: int):
    """Whether hierarchical placement applies: equal ranks per node and groups dividing over nodes."""
    node_ids = sorted(set(nodes))
    num_nodes = len(node_ids)
    if num_nodes <= 1 or num_groups <= 1 or num_groups % num_nodes or num_experts % num_groups:
        return None
    sizes = {sum(1 for n in nodes if n == k) for k in node_ids}
    if len(sizes) != 1:
        return None
    per_node = sizes.pop()
    experts_per_node = num_experts // num_nodes
    if per_node * spr < experts_per_node or spr > experts_per_node:
        return None
    return True


def place_hierarchical(load, old_slots, nodes, num_groups, spr, tolerance, sticky, with_ref=False):
    """Step 1: groups to nodes. Steps 2-3: replicate and pack within each node.

    Returns phy2log [L, R * S]. With ``with_ref``, returns (phy2log, a function giving
    eplb's hierarchical phy2log of the same load for some layers, and the max rank load
    per layer of both: [L], [L]); eplb's problems are packed in the same batches as the
    references sticky needs anyway.
    """
    num_layers, num_experts = load.shape
    node_ids = sorted(set(nodes))
    num_nodes = len(node_ids)
    per_node = len(nodes) // num_nodes
    group_size = num_experts // num_groups
    groups_per_node = num_groups // num_nodes
    group_load = load.reshape(num_layers, num_groups, group_size).sum(axis=2)
    # Step 1: pack groups onto nodes (each node gets groups_per_node groups).
    node_of = np.asarray(nodes)
    positions = np.concatenate([np.nonzero(node_of == n)[0] for n in node_ids])  # rank positions, node by node
    old_groups = None
    if sticky and old_slots is not None:
        old_groups = _old_group_nodes(old_slots, positions, num_nodes, num_groups, group_size, groups_per_node)
    # Groups are packed like experts with one replica each: sticky keeps a group on its node.
    placed = solve(group_load, old_groups, num_nodes, groups_per_node, sticky, tolerance,
                   extra=group_load if with_ref else None)
    if with_ref:
        placed, ref_placed = placed[:2]
    node_experts = _node_experts(placed, num_groups, group_size)  # [L, N, n_local]
    n_local = node_experts.shape[2]
    weight = gather_rows(load, node_experts.reshape(num_layers, -1)).reshape(num_layers * num_nodes, n_local)
    old_local = None
    if old_slots is not None:
        # Map each node's old slots to local ids; experts not owned by the node cannot stay.
        to_local = np.full((num_layers * num_nodes, num_experts + 1), EMPTY, dtype=np.int64)
        to_local[np.arange(num_layers * num_nodes)[:, None], node_experts.reshape(-1, n_local)] = np.arange(n_local)
        held = old_slots[:, positions, :].reshape(num_layers * num_nodes, per_node * spr)
        old_local = gather_rows(to_local, np.where(held >= 0, held, num_experts))
        old_local = old_local.reshape(num_layers * num_nodes, per_node, spr)
    ref_experts = ref_weight = None
    if with_ref:
        ref_experts = _node_experts(ref_placed, num_groups, group_size)
        ref_weight = gather_rows(load, ref_experts.reshape(num_layers, -1)).reshape(weight.shape)
    slots = solve(weight, old_local, per_node, spr, sticky, tolerance, extra=ref_weight, group=num_nodes)
    if not with_ref:
        return _node_slots_to_global(slots, node_experts, positions)
    slots, ref_slots, slots_max, ref_max = slots

    def ref_of(layers: np.ndarray) -> np.ndarray:
        """eplb's phy2log of some layers (bool [L]): [W, R * S]; most rounds need none."""
        per_layer = ref_slots.reshape(num_layers, num_nodes, per_node, spr)[layers]
        return _node_slots_to_global(per_layer.reshape(-1, per_node, spr), ref_experts[layers], positions)

    # Layer max rank loads: the largest over the layer's nodes.
    return (
        _node_slots_to_global(slots, node_experts, positions),
        ref_of,
        slots_max.reshape(num_layers, num_nodes).max(axis=1),
        ref_max.reshape(num_layers, num_nodes).max(axis=1),
    )


def within_tolerance(load, phy2log, old_slots, nodes, req, spr, ref, got, ref_max) -> np.ndarray:
    """Per layer, keep the sticky hierarchical placement only if its max rank load is within
    tolerance of eplb's; otherwise take eplb's, ranks relabelled to the old layout (within
    nodes). ref: eplb's phy2log of the layers asked for (bool [L] -> [W, P]); got, ref_max:
    max rank load per layer [L] of the sticky placement and of eplb's."""
    num_ranks = len(nodes)
    lower = load.sum(axis=1) / num_ranks
    worse = (got > lower * (1 + req.tolerance)) & (got > ref_max * (1 + req.tolerance))
    if not worse.any():
        return phy2log
    fixed = relabel_to_old(
        ref(worse).reshape(-1, num_ranks, spr), old_slots[worse], groups=np.asarray(nodes)
    )
    phy2log = phy2log.copy()
    phy2log[worse] = fixed.reshape(int(worse.sum()), -1)
    return phy2log


def _node_experts(placed: np.ndarray, num_groups: int, group_size: int) -> np.ndarray:
    """Experts of each node, in group order: [L, N, groups_per_node * group_size].

    placed: [L, N, groups_per_node] the groups packed onto each node.
    """
    num_layers, num_nodes, groups_per_node = placed.shape
    gnode = np.empty((num_layers, num_groups), dtype=np.int64)
    gnode[np.arange(num_layers)[:, None], placed.reshape(num_layers, -1)] = np.repeat(
        np.arange(num_nodes), groups_per_node
    )
    order = np.argsort(gnode, axis=1, kind="stable")  # [L, G]: groups node by node, ascending
    node_groups = order.reshape(num_layers, num_nodes, groups_per_node)
    return (node_groups[..., None] * group_size + np.arange(group_size)).reshape(num_layers, num_nodes, -1)


def _node_slots_to_global(slots: np.ndarray, node_experts: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """Per-node packings of local expert ids to phy2log [L, R * S] of global ids.

    slots: [L * N, per_node, S]; node_experts: [L, N, n_local]; positions: [R] rank
    positions of the nodes' ranks, node by node.
    """
    num_layers, num_nodes, n_local = node_experts.shape
    _, per_node, spr = slots.shape
    glob = gather_rows(node_experts.reshape(-1, n_local), slots.reshape(num_layers * num_nodes, -1))
    out = np.empty((num_layers, len(positions), spr), dtype=np.int64)
    out[:, positions, :] = glob.reshape(num_layers, num_nodes * per_node, spr)
    return out.reshape(num_layers, -1)


def _old_group_nodes(old_slots, positions, num_nodes, num_groups, group_size, groups_per_node) -> np.ndarray:
    """Which groups each node held before: [L, N, groups_per_node] (-1 where none).

    positions: [R] rank positions node by node. A group belongs to the node holding most
    of its replicas; a node claiming more than ``groups_per_node`` groups keeps those it
    holds most replicas of.
    """
    num_layers = old_slots.shape[0]
    held = old_slots[:, positions, :].reshape(num_layers, num_nodes, -1)
    grp = np.where(held >= 0, held // group_size, num_groups)
    at = (np.arange(num_layers)[:, None, None] * (num_groups + 1) + grp) * num_nodes + np.arange(num_nodes)[:, None]
    count = np.bincount(at.ravel(), minlength=num_layers * (num_groups + 1) * num_nodes)
    count = count.reshape(num_layers, num_groups + 1, num_nodes)[:, :num_groups]  # [L, G, N]
    owner = count.argmax(axis=2)  # [L, G]
    strength = np.take_along_axis(count, owner[:, :, None], axis=2)[:, :, 0]
    out = np.full((num_layers, num_nodes, groups_per_node), EMPTY, dtype=np.int64)
    # Per (layer, node): its claimed groups, strongest first, at most groups_per_node.
    order = np.lexsort((np.arange(num_groups)[None, :].repeat(num_layers, 0), -strength, owner), axis=1)
    sorted_owner = np.take_along_axis(owner, order, axis=1)
    sorted_strength = np.take_along_axis(strength, order, axis=1)
    first = np.ones_like(sorted_owner, dtype=bool)
    first[:, 1:] = sorted_owner[:, 1:] != sorted_owner[:, :-1]
    idx = np.arange(num_groups)[None, :]
    rank_in_node = idx - np.maximum.accumulate(np.where(first, idx, 0), axis=1)
    keep = (rank_in_node < groups_per_node) & (sorted_strength > 0)
    ll, gg = np.nonzero(keep)
    out[ll, sorted_owner[ll, gg], rank_in_node[ll, gg]] = order[ll, gg]
    return out
