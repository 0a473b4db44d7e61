"""Routing and ensembling as plain functions: the released formula by hand, the calibrated limits."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest

from mode_ray.config import EmbeddingConfig, RoutingConfig
from mode_ray.eval.scoring import restrict
from mode_ray.eval.zero_shot import ensemble_logits
from mode_ray.routing.router import EncoderMismatch, TaskRouter
from mode_ray.routing.weights import calibrated_weights, distance_from_uniform, keep_top_k, reference_weights, route


def _unit(x):
    x = np.asarray(x, dtype=np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


FINE = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.6, 0.8, 0.0]])
FINE_TO_COARSE = np.array([0, 1, 1, 2])
LABELS = _unit([[0.9, 0.1, 0.2], [0.1, 0.9, 0.3], [0.2, 0.3, 0.9]])


def _by_hand(labels, fine, fine_to_coarse, n_experts):
    """The released code's formula written out with scalars only."""
    n = len(labels)
    beta = 5 * math.log10(max(10, n - 200))
    alpha = math.exp(0.5 - math.sqrt(n)) if n < 10 else 0.0
    r = [0.0] * n_experts
    for e in labels:
        dists = [math.dist(e, mu) for mu in fine]
        s = min(range(len(fine)), key=lambda i: dists[i])
        r[fine_to_coarse[s]] += math.exp(beta * (alpha - dists[s]))
    z = [math.exp(v / 8) for v in r]
    return [v / sum(z) for v in z]


def test_reference_formula_matches_a_hand_computed_example():
    got = reference_weights(LABELS, FINE, FINE_TO_COARSE, 4)
    expected = _by_hand(LABELS.tolist(), FINE.tolist(), FINE_TO_COARSE.tolist(), 4)
    np.testing.assert_allclose(got.weights, expected, atol=1e-6, rtol=0)
    # The same numbers, pinned: expert 1 owns two labels' nearest centres, expert 3 none (r = 0).
    np.testing.assert_allclose(got.weights, [0.26833249, 0.27413322, 0.22876715, 0.22876715], atol=1e-6)
    assert got.label_expert.tolist() == [0, 1, 1] and got.nearest_fine.tolist() == [0, 1, 2]
    # Many labels: α = 0 and β grows with |L| − 200, as in the released code.
    many = _unit(np.random.default_rng(0).normal(size=(320, 3)))
    np.testing.assert_allclose(
        reference_weights(many, FINE, FINE_TO_COARSE, 4).weights,
        _by_hand(many.tolist(), FINE.tolist(), FINE_TO_COARSE.tolist(), 4),
        atol=1e-6,
    )


def test_reference_weights_are_nearly_uniform_at_typical_distances():
    # Ten labels at L2 distance ~0.65 from their nearest centre (cosine ~0.8), all nearest to expert 0.
    rng = np.random.default_rng(4)
    labels = _unit(np.array([1.0, 0.0, 0.0]) + rng.normal(0, 0.05, size=(10, 3)) + [0, 0, 0.8])
    routed = reference_weights(labels, FINE, FINE_TO_COARSE, 3)
    assert (routed.label_expert == 0).all() and 0.4 < routed.distance.mean() < 0.8
    assert distance_from_uniform(routed.weights) < 0.03  # why the report shows the distance from uniform
    calibrated = calibrated_weights(labels, FINE, FINE_TO_COARSE, 3, 0.05)
    assert calibrated.weights[0] > 0.9


@pytest.mark.parametrize("per_class", [False, True])
def test_calibrated_limits_and_normalisation(per_class):
    rng = np.random.default_rng(1)
    labels = _unit(rng.normal(size=(7, 3)))
    cold = calibrated_weights(labels, FINE, FINE_TO_COARSE, 3, 1e-4, per_class).weights
    hot = calibrated_weights(labels, FINE, FINE_TO_COARSE, 3, 1e6, per_class).weights
    mid = calibrated_weights(labels, FINE, FINE_TO_COARSE, 3, 0.05, per_class).weights
    for w in (cold, hot, mid):
        np.testing.assert_allclose(w.sum(axis=-1), 1.0, atol=1e-12)
        assert (w >= 0).all()
    np.testing.assert_allclose(np.sort(cold, axis=-1)[..., -1], 1.0, atol=1e-9)  # one-hot
    np.testing.assert_allclose(hot, 1.0 / 3, atol=1e-5)  # uniform, however many centres each expert owns
    # One-hot on the expert of the best centre (by mean similarity for the task variant).
    sims = labels @ _unit(FINE).T
    best = sims.argmax(1) if per_class else np.array([sims.mean(0).argmax()])
    assert np.array_equal(cold.reshape(-1, 3).argmax(1), FINE_TO_COARSE[best])


def test_top_k_and_unknown_method():
    w = np.array([[0.1, 0.5, 0.4], [0.7, 0.2, 0.1]])
    np.testing.assert_allclose(keep_top_k(w, 1), [[0, 1, 0], [1, 0, 0]])
    np.testing.assert_allclose(keep_top_k(w, 2), [[0, 5 / 9, 4 / 9], [7 / 9, 2 / 9, 0]])
    routed = route("calibrated", LABELS, FINE, FINE_TO_COARSE, 3, 0.5, top_k=2)
    assert (routed.weights > 0).sum() == 2 and routed.weights.sum() == pytest.approx(1)
    with pytest.raises(ValueError, match="unknown routing method"):
        route("nearest", LABELS, FINE, FINE_TO_COARSE, 3)


def test_ensemble_of_one_expert_is_that_expert_exactly():
    logits = np.random.default_rng(2).normal(size=(1, 20, 6)).astype(np.float32)
    assert np.array_equal(ensemble_logits(logits, np.array([1.0])), logits[0])
    assert np.array_equal(ensemble_logits(logits, np.ones((6, 1))), logits[0])
    # Routing weights restricted to the one trained expert become exactly 1.
    assert restrict(np.array([0.2, 0.7, 0.1]), [1]).tolist() == [1.0]
    weights = np.array([0.25, 0.75])
    two = np.random.default_rng(3).normal(size=(2, 5, 4))
    np.testing.assert_allclose(ensemble_logits(two, weights), 0.25 * two[0] + 0.75 * two[1])


def test_router_refuses_centroids_of_another_encoder(tmp_path):
    buf = io.BytesIO()
    np.savez(buf, fine=FINE, coarse=FINE[:3], fine_to_coarse=FINE_TO_COARSE, encoder_id=np.array("hf:some/simcse"))
    (tmp_path / "clusters").mkdir()
    (tmp_path / "clusters" / "centroids.npz").write_bytes(buf.getvalue())
    with pytest.raises(EncoderMismatch, match="hf:some/simcse"):
        TaskRouter.from_run(str(tmp_path), EmbeddingConfig(encoder="minilm"), RoutingConfig())
