"""Image↔text retrieval recall@k over a held-out caption corpus, and its ensemble.

Identical captions are one text (web and demo captions repeat): an image's match is its caption's
text, and a text's matches are all the images captioned with it — so ties between copies of one
caption cannot make a correct answer count as wrong.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mode_ray.eval.zero_shot import ensemble_logits


def unique_texts(captions: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """(distinct captions in first-seen order, index of each image's caption among them)."""
    index: dict[str, int] = {}
    of_image = np.array([index.setdefault(c, len(index)) for c in captions], dtype=np.int64)
    return list(index), of_image


def _top_k(scores: np.ndarray, k: int) -> np.ndarray:
    k = min(k, scores.shape[1])
    return np.argpartition(-scores, k - 1, axis=1)[:, :k]


def recall_at_k(
    i2t_scores: np.ndarray, t2i_scores: np.ndarray, text_of_image: np.ndarray, ks: Sequence[int] = (1, 5)
) -> dict[str, float]:
    """Scores are [N_images, N_texts] (the same matrix for one model; different ones for an ensemble)."""
    texts = np.arange(i2t_scores.shape[1])
    out: dict[str, float] = {}
    for k in ks:
        i2t = _top_k(i2t_scores, k)
        out[f"i2t_r@{k}"] = float((i2t == text_of_image[:, None]).any(axis=1).mean())
        t2i = _top_k(t2i_scores.T, k)
        out[f"t2i_r@{k}"] = float((text_of_image[t2i] == texts[:, None]).any(axis=1).mean())
    return out


def ensemble_retrieval(
    expert_scores: np.ndarray,
    text_of_image: np.ndarray,
    corpus_weights: np.ndarray,
    per_text_weights: np.ndarray,
    ks: Sequence[int] = (1, 5),
) -> dict[str, float]:
    """The paper's retrieval ensemble (no reference code): text→image with one weight vector for the whole
    caption corpus, image→text with each text's own weights. expert_scores [E, N_images, N_texts]."""
    i2t_scores = ensemble_logits(expert_scores, per_text_weights)  # texts take the place of classes
    t2i_scores = ensemble_logits(expert_scores, corpus_weights)
    return recall_at_k(i2t_scores, t2i_scores, text_of_image, ks)
