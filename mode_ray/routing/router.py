"""Task metadata → expert weights with the clustering encoder: the one router for eval and Serve.

Embeds class names with their prompt templates (each prompt embedded, the class's mean renormalised, as
the reference does) by the encoder the centroids were fitted with — a different encoder would put the
labels in another space, so a mismatch is refused — and caches both embeddings and weights per label set.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import numpy as np

from mode_ray.config import EmbeddingConfig, RoutingConfig, S3Config
from mode_ray.console.progress import console
from mode_ray.encoders import TextEncoder, build_encoder, encoder_id_for
from mode_ray.eval.zero_shot import template_averaged
from mode_ray.routing.weights import Routing, route
from mode_ray.run_root.layout import RunPaths, read_centroids

CACHE_SIZE = 1024


class EncoderMismatch(ValueError):
    """The routing encoder is not the one the centroids were fitted with."""


def check_encoder(stored_id: str, encoder_id: str) -> None:
    if stored_id != encoder_id:
        raise EncoderMismatch(
            f"the fine centroids were fitted with encoder {stored_id!r}, but routing would embed labels with "
            f"{encoder_id!r}: set embedding.encoder to the clustering encoder (or re-run prep)"
        )


class TaskRouter:
    def __init__(self, centroids: dict[str, Any], encoder: TextEncoder, routing: RoutingConfig) -> None:
        check_encoder(str(centroids["encoder_id"]), encoder.encoder_id)
        self.fine = np.asarray(centroids["fine"], dtype=np.float32)
        self.reference_fine, self.reference_centres = self.fine, "unit"
        if routing.reference_centres == "raw_means" and "fine_raw" in centroids:
            self.reference_fine, self.reference_centres = np.asarray(centroids["fine_raw"], np.float32), "raw_means"
        elif routing.reference_centres == "raw_means":
            why = "this run's centroids.npz predates raw member means"
            if "reference_centres" in routing.model_fields_set:  # asked for by name: not quietly something else
                raise ValueError(f"eval.routing.reference_centres=raw_means, but {why}: re-run `mode-ray prep --force`")
            console.print(f"[yellow]routing: {why}; the reference router uses the unit centres[/yellow]")
            self.reference_centres = "unit (centroids from before raw means)"
        self.fine_to_coarse = np.asarray(centroids["fine_to_coarse"], dtype=np.int64)
        self.n_experts = int(np.asarray(centroids["coarse"]).shape[0])
        self.encoder_id = encoder.encoder_id
        self.encoder = encoder
        self.config = routing
        self._embed = lru_cache(maxsize=CACHE_SIZE)(self._embed_uncached)
        self._route = lru_cache(maxsize=CACHE_SIZE)(self._route_uncached)

    @classmethod
    def from_run(
        cls, run_root: str, embedding: EmbeddingConfig, routing: RoutingConfig, s3: S3Config | None = None
    ) -> TaskRouter:
        centroids = read_centroids(RunPaths(run_root).centroids, s3)
        check_encoder(str(centroids["encoder_id"]), encoder_id_for(embedding.encoder))  # before loading it
        encoder = build_encoder(embedding.encoder, embedding.device, embedding.dtype, embedding.batch_size)
        return cls(centroids, encoder, routing)

    def _embed_uncached(self, labels: tuple[str, ...], templates: tuple[str, ...]) -> np.ndarray:
        return template_averaged(self.encoder.encode, labels, templates)

    def _route_uncached(
        self, labels: tuple[str, ...], templates: tuple[str, ...], method: str, per_class: bool
    ) -> Routing:
        c = self.config
        emb = self._embed(labels, templates)
        return route(
            method,  # type: ignore[arg-type]
            emb,
            self.fine,
            self.fine_to_coarse,
            self.n_experts,
            c.temperature,
            per_class,
            c.top_k,
            self.reference_fine,
        )

    def route(
        self,
        labels: Sequence[str],
        templates: Sequence[str] = ("{}",),
        method: str | None = None,
        per_class: bool | None = None,
    ) -> Routing:
        """Expert weights for a label set; method and per_class default to the config's."""
        method = method or self.config.method
        per_class = self.config.per_class if per_class is None else per_class
        return self._route(tuple(labels), tuple(templates), method, per_class)
