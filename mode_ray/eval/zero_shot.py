"""Zero-shot CLIP outputs as the reference evaluates them, and their ensemble.

Per model: raw cosine similarity of L2-normalised image features and class-text features (each class's
prompt templates embedded, normalised, averaged, renormalised) — no logit scale, no softmax. An ensemble
is a weighted sum of those per-expert cosine logits, with one weight vector per task or one per class.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


@torch.inference_mode()
def text_features(
    model: Any, tokenizer: Any, texts: Sequence[str], device: str = "cpu", batch_size: int = 256
) -> np.ndarray:
    """[N, D] normalised text features, encoded in batches."""
    out = [
        _unit(model.encode_text(tokenizer(list(texts[i : i + batch_size])).to(device)).float()).cpu()
        for i in range(0, len(texts), batch_size)
    ]
    return torch.cat(out).numpy() if out else np.zeros((0, model.text_projection.shape[-1]), np.float32)


def template_averaged(
    encode: Callable[[list[str]], np.ndarray], names: Sequence[str], templates: Sequence[str]
) -> np.ndarray:
    """[C, D]: each name's prompts (every template filled in) encoded as unit vectors, averaged, and the
    mean renormalised — as the reference builds class embeddings, for CLIP and routing encoders alike."""
    # replace, not str.format: a template is a request field, and "{x}" or "{0.__class__}" must not be code
    prompts = [t.replace("{}", name) for name in names for t in templates]
    mean = encode(prompts).reshape(len(names), len(templates), -1).mean(axis=1)
    return mean / np.maximum(np.linalg.norm(mean, axis=1, keepdims=True), 1e-12)


def class_text_features(
    model: Any,
    tokenizer: Any,
    class_names: Sequence[str],
    templates: Sequence[str],
    device: str = "cpu",
    batch_size: int = 256,
) -> np.ndarray:
    """[C, D] class embeddings of a CLIP text tower."""
    return template_averaged(
        lambda prompts: text_features(model, tokenizer, prompts, device, batch_size), class_names, templates
    )


def preprocess(images: Sequence[bytes], transform: Any) -> torch.Tensor:
    """[N, 3, H, W]: encoded images (already checked) decoded to RGB and put through a model's transform."""
    pixels = []
    for payload in images:
        with Image.open(io.BytesIO(payload)) as img:
            pixels.append(transform(img.convert("RGB")))
    return torch.stack(pixels)


@torch.inference_mode()
def image_features(model: Any, pixels: torch.Tensor, device: str = "cpu") -> np.ndarray:
    """[N, D] normalised image features of preprocessed pixels [N, 3, H, W]."""
    return _unit(model.encode_image(pixels.to(device)).float()).cpu().numpy()


def cosine_logits(image_feats: np.ndarray, class_feats: np.ndarray) -> np.ndarray:
    """[N, C] raw cosine similarities (both sides are unit vectors)."""
    return image_feats @ class_feats.T


def ensemble_logits(expert_logits: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Σ_e w_e · logits_e: expert_logits [E, N, C]; weights [E] (per task) or [C, E] (per class)."""
    weights = np.asarray(weights, dtype=expert_logits.dtype)
    if weights.ndim == 1:
        if len(weights) != len(expert_logits):
            raise ValueError(f"{len(weights)} weights for {len(expert_logits)} experts")
        return np.tensordot(weights, expert_logits, axes=1)
    if weights.shape != (expert_logits.shape[2], expert_logits.shape[0]):
        raise ValueError(f"per-class weights {weights.shape} do not fit logits {expert_logits.shape}")
    return np.einsum("ce,enc->nc", weights, expert_logits)


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float((logits.argmax(axis=1) == labels).mean()) if len(labels) else float("nan")


def mean_average_precision(logits: np.ndarray, targets: np.ndarray) -> float:
    """Multi-label: the mean over classes of each class's average precision, ranking the images by their
    logit for it; a class no image has counts 0, as CLIP_benchmark counts it. targets [N, C] in {0, 1}."""
    from sklearn.metrics import average_precision_score

    if not len(targets):
        return float("nan")
    per_class = [
        average_precision_score(targets[:, c], logits[:, c]) if targets[:, c].any() else 0.0
        for c in range(targets.shape[1])
    ]
    return float(np.mean(per_class))
