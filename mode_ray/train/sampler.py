"""Cluster-homogeneous global batches for multistage contrastive learning (CLIP-MoE's MCL; numpy only).

Every global batch is drawn from one accumulated pseudo-label cluster, and every worker's share of a batch comes
from that same batch, so all in-batch negatives — across workers too — share the anchor's label (the reference
does this with a batch sampler, not a loss mask). Unlike the reference, which truncates each cluster to whole
batches and drops clusters smaller than a batch without a word: a cluster's last partial batch is filled with
other rows of the same cluster (nothing is left out), and a cluster smaller than one global batch, which cannot
form a homogeneous batch at all, is counted and reported in `small_clusters`.
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

    @property
    def skipped_rows(self) -> int:
        return sum(self.small_clusters.values())

    def rank_rows(self, rank: int, world: int) -> np.ndarray:
        """The rows worker `rank` of `world` reads, in order: its contiguous slice of every global batch."""
        per_worker = self.batches.shape[1] // world
        return self.batches[:, rank * per_worker : (rank + 1) * per_worker].reshape(-1)


def homogeneous_batches(labels: np.ndarray, global_batch: int, steps: int, world: int, seed: int) -> BatchPlan:
    """`steps` global batches, each from a single cluster of `labels` (one per row), epoch after epoch, in a
    shuffled order. `global_batch` must split evenly over `world` workers."""
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
    members = {v: np.flatnonzero(labels == v) for v in eligible}
    batches: list[np.ndarray] = []
    batch_labels: list[int] = []
    filled = 0
    while len(batches) < steps:
        epoch, epoch_labels = [], []
        for v in eligible:
            rows = rng.permutation(members[v])
            n = math.ceil(len(rows) / global_batch)
            extra = n * global_batch - len(rows)
            if extra:  # complete the last batch with other rows of the same cluster
                rows = np.concatenate(
                    [rows, rng.choice(rows[: len(rows) - (global_batch - extra)], extra, replace=False)]
                )
                filled += extra
            epoch += list(rows.reshape(n, global_batch))
            epoch_labels += [v] * n
        order = rng.permutation(len(epoch))
        batches += [epoch[i] for i in order]
        batch_labels += [epoch_labels[i] for i in order]
    return BatchPlan(np.stack(batches[:steps]), np.array(batch_labels[:steps]), small, filled)


def epoch_steps(labels: np.ndarray, global_batch: int, epochs: float) -> int:
    """Steps in `epochs` passes over the clusters that can form a batch (each rounded up to whole batches)."""
    values, counts = np.unique(labels, return_counts=True)
    per_epoch = sum(math.ceil(c / global_batch) for c in counts if c >= global_batch)
    return max(1, round(per_epoch * epochs))
