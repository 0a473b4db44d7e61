"""The models behind the endpoint: a plain class (unit-testable, no Serve) and the Serve deployment that
wraps it with `@serve.batch`, so concurrent requests share one forward pass per model."""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import numpy as np
import torch
from ray import serve

from mode_ray.config import S3Config
from mode_ray.eval.zero_shot import class_text_features, image_features, preprocess

TEXT_CACHE_SIZE = 512


class ExpertModels:
    """Trained CLIPs (local or s3://) — stock-open_clip exports and the CLIP-MoE's folder alike, both load as
    open_clip models (`mode_ray.models.load_model`): cosine logits and scale."""

    def __init__(self, exports: dict[str, str], s3: S3Config | None = None, device: str = "cpu") -> None:
        from mode_ray.models import load_model

        self.device = device
        self.models = {name: load_model(url, s3, device) for name, url in exports.items()}
        self._text = lru_cache(maxsize=TEXT_CACHE_SIZE)(self._text_uncached)

    def _text_uncached(self, name: str, labels: tuple[str, ...], templates: tuple[str, ...]) -> np.ndarray:
        model, _, tokenizer = self.models[name]
        return class_text_features(model, tokenizer, labels, templates, self.device)

    def text_features(self, name: str, labels: Sequence[str], templates: Sequence[str]) -> np.ndarray:
        """[C, D] class embeddings, cached per model and label set."""
        return self._text(name, tuple(labels), tuple(templates))

    def logit_scale(self, name: str) -> float:
        return float(self.models[name][0].logit_scale.detach().exp().clamp(max=100))

    def image_features(self, name: str, images: Sequence[bytes]) -> np.ndarray:
        model, transform, _ = self.models[name]
        return image_features(model, preprocess(images, transform), self.device)

    def logits(
        self, names: Sequence[str], images: Sequence[bytes], labels: Sequence[str], templates: Sequence[str]
    ) -> dict[str, dict[str, Any]]:
        """{model: {"logits": [N, C] raw cosine, "scale": logit scale}} for one request."""
        return self.logits_many([(names, images, labels, templates)])[0]

    def logits_many(
        self, requests: Sequence[tuple[Sequence[str], Sequence[bytes], Sequence[str], Sequence[str]]]
    ) -> list[dict[str, dict[str, Any]]]:
        """Several requests at once: one forward pass per model over all their images."""
        out: list[dict[str, dict[str, Any]]] = [{} for _ in requests]
        for name in dict.fromkeys(n for names, *_ in requests for n in names):
            users = [i for i, (names, *_) in enumerate(requests) if name in names]
            images = [img for i in users for img in requests[i][1]]
            feats = self.image_features(name, images)
            start = 0
            for i in users:
                _, imgs, labels, templates = requests[i]
                chunk = feats[start : start + len(imgs)]
                start += len(imgs)
                text = self.text_features(name, labels, templates)
                out[i][name] = {"logits": chunk @ text.T, "scale": self.logit_scale(name)}
        return out


@serve.deployment
class ExpertDeployment:
    """One or several trained models (the layout decides); requests are fused by @serve.batch."""

    def __init__(
        self,
        exports: dict[str, str],
        s3: dict[str, Any] | None,
        device: str,
        torch_threads: int,
        max_batch_size: int,
        batch_wait_timeout_s: float,
    ) -> None:
        from mode_ray.models.lean_import import import_open_clip_for_exports

        torch.set_num_threads(torch_threads)
        store = S3Config(**(s3 or {}))
        import_open_clip_for_exports(exports.values(), store)  # a replica for these models alone
        self.models = ExpertModels(exports, store, device)
        self.names = list(exports)
        self.logits_batched.set_max_batch_size(max_batch_size)
        self.logits_batched.set_batch_wait_timeout_s(batch_wait_timeout_s)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def logits_batched(
        self,
        names: list[list[str]],
        images: list[list[bytes]],
        labels: list[list[str]],
        templates: list[list[str]],
    ) -> list[dict[str, dict[str, Any]]]:
        return self.models.logits_many(list(zip(names, images, labels, templates, strict=True)))

    async def logits(
        self, names: list[str], images: list[bytes], labels: list[str], templates: list[str]
    ) -> dict[str, dict[str, Any]]:
        return await self.logits_batched(names, images, labels, templates)

    def check_health(self) -> None:
        """Serve's health probe: a replica whose models are gone is replaced."""
        if not self.models.models:
            raise RuntimeError("no models loaded")
