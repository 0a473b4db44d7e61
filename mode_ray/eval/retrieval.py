"""Image↔text retrieval recall@k over a caption corpus, and its ensemble.

A corpus is a list of texts and the (image, text) pairs that match. Two ways to build it:
- every caption its own text (CLIP_benchmark's semantics, the suite's retrieval sets: an image has several
  captions, and a text matches only its own image);
- identical captions as one text (web and demo captions repeat: a text matches every image captioned with
  it, so ties between copies of one caption cannot make a correct answer count as wrong).

recall@k is the share of queries with at least one match among the top k (as CLIP papers and CLIP_benchmark
count it): image→text over images, text→image over texts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from mode_ray.eval.zero_shot import ensemble_logits


@dataclass(frozen=True)
class Corpus:
    texts: list[str]
    pair_images: np.ndarray  # [P] image index of each matching pair
    pair_texts: np.ndarray  # [P] text index of each matching pair


def build_corpus(captions_per_image: Sequence[Sequence[str]], merge_identical: bool) -> Corpus:
    """The texts to encode and the matching pairs; every image needs at least one caption."""
    texts: list[str] = []
    index: dict[str, int] = {}
    pairs: set[tuple[int, int]] = set()
    for image, captions in enumerate(captions_per_image):
        if not captions:
            raise ValueError(f"image {image} of a retrieval corpus has no caption")
        for caption in captions:
            if merge_identical:
                text = index.setdefault(caption, len(texts))
                if text == len(texts):
                    texts.append(caption)
            else:
                text = len(texts)
                texts.append(caption)
            pairs.add((image, text))
    ordered = sorted(pairs)
    return Corpus(texts, np.array([p[0] for p in ordered], np.int64), np.array([p[1] for p in ordered], np.int64))


def _top_k(scores: np.ndarray, k: int) -> np.ndarray:
    k = min(k, scores.shape[1])
    return np.argpartition(-scores, k - 1, axis=1)[:, :k]


def recall_at_k(
    i2t_scores: np.ndarray,
    t2i_scores: np.ndarray,
    pair_images: np.ndarray,
    pair_texts: np.ndarray,
    ks: Sequence[int] = (1, 5),
) -> dict[str, float]:
    """Scores are [N_images, N_texts] (the same matrix for one model; different ones for an ensemble)."""
    n_images, n_texts = i2t_scores.shape
    matching = pair_images * n_texts + pair_texts  # each pair as one integer, to look top-k hits up in
    out: dict[str, float] = {}
    for k in ks:
        i2t = _top_k(i2t_scores, k) + np.arange(n_images)[:, None] * n_texts
        out[f"i2t_r@{k}"] = float(np.isin(i2t, matching).any(axis=1).mean())
        t2i = _top_k(t2i_scores.T, k) * n_texts + np.arange(n_texts)[:, None]
        out[f"t2i_r@{k}"] = float(np.isin(t2i, matching).any(axis=1).mean())
    return out


def ensemble_retrieval(
    expert_scores: np.ndarray,
    pair_images: np.ndarray,
    pair_texts: np.ndarray,
    corpus_weights: np.ndarray,
    per_text_weights: np.ndarray,
    ks: Sequence[int] = (1, 5),
) -> dict[str, float]:
    """The paper's retrieval ensemble (no reference code): text→image with one weight vector for the whole
    caption corpus, image→text with each text's own weights. expert_scores [E, N_images, N_texts]."""
    i2t_scores = ensemble_logits(expert_scores, per_text_weights)  # texts take the place of classes
    t2i_scores = ensemble_logits(expert_scores, corpus_weights)
    return recall_at_k(i2t_scores, t2i_scores, pair_images, pair_texts, ks)
