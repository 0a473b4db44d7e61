"""Expert weights from task metadata (class names): MoDE's inference-time task adaptation. numpy only.

Two methods, both from the same inputs — the label embeddings (template-averaged, L2-normalised, by the
clustering encoder), the fine centres and the fine→coarse map:

* `reference` — the released MoDE code, exactly (docs/reference-differences.md): each label's L2 distance
  to its nearest raw fine centre, sharpened by the label count, summed per expert, softmax(r / 8). With the distances
  unit vectors have (≈ 0.6–1.2) and tens of labels, r stays tiny and the weights come out nearly uniform.
* `calibrated` — ours: cosine similarity of the labels to every fine centre, soft-assigned with a
  temperature and averaged over each expert's fine clusters, then normalised over experts. The
  average (not the sum) keeps an expert that owns more fine clusters from winning by count alone, so
  temperature → ∞ gives exactly uniform weights and → 0 one-hot on the best centre's expert.

Either gives one weight vector per task, or with `per_class` one per label (each label routed as a task
of its own — what text→image retrieval does per caption).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import numpy as np

Method = Literal["reference", "calibrated"]
REFERENCE_SOFTMAX_DIVISOR = 8.0  # the released code's softmax(r / 8)


@dataclass(frozen=True)
class Routing:
    """Expert weights for one label set, and the per-label facts they came from (for logs and reports)."""

    method: str
    weights: np.ndarray  # [E] for the task, or [L, E] with per_class
    nearest_fine: np.ndarray  # [L] each label's nearest fine centre
    distance: np.ndarray  # [L] L2 distance to it
    label_expert: np.ndarray  # [L] that centre's expert

    @property
    def task_weights(self) -> np.ndarray:
        """One vector per task even for per-class routing (the mean over labels), for reports."""
        return self.weights if self.weights.ndim == 1 else self.weights.mean(axis=0)


def _softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    shifted = x - x.max(axis=axis, keepdims=True)
    e = np.exp(shifted)
    return e / e.sum(axis=axis, keepdims=True)


def nearest_fine(labels: np.ndarray, fine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(index, L2 distance) of each label's nearest fine centre, by matmul: no [L, K, d] tensor."""
    labels = labels.astype(np.float64)
    fine = fine.astype(np.float64)
    sq = (labels**2).sum(1)[:, None] + (fine**2).sum(1)[None, :] - 2.0 * labels @ fine.T
    idx = sq.argmin(axis=1)
    return idx, np.sqrt(np.maximum(sq[np.arange(len(labels)), idx], 0.0))


def reference_sharpening(n_labels: int) -> tuple[float, float]:
    """(β, α) of the released code: β = 5·log10(max(10, |L| − 200)); α = exp(0.5 − √|L|) if |L| < 10 else 0."""
    beta = 5.0 * np.log10(max(10, n_labels - 200))
    alpha = float(np.exp(0.5 - np.sqrt(n_labels))) if n_labels < 10 else 0.0
    return float(beta), alpha


def reference_weights(
    labels: np.ndarray, fine: np.ndarray, fine_to_coarse: np.ndarray, n_experts: int, per_class: bool = False
) -> Routing:
    """The released MoDE routing: r_c = Σ_{l: c(l)=c} exp(β(α − d_l)); p = softmax(r / 8)."""
    idx, dist = nearest_fine(labels, fine)
    experts = fine_to_coarse[idx].astype(np.int64)
    n = len(labels)
    if per_class:
        beta, alpha = reference_sharpening(1)
        r = np.zeros((n, n_experts))
        r[np.arange(n), experts] = np.exp(beta * (alpha - dist))
        weights = _softmax(r / REFERENCE_SOFTMAX_DIVISOR, axis=1)
    else:
        beta, alpha = reference_sharpening(n)
        r = np.bincount(experts, weights=np.exp(beta * (alpha - dist)), minlength=n_experts)
        weights = _softmax(r / REFERENCE_SOFTMAX_DIVISOR)
    return Routing("reference", weights, idx, dist, experts)


def calibrated_weights(
    labels: np.ndarray,
    fine: np.ndarray,
    fine_to_coarse: np.ndarray,
    n_experts: int,
    temperature: float,
    per_class: bool = False,
    top_k: int | None = None,
) -> Routing:
    """Soft assignment to the fine centres at `temperature`, averaged per expert, normalised over experts.

    The task variant scores each centre by its mean similarity to the labels (the similarity to the
    task's mean label embedding), so one temperature means the same for 2 labels or 1,000.
    """
    if temperature <= 0:
        raise ValueError(f"routing temperature must be > 0, got {temperature}")
    idx, dist = nearest_fine(labels, fine)
    unit = fine / np.maximum(np.linalg.norm(fine, axis=1, keepdims=True), 1e-12)
    sims = labels.astype(np.float64) @ unit.T.astype(np.float64)  # [L, K]
    scores = sims if per_class else sims.mean(axis=0, keepdims=True)
    owner = fine_to_coarse.astype(np.int64)
    counts = np.bincount(owner, minlength=n_experts).astype(np.float64)
    # log of the mean of exp(s / T) over each expert's centres, in a numerically safe order.
    z = scores / temperature
    z_max = z.max(axis=1, keepdims=True)
    per_expert = np.zeros((len(z), n_experts))
    for e in range(n_experts):  # E is small (2–16): a loop over experts, vectorised over labels and centres
        if counts[e]:
            per_expert[:, e] = np.exp(z[:, owner == e] - z_max).sum(axis=1) / counts[e]
    log_w = np.where(per_expert > 0, np.log(np.maximum(per_expert, 1e-300)), -np.inf)
    weights = _softmax(log_w, axis=1)
    if top_k is not None:
        weights = keep_top_k(weights, top_k)
    return Routing("calibrated", weights if per_class else weights[0], idx, dist, owner[idx])


def keep_top_k(weights: np.ndarray, k: int) -> np.ndarray:
    """Zero all but the k largest weights of each row, and renormalise."""
    if k < 1:
        raise ValueError(f"top_k must be >= 1, got {k}")
    if k >= weights.shape[-1]:
        return weights
    cut = -np.sort(-weights, axis=-1)[..., k - 1 : k]
    kept = np.where(weights >= cut, weights, 0.0)
    return kept / kept.sum(axis=-1, keepdims=True)


def distance_from_uniform(weights: np.ndarray) -> float:
    """Total-variation distance of the (task) weights from uniform: 0 = all_unit, 1 − 1/E = one-hot."""
    w = weights if weights.ndim == 1 else weights.mean(axis=0)
    return float(0.5 * np.abs(w - 1.0 / len(w)).sum())


def route(
    method: Method,
    labels: np.ndarray,
    fine: np.ndarray,
    fine_to_coarse: np.ndarray,
    n_experts: int,
    temperature: float = 0.02,
    per_class: bool = False,
    top_k: int | None = None,
    reference_fine: np.ndarray | None = None,
) -> Routing:
    """Dispatch on the method name (config and request parameters carry it as a string). `reference_fine`: the
    centres the reference method measures distances to (default `fine`; the raw member means reproduce the
    released code, which stores those)."""
    if method == "reference":
        centres = fine if reference_fine is None else reference_fine
        routing = reference_weights(labels, centres, fine_to_coarse, n_experts, per_class)
        if top_k is not None:  # an option beyond the reference
            routing = replace(routing, weights=keep_top_k(routing.weights, top_k))
        return routing
    if method == "calibrated":
        return calibrated_weights(labels, fine, fine_to_coarse, n_experts, temperature, per_class, top_k)
    raise ValueError(f"unknown routing method {method!r}: use 'reference' or 'calibrated'")
