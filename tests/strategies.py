"""Hypothesis building blocks shared by the pure tests."""

from hypothesis import strategies as st


def placement_sizes(draw, max_layers: int, max_experts: int, max_ranks: int) -> tuple[int, int, int, int]:
    """(num_layers, num_experts, num_ranks, slots_per_rank) with room for every expert once."""
    num_layers = draw(st.integers(1, max_layers))
    num_experts = draw(st.integers(4, max_experts))
    num_ranks = draw(st.integers(2, max_ranks))
    return num_layers, num_experts, num_ranks, draw(st.integers(-(-num_experts // num_ranks), num_experts))
