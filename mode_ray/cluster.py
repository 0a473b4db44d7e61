"""Two-step clustering for MoDE: balanced spherical k-means (fine), k-means of the fine centres (coarse).

Plain numpy + faiss, no Ray. Geometry is cosine: inputs and centroids are L2-normalised, so the
reference's squared Euclidean distance equals 2 - 2·(inner product) and inner products are all we need.

The balanced assignment is our own: faiss has no size-constrained assignment. The reference
(kernelmachine/balanced-kmeans) solves it with an auction over an N×K×D broadcast; here each round
every free point proposes to its best cluster that still has room, and every cluster accepts its best
proposers up to its capacity ⌈N/K⌉ — the same "clusters bid for their top points" idea in vectorised,
matmul-sized form (top-m candidates from a faiss search, never an N×K×D tensor).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import faiss
import numpy as np
import torch

from mode_ray.encoders import l2_normalize

CANDIDATES = 8
FULL_SIMS_LIMIT = 1 << 25  # N×K floats (128 MB) up to which the similarity matrix is kept whole
COARSE_RESTARTS = 10  # clusters a point may propose to before falling back to an exact search


def ip_index(centroids: np.ndarray, use_gpu: bool = False) -> faiss.Index:
    index = faiss.IndexFlatIP(centroids.shape[1])
    if use_gpu and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
        index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    return index


def nearest(x: np.ndarray, centroids: np.ndarray, k: int = 1, use_gpu: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Top-k centroids by inner product: (scores [n,k], ids [n,k])."""
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


def _update_centroids(x: np.ndarray, labels: np.ndarray, old: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Spherical update: the normalised mean of each cluster; an empty cluster gets a random point."""
    k = len(old)
    sums = torch.zeros(old.shape, dtype=torch.float32).index_add_(0, torch.from_numpy(labels), torch.from_numpy(x))
    sums = sums.numpy()
    counts = np.bincount(labels, minlength=k)
    empty = np.flatnonzero(counts == 0)
    if len(empty):
        sums[empty] = x[rng.choice(len(x), size=len(empty), replace=False)]
    return l2_normalize(sums)


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
    centroids: np.ndarray  # [K, d], L2-normalised
    labels: np.ndarray  # [N] assignment of the fitted points
    iterations: int
    objective: float  # mean inner product of points to their centroid
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
) -> KMeansResult:
    """Lloyd iterations on the unit sphere; with `balanced`, every assignment step is size-constrained.

    Stops when the mean point–centroid similarity improves by less than `tol` (relative), or after
    `iterations`. `balanced=False` hands the whole fit to faiss's spherical k-means.
    """
    x = l2_normalize(x)
    n = len(x)
    if n < k:
        raise ValueError(f"cannot fit {k} clusters on {n} points; lower the cluster count or sample more")
    if not balanced:
        km = faiss.Kmeans(x.shape[1], k, niter=iterations, spherical=True, seed=seed, gpu=use_gpu, verbose=False)
        km.train(x)
        scores, ids = nearest(x, km.centroids, 1, use_gpu)
        return KMeansResult(l2_normalize(km.centroids), ids[:, 0].astype(np.int64), iterations, float(scores.mean()))
    rng = np.random.default_rng(seed)
    centroids = kmeans_plus_plus(x, k, rng)
    history: list[float] = []
    labels = np.zeros(n, dtype=np.int64)
    for _ in range(iterations):
        labels, scores = balanced_assign(x, centroids, use_gpu=use_gpu)
        history.append(float(scores.mean()))
        centroids = _update_centroids(x, labels, centroids, rng)
        if len(history) > 1 and abs(history[-1] - history[-2]) <= tol * abs(history[-2]):
            break
    return KMeansResult(centroids, labels, len(history), history[-1], history)


@dataclass
class TwoStepClusters:
    fine: np.ndarray  # [Kf, d]
    coarse: np.ndarray  # [Kc, d]
    fine_to_coarse: np.ndarray  # [Kf]
    fine_sizes: np.ndarray  # [Kf] sizes on the fitted sample
    info: dict[str, Any]

    def assign(self, x: np.ndarray, use_gpu: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Nearest fine centre (plain argmax, as the reference) → (fine_id, coarse_id, score)."""
        scores, ids = nearest(l2_normalize(x), self.fine, 1, use_gpu)
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
) -> TwoStepClusters:
    """Fine clusters on the sample, then coarse clusters over the fine centres (the data experts).

    As in the reference, the stored fine→coarse map is the plain nearest coarse centre, so experts
    need not own equal numbers of fine clusters.
    """
    fine = spherical_kmeans(x, n_fine, iterations, tol, seed, balanced, use_gpu)
    # The coarse fit is over only Kf points: cheap enough to keep the best of several seedings.
    coarse = max(
        (
            spherical_kmeans(fine.centroids, n_coarse, coarse_iterations, tol, seed + r, balanced, use_gpu)
            for r in range(COARSE_RESTARTS)
        ),
        key=lambda result: result.objective,
    )
    _, f2c = nearest(fine.centroids, coarse.centroids, 1, use_gpu)
    sizes = fine.sizes
    info = {
        "sample_size": int(len(x)),
        "fine_iterations": fine.iterations,
        "fine_objective": fine.objective,
        "coarse_iterations": coarse.iterations,
        "fine_size_max_over_mean": float(sizes.max() / sizes.mean()),
    }
    return TwoStepClusters(fine.centroids, coarse.centroids, f2c[:, 0].astype(np.int64), sizes, info)


def mcl_stage_labels(
    image: np.ndarray, text: np.ndarray, k_image: int, k_text: int, previous: np.ndarray | None, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """One MCL stage's pseudo labels (CLIP-MoE): k-means of the image and of the text embeddings separately
    (faiss spherical: the embeddings are compared by cosine), label = text · k_image + image, accumulated over
    stages as `acc · (k_image · k_text) + label`. Returns (this stage's labels, the accumulated labels)."""
    image_ids = spherical_kmeans(image, k_image, iterations=20, seed=seed, balanced=False).labels
    text_ids = spherical_kmeans(text, k_text, iterations=20, seed=seed + 1, balanced=False).labels
    label = text_ids * k_image + image_ids
    acc = label if previous is None else previous * (k_image * k_text) + label
    return label, acc
