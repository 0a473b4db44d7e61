"""A uniform sample decided by a seeded hash of each key, bounded while rows stream in (Ray-free): the same
rows however the data is split into blocks, and the driver never holds more than twice the bound."""

from __future__ import annotations

import numpy as np

from mode_ray.samples.validate import seeded_key_hash


def hash_positions(keys: list[str], seed: int) -> np.ndarray:
    """Each key's seeded hash as a position in [0, 1)."""
    return np.array([seeded_key_hash(seed, k) for k in keys], dtype=np.uint64).astype(np.float64) / float(2**64)


class HashSample:
    """The rows whose hash position is under `fraction`, at most `bound` of them (the smallest positions, ties
    by key; None: no bound)."""

    def __init__(self, seed: int, dim: int, fraction: float = 1.0, bound: int | None = None) -> None:
        self.seed, self.fraction, self.bound = seed, fraction, bound
        self.kept = (np.zeros(0), np.zeros(0, dtype=str), np.zeros((0, dim), dtype=np.float32))

    def add(self, keys: list[str], vectors: np.ndarray) -> None:
        u = hash_positions(keys, self.seed)
        take = u < self.fraction
        part = (u[take], np.asarray(keys)[take], vectors[take])
        self.kept = tuple(np.concatenate(pair) for pair in zip(self.kept, part, strict=True))  # type: ignore[assignment]
        if self.bound is not None and len(self.kept[0]) > 2 * self.bound:
            self.kept = self._first()

    def _first(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        order = np.lexsort((self.kept[1], self.kept[0]))[: self.bound]
        return tuple(values[order] for values in self.kept)  # type: ignore[return-value]

    def rows(self) -> np.ndarray:
        """The sample's vectors, in hash order."""
        return self._first()[2]
