"""page_ranges: the page-aligned union of byte spans that cudaHostRegister is given."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from elastic_ep.hostmem import page_ranges

PAGE = 4096


def test_worked_example():
    spans = [(3 * PAGE + 10, 100), (3 * PAGE + 200, 5000), (0, 0), (10 * PAGE, PAGE), (11 * PAGE, 1)]
    # the first two share page 3 and run into page 4; the last two touch; the empty span is dropped
    assert page_ranges(spans, PAGE) == [(3 * PAGE, 2 * PAGE), (10 * PAGE, 2 * PAGE)]


def test_bad_page_size():
    with pytest.raises(ValueError, match="power of two"):
        page_ranges([(0, 1)], 3000)
    with pytest.raises(ValueError, match="power of two"):
        page_ranges([(0, 1)], 0)


@settings(max_examples=400, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 40 * PAGE), st.integers(0, 5 * PAGE)), max_size=12))
def test_union_is_exact_disjoint_and_aligned(spans):
    out = page_ranges(spans, PAGE)
    pages_wanted = {p for a, n in spans if n > 0 for p in range(a // PAGE, (a + n - 1) // PAGE + 1)}
    pages_got = set()
    for (start, n), nxt in zip(out, out[1:] + [None]):
        assert start % PAGE == 0 and n > 0 and n % PAGE == 0
        if nxt is not None:
            assert start + n < nxt[0]  # disjoint, sorted, and not touching (else they would be one range)
        pages_got |= set(range(start // PAGE, (start + n) // PAGE))
    assert pages_got == pages_wanted  # every page under a span, and no other page
