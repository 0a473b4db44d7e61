"""Cluster-homogeneous global batches for multistage contrastive learning (CLIP-MoE's MCL; numpy only).

Every global batch is drawn from one accumulated pseudo-label cluster, and every worker's share of a batch comes
from that same batch, so all in-batch negatives — across workers too — share the anchor's label (the reference
does this with a batch sampler, not a loss mask). By default, unlike the reference: a cluster's last partial
batch is filled with other rows of the same cluster (nothing is left out) and an epoch's batches come in a shuffled
order. `last_batch="drop"` and `order="round_robin"` do what the reference's `MCL_batch_sampler_DDP`
(CLIP-MoE train/dataset.py) does: truncate each cluster to whole global batches, and take one batch of each
cluster in turn, in label order, skipping clusters that ran out. Either way a cluster smaller than one global
batch, which cannot form a homogeneous batch at all, is counted and reported in `small_clusters`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class BatchPlan:
    batches: np.ndarray  # (n_batches, global_batch): row indices, each row of the array one global batch
    labels: np.ndarray  # (n_batches,): the cluster every row of that batch belongs to
    small_clusters: dict[int, int]  # cluster → rows, for clusters smaller than one global batch (not trained on)
    filled: int  # rows drawn a second time within an epoch to complete a cluster's last batch
    dropped: int = 0  # rows left out of an epoch by truncating clusters to whole batches (last_batch="drop")

    @property
    def skipped_rows(self) -> int:
        return sum(self.small_clusters.values())

    def rank_rows(self, rank: int, world: int) -> np.ndarray:
        """The rows worker `rank` of `world` reads, in order: its contiguous slice of every global batch."""
        per_worker = self.batches.shape[1] // world
        return self.batches[:, rank * per_worker : (rank + 1) * per_worker].reshape(-1)


def homogeneous_batches(
    labels: np.ndarray,
    global_batch: int,
    steps: int,
    world: int,
    seed: int,
    last_batch: str = "fill",
    order: str = "shuffled",
) -> BatchPlan:
    """`steps` global batches, each from a single cluster of `labels` (one per row), epoch after epoch.
    `global_batch` must split evenly over `world` workers."""
    if global_batch % world:
        raise ValueError(f"global batch {global_batch} does not split over {world} workers")
    rng = np.random.default_rng(seed)
    values, counts = np.unique(labels, return_counts=True)
    small = {int(v): int(c) for v, c in zip(values, counts, strict=True) if c < global_batch}
    eligible = [int(v) for v in values if int(v) not in small]
    if not eligible:
        sizes = dict(zip(values.tolist(), counts.tolist(), strict=True))
        raise ValueError(
            f"no cluster holds a global batch of {global_batch} rows (sizes {sizes}): "
            "lower the batch size or the number of clusters"
        )
    members = _members(labels, values, eligible)
    batches: list[np.ndarray] = []
    batch_labels: list[int] = []
    filled = dropped = 0
    while len(batches) < steps:
        per_cluster: dict[int, list[np.ndarray]] = {}
        for v in eligible:
            rows = rng.permutation(members[v])
            n = len(rows) // global_batch if last_batch == "drop" else math.ceil(len(rows) / global_batch)
            extra = n * global_batch - len(rows)
            if extra > 0:  # complete the last batch with other rows of the same cluster
                rows = np.concatenate(
                    [rows, rng.choice(rows[: len(rows) - (global_batch - extra)], extra, replace=False)]
                )
                filled += extra
            elif extra < 0:  # truncated to whole batches
                rows, dropped = rows[: n * global_batch], dropped - extra
            per_cluster[v] = list(rows.reshape(n, global_batch))
        epoch = _round_robin(per_cluster) if order == "round_robin" else _shuffled(per_cluster, rng)
        batches += [b for _, b in epoch]
        batch_labels += [v for v, _ in epoch]
    return BatchPlan(np.stack(batches[:steps]), np.array(batch_labels[:steps]), small, filled, dropped)


def _members(labels: np.ndarray, values: np.ndarray, eligible: list[int]) -> dict[int, np.ndarray]:
    """Each eligible cluster's rows, in row order: one stable sort, not one pass over the labels a cluster
    (an MCL stage's accumulated labels reach hundreds of clusters)."""
    order = np.argsort(labels, kind="stable")
    bounds = np.searchsorted(labels[order], values, side="left").tolist() + [len(labels)]
    by_value = {int(v): order[lo:hi] for v, lo, hi in zip(values, bounds[:-1], bounds[1:], strict=True)}
    return {v: by_value[v] for v in eligible}


def _shuffled(per_cluster: dict[int, list[np.ndarray]], rng: np.random.Generator) -> list[tuple[int, np.ndarray]]:
    epoch = [(v, b) for v, cluster in per_cluster.items() for b in cluster]
    return [epoch[i] for i in rng.permutation(len(epoch))]


def _round_robin(per_cluster: dict[int, list[np.ndarray]]) -> list[tuple[int, np.ndarray]]:
    """One batch of each cluster in turn, in label order, skipping clusters that ran out."""
    epoch, depth = [], 0
    while len(epoch) < sum(map(len, per_cluster.values())):
        epoch += [(v, cluster[depth]) for v, cluster in sorted(per_cluster.items()) if depth < len(cluster)]
        depth += 1
    return epoch


def epoch_steps(labels: np.ndarray, global_batch: int, epochs: float, last_batch: str = "fill") -> int:
    """Steps in `epochs` passes over the clusters that can form a batch (each rounded up to whole batches, or
    down when the last partial batch is dropped)."""
    values, counts = np.unique(labels, return_counts=True)
    whole = (lambda c: c // global_batch) if last_batch == "drop" else (lambda c: math.ceil(c / global_batch))
    per_epoch = sum(whole(c) for c in counts if c >= global_batch)
    return max(1, round(per_epoch * epochs))
