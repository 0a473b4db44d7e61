from __future__ import annotations

import numpy as np
import pytest

from mode_ray import kmeans


def _blobs(n: int = 3000, d: int = 32, centers: int = 6, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    mu = rng.normal(size=(centers, d))
    labels = rng.integers(0, centers, n)
    x = mu[labels] + 0.3 * rng.normal(size=(n, d))
    return kmeans.l2_normalize(x), labels


def test_balanced_assign_respects_capacity_and_prefers_near_points():
    x, _ = _blobs()
    rng = np.random.default_rng(1)
    cents = x[rng.choice(len(x), 20, replace=False)]
    labels, scores = kmeans.balanced_assign(x, cents)
    sizes = np.bincount(labels, minlength=20)
    assert labels.min() >= 0 and sizes.max() <= -(-len(x) // 20)
    np.testing.assert_allclose(scores, np.einsum("ij,ij->i", x, cents[labels]), atol=1e-5)
    # Balanced, but not arbitrary: most points still land in one of their few nearest clusters.
    _, top = kmeans.nearest(x, cents, 4)
    assert (top == labels[:, None]).any(axis=1).mean() > 0.8
    with pytest.raises(ValueError, match="cannot hold"):
        kmeans.balanced_assign(x, cents, capacity=10)


def test_balanced_kmeans_is_balanced_and_deterministic():
    x, _ = _blobs()
    a = kmeans.spherical_kmeans(x, 24, iterations=30, seed=3)
    b = kmeans.spherical_kmeans(x, 24, iterations=30, seed=3)
    np.testing.assert_array_equal(a.centroids, b.centroids)
    assert a.sizes.max() <= 1.1 * a.sizes.mean()
    np.testing.assert_allclose(np.linalg.norm(a.centroids, axis=1), 1.0, atol=1e-5)
    assert a.history == sorted(a.history) or a.history[-1] >= a.history[0]


def test_plain_faiss_mode_and_two_step():
    x, truth = _blobs(centers=4)
    plain = kmeans.spherical_kmeans(x, 16, balanced=False)
    assert plain.centroids.shape == (16, 32)
    steps = kmeans.two_step(x, n_fine=16, n_coarse=4, seed=0)
    assert steps.fine.shape == (16, 32) and steps.coarse.shape == (4, 32)
    fine, coarse, score = steps.assign(x)
    np.testing.assert_array_equal(coarse, steps.fine_to_coarse[fine])
    # The coarse clusters recover the 4 planted groups.
    purity = sum(np.bincount(truth[coarse == c]).max() for c in range(4) if (coarse == c).any()) / len(x)
    assert purity > 0.95
    assert np.all(score <= 1.0 + 1e-5)


def test_too_few_points_is_a_clear_error():
    x, _ = _blobs(n=5)
    with pytest.raises(ValueError, match="cannot fit"):
        kmeans.spherical_kmeans(x, 8)
