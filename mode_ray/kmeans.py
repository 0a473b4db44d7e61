"""Two-step clustering for MoDE: balanced k-means (fine), k-means of the fine centres (coarse).

Plain numpy + faiss, no Ray. Inputs are L2-normalised. Two geometries (`clustering.geometry`):
- spherical (default): centres are unit vectors (normalised member means), nearness is cosine;
- euclidean (the reference's k-means): centres are the raw member means (norms below 1), nearness is L2.
Both are searched by inner product: for a unit point, ||x − c||² = 1 + ||c||² − 2·x·c, so the L2-nearest
centre is the one with the largest x·c − ||c||²/2, the inner product of [x, 1] with [c, −||c||²/2]
(`search_space`). The raw member means of the fine clusters are kept in either geometry: the reference
router measures distances to them.

The balanced assignment is our own: faiss has no size-constrained assignment. The reference
(kernelmachine/balanced-kmeans) solves it with an auction over an N×K×D broadcast; here each round
every free point proposes to its best cluster that still has room, and every cluster accepts its best
proposers up to its capacity ⌈N/K⌉ — the same "clusters bid for their top points" idea in vectorised,
matmul-sized form (top-m candidates from a faiss search, never an N×K×D tensor).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import faiss
import numpy as np
import torch

from mode_ray.encoders import l2_normalize

CANDIDATES = 8
FULL_SIMS_LIMIT = 1 << 25  # N×K floats (128 MB) up to which the similarity matrix is kept whole
COARSE_RESTARTS = 10  # clusters a point may propose to before falling back to an exact search
Geometry = Literal["spherical", "euclidean"]


def search_points(x: np.ndarray, geometry: Geometry) -> np.ndarray:
    """Unit points as the inner-product search sees them: as they are, or [x, 1] (euclidean; see above)."""
    if geometry == "spherical":
        return x
    return np.hstack([x.astype(np.float32), np.ones((len(x), 1), dtype=np.float32)])


def search_centres(centroids: np.ndarray, geometry: Geometry) -> np.ndarray:
    """Centres as the inner-product search sees them: as they are, or [c, −||c||²/2] (euclidean)."""
    if geometry == "spherical":
        return centroids
    half_sq = -0.5 * (centroids.astype(np.float64) ** 2).sum(axis=1, keepdims=True)
    return np.hstack([centroids, half_sq]).astype(np.float32)


def search_space(x: np.ndarray, centroids: np.ndarray, geometry: Geometry) -> tuple[np.ndarray, np.ndarray]:
    """(points, centres) whose inner products rank centres as `geometry` does."""
    return search_points(x, geometry), search_centres(centroids, geometry)


def member_means(x: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """[k, d] raw mean of each cluster's points (a cluster with none: zeros)."""
    sums = torch.zeros((k, x.shape[1]), dtype=torch.float64).index_add_(
        0, torch.from_numpy(labels), torch.from_numpy(x.astype(np.float64))
    )
    counts = np.bincount(labels, minlength=k)
    return (sums.numpy() / np.maximum(counts, 1)[:, None]).astype(np.float32)


def ip_index(centroids: np.ndarray, use_gpu: bool = False) -> faiss.Index:
    index = faiss.IndexFlatIP(centroids.shape[1])
    if use_gpu and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
        index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    return index


def nearest(
    x: np.ndarray, centroids: np.ndarray, k: int = 1, use_gpu: bool = False, geometry: Geometry = "spherical"
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k centroids by the geometry's nearness: (scores [n,k], ids [n,k]); scores are inner products
    (spherical) or x·c − ||c||²/2 (euclidean)."""
    x, centroids = search_space(x, centroids, geometry)
    return ip_index(centroids, use_gpu).search(np.ascontiguousarray(x, dtype=np.float32), k)


def top_candidates(
    x: np.ndarray, centroids: np.ndarray, m: int, use_gpu: bool = False, chunk: int = 65536
) -> tuple[np.ndarray, np.ndarray]:
    """The m most similar centroids per point, best first: chunked matmul + torch.topk on CPU (multi-threaded,
    faster than faiss's heap selection for m > 1), faiss on GPU."""
    if use_gpu:
        return nearest(x, centroids, m, use_gpu=True)
    cents = torch.from_numpy(np.ascontiguousarray(centroids, dtype=np.float32))
    scores = np.empty((len(x), m), dtype=np.float32)
    ids = np.empty((len(x), m), dtype=np.int64)
    for start in range(0, len(x), chunk):
        sims = torch.from_numpy(np.ascontiguousarray(x[start : start + chunk], dtype=np.float32)) @ cents.T
        top = torch.topk(sims, m, dim=1, sorted=True)
        scores[start : start + chunk] = top.values.numpy()
        ids[start : start + chunk] = top.indices.numpy()
    return scores, ids


def balanced_assign(
    x: np.ndarray, centroids: np.ndarray, capacity: int | None = None, use_gpu: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Assign every point to a cluster so no cluster holds more than `capacity` (default ⌈N/K⌉) points,
    preferring high inner products. Returns (labels, the point–centroid inner products)."""
    n, k = len(x), len(centroids)
    capacity = capacity if capacity is not None else -(-n // k)
    if capacity * k < n:
        raise ValueError(f"capacity {capacity} x {k} clusters cannot hold {n} points")
    labels = np.full(n, -1, dtype=np.int64)
    assigned_scores = np.zeros(n, dtype=np.float32)
    sizes = np.zeros(k, dtype=np.int64)
    free = np.arange(n)
    m = min(CANDIDATES, k)
    # Small enough: keep the whole N×K similarity matrix, so re-proposals need no new matmul.
    sims = None if use_gpu or n * k > FULL_SIMS_LIMIT else torch.from_numpy(x) @ torch.from_numpy(centroids).T
    if sims is None:
        scores, cands = top_candidates(x, centroids, m, use_gpu)
    else:
        top = torch.topk(sims, m, dim=1)
        scores, cands = top.values.numpy().copy(), top.indices.numpy().copy()
    while len(free):
        full = sizes >= capacity
        ok = ~full[cands[free]]
        has = ok.any(axis=1)
        if not has.all():
            # Every candidate of these points is full: search again among the clusters with room.
            stuck = free[~has]
            open_ids = np.flatnonzero(~full)
            if sims is None:
                s2, c2 = top_candidates(x[stuck], centroids[open_ids], min(m, len(open_ids)), use_gpu)
            else:
                top = torch.topk(sims[torch.from_numpy(stuck)][:, torch.from_numpy(open_ids)], min(m, len(open_ids)))
                s2, c2 = top.values.numpy(), top.indices.numpy()
            scores[stuck, : c2.shape[1]] = s2
            cands[stuck, : c2.shape[1]] = open_ids[c2]
            cands[stuck, c2.shape[1] :] = open_ids[c2[:, :1]]
            continue
        pick = ok.argmax(axis=1)
        prop_cluster = cands[free, pick]
        prop_score = scores[free, pick]
        # Each cluster accepts its best proposers, up to its remaining room.
        order = np.lexsort((-prop_score, prop_cluster))
        sorted_cluster = prop_cluster[order]
        starts = np.searchsorted(sorted_cluster, sorted_cluster, side="left")
        rank = np.arange(len(order)) - starts
        accepted = order[rank < (capacity - sizes)[sorted_cluster]]
        labels[free[accepted]] = prop_cluster[accepted]
        assigned_scores[free[accepted]] = prop_score[accepted]
        sizes += np.bincount(prop_cluster[accepted], minlength=k)
        keep = np.ones(len(free), dtype=bool)
        keep[accepted] = False
        free = free[keep]
    return labels, assigned_scores


def _update_centroids(
    x: np.ndarray, labels: np.ndarray, old: np.ndarray, rng: np.random.Generator, geometry: Geometry = "spherical"
) -> np.ndarray:
    """The mean of each cluster, normalised (spherical) or raw (euclidean); an empty cluster gets a random point."""
    k = len(old)
    sums = torch.zeros(old.shape, dtype=torch.float32).index_add_(0, torch.from_numpy(labels), torch.from_numpy(x))
    sums = sums.numpy()
    counts = np.bincount(labels, minlength=k)
    empty = np.flatnonzero(counts == 0)
    if len(empty):
        sums[empty] = x[rng.choice(len(x), size=len(empty), replace=False)]
        counts[empty] = 1
    return l2_normalize(sums) if geometry == "spherical" else sums / counts[:, None].astype(np.float32)


def kmeans_plus_plus(x: np.ndarray, k: int, rng: np.random.Generator, max_points_per_cluster: int = 64) -> np.ndarray:
    """k-means++ seeding in cosine distance, on a subsample of at most k·64 points (enough for seeding)."""
    pool = (
        x if len(x) <= k * max_points_per_cluster else x[rng.choice(len(x), k * max_points_per_cluster, replace=False)]
    )
    chosen = [int(rng.integers(len(pool)))]
    dist = 1.0 - pool @ pool[chosen[0]]
    for _ in range(1, k):
        weights = np.clip(dist, 0, None) ** 2
        total = weights.sum()
        nxt = int(rng.choice(len(pool), p=weights / total)) if total > 0 else int(rng.integers(len(pool)))
        chosen.append(nxt)
        dist = np.minimum(dist, 1.0 - pool @ pool[nxt])
    return pool[chosen].copy()


@dataclass
class KMeansResult:
    centroids: np.ndarray  # [K, d]: unit (spherical) or member means (euclidean)
    labels: np.ndarray  # [N] assignment of the fitted points
    iterations: int
    objective: float  # mean nearness score of points to their centroid (see `nearest`)
    history: list[float] = field(default_factory=list)

    @property
    def sizes(self) -> np.ndarray:
        return np.bincount(self.labels, minlength=len(self.centroids))


def spherical_kmeans(
    x: np.ndarray,
    k: int,
    iterations: int = 50,
    tol: float = 1e-3,
    seed: int = 0,
    balanced: bool = True,
    use_gpu: bool = False,
    geometry: Geometry = "spherical",
) -> KMeansResult:
    """Lloyd iterations on unit points; with `balanced`, every assignment step is size-constrained.

    Stops when the mean point–centroid nearness improves by less than `tol` (relative), or after
    `iterations`. `balanced=False` hands the whole fit to faiss's k-means (spherical or not).
    """
    x = l2_normalize(x)
    n = len(x)
    if n < k:
        raise ValueError(f"cannot fit {k} clusters on {n} points; lower the cluster count or sample more")
    spherical = geometry == "spherical"
    if not balanced:
        km = faiss.Kmeans(x.shape[1], k, niter=iterations, spherical=spherical, seed=seed, gpu=use_gpu, verbose=False)
        km.train(x)
        centres = l2_normalize(km.centroids) if spherical else km.centroids
        scores, ids = nearest(x, centres, 1, use_gpu, geometry)
        return KMeansResult(centres, ids[:, 0].astype(np.int64), iterations, float(scores.mean()))
    rng = np.random.default_rng(seed)
    centroids = kmeans_plus_plus(x, k, rng)  # unit points: cosine and L2 seeding weights are proportional
    history: list[float] = []
    labels = np.zeros(n, dtype=np.int64)
    for _ in range(iterations):
        labels, scores = balanced_assign(*search_space(x, centroids, geometry), use_gpu=use_gpu)
        history.append(float(scores.mean()))
        centroids = _update_centroids(x, labels, centroids, rng, geometry)
        if len(history) > 1 and abs(history[-1] - history[-2]) <= tol * abs(history[-2]):
            break
    return KMeansResult(centroids, labels, len(history), history[-1], history)


@dataclass
class TwoStepClusters:
    fine: np.ndarray  # [Kf, d]: the assignment centres (unit, or raw means under euclidean)
    coarse: np.ndarray  # [Kc, d]
    fine_to_coarse: np.ndarray  # [Kf]
    fine_sizes: np.ndarray  # [Kf] sizes on the fitted sample
    info: dict[str, Any]
    fine_raw: np.ndarray | None = None  # [Kf, d] raw member means on the sample (the reference router's centres)
    geometry: Geometry = "spherical"

    def assign(self, x: np.ndarray, use_gpu: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Nearest fine centre (plain argmax, as the reference) → (fine_id, coarse_id, score)."""
        scores, ids = nearest(l2_normalize(x), self.fine, 1, use_gpu, self.geometry)
        fine = ids[:, 0].astype(np.int64)
        return fine, self.fine_to_coarse[fine], scores[:, 0]


def two_step(
    x: np.ndarray,
    n_fine: int,
    n_coarse: int,
    iterations: int = 50,
    coarse_iterations: int = 100,
    tol: float = 1e-3,
    seed: int = 0,
    balanced: bool = True,
    use_gpu: bool = False,
    geometry: Geometry = "spherical",
) -> TwoStepClusters:
    """Fine clusters on the sample, then coarse clusters over the fine centres (the data experts).

    As in the reference, the stored fine→coarse map is the plain nearest coarse centre, so experts
    need not own equal numbers of fine clusters. The info counts the sample points whose nearest centre
    differs between the geometries (cosine to the unit centres vs L2 to the raw member means).
    """
    fine = spherical_kmeans(x, n_fine, iterations, tol, seed, balanced, use_gpu, geometry)
    # The coarse fit is over only Kf points: cheap enough to keep the best of several seedings.
    coarse = max(
        (
            spherical_kmeans(fine.centroids, n_coarse, coarse_iterations, tol, seed + r, balanced, use_gpu, geometry)
            for r in range(COARSE_RESTARTS)
        ),
        key=lambda result: result.objective,
    )
    _, f2c = nearest(fine.centroids, coarse.centroids, 1, use_gpu, geometry)
    unit = l2_normalize(x)
    raw = member_means(unit, fine.labels, n_fine)
    _, by_cosine = nearest(unit, l2_normalize(raw), 1, use_gpu)
    _, by_l2 = nearest(unit, raw, 1, use_gpu, "euclidean")
    disagree = int((by_cosine[:, 0] != by_l2[:, 0]).sum())
    sizes = fine.sizes
    info = {
        "sample_size": int(len(x)),
        "geometry": geometry,
        "fine_iterations": fine.iterations,
        "fine_objective": fine.objective,
        "coarse_iterations": coarse.iterations,
        "fine_size_max_over_mean": float(sizes.max() / sizes.mean()),
        "raw_mean_norm_min": float(np.linalg.norm(raw, axis=1).min()),
        "raw_mean_norm_max": float(np.linalg.norm(raw, axis=1).max()),
        "geometries_disagree_on": disagree,
        "geometries_disagree_share": disagree / len(x),
    }
    return TwoStepClusters(fine.centroids, coarse.centroids, f2c[:, 0].astype(np.int64), sizes, info, raw, geometry)


def mcl_fit(
    image: np.ndarray, text: np.ndarray, k_image: int, k_text: int, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """One MCL stage's centres (CLIP-MoE): k-means of the image and of the text embeddings separately (faiss
    spherical: the embeddings are compared by cosine). Fitted on all pairs or on a sample of them."""
    image_centres = spherical_kmeans(image, k_image, iterations=20, seed=seed, balanced=False).centroids
    text_centres = spherical_kmeans(text, k_text, iterations=20, seed=seed + 1, balanced=False).centroids
    return image_centres, text_centres


def mcl_assign(
    image: np.ndarray,
    text: np.ndarray,
    image_centres: np.ndarray,
    text_centres: np.ndarray,
    previous: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Pairs' labels by nearest centre per modality, label = text · k_image + image, accumulated over stages as
    `acc · (k_image · k_text) + label`; a pair whose previous label is negative (none) keeps none (−1).
    Returns (this stage's labels, the accumulated labels)."""
    k_image, k_text = len(image_centres), len(text_centres)
    image_ids = nearest(l2_normalize(image), image_centres, 1)[1][:, 0].astype(np.int64)
    text_ids = nearest(l2_normalize(text), text_centres, 1)[1][:, 0].astype(np.int64)
    label = text_ids * k_image + image_ids
    if previous is None:
        return label, label
    return label, np.where(previous < 0, -1, previous * (k_image * k_text) + label)


def mcl_stage_labels(
    image: np.ndarray, text: np.ndarray, k_image: int, k_text: int, previous: np.ndarray | None, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """One MCL stage's pseudo labels on all pairs at once: `mcl_fit` then `mcl_assign` on the same pairs (a
    stage fits on a bounded sample instead and assigns every pair where it is read)."""
    return mcl_assign(image, text, *mcl_fit(image, text, k_image, k_text, seed), previous)
