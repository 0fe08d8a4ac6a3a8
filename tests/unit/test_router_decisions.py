"""The synthetic router as a generator of router decisions: distinct top-k experts per token, weights summing to 1."""

import numpy as np

from elastic_ep.workload import SkewedRouter


def test_decisions_are_well_formed_and_follow_popularity():
    router = SkewedRouter(num_layers=3, num_experts=16, zipf_s=1.5, top_k=4, seed=2)
    ids, weights = router.decide(3000)
    assert ids.shape == weights.shape == (3, 3000, 4)
    assert ids.dtype == np.int64 and weights.dtype == np.float32
    assert ids.min() >= 0 and ids.max() < 16
    assert np.all(np.sort(ids, axis=2)[:, :, 1:] != np.sort(ids, axis=2)[:, :, :-1])  # distinct per token
    np.testing.assert_allclose(weights.sum(axis=2), 1.0, rtol=1e-5)
    assert np.all(weights > 0)
    for layer in range(3):  # the most popular expert is picked most often
        counts = np.bincount(ids[layer].ravel(), minlength=16)
        assert counts.argmax() == router.weights[layer].argmax()


def test_top_k_is_capped_by_the_expert_count():
    ids, weights = SkewedRouter(num_layers=1, num_experts=3, top_k=6, seed=0).decide(5)
    assert ids.shape == (1, 5, 3) and np.all(np.sort(ids[0], axis=1) == np.arange(3))
