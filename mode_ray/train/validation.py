"""Validation on held-out manifest rows: the signal settings are chosen by, never the evaluation report.

Rows whose key hash falls in the hold-out never train any model of the run, so every model is scored on the
same unseen pairs — overall and per coarse cluster, which shows an expert collapsing on its own narrow
partition long before a benchmark would. Two numbers per group: the CLIP loss in fixed batches of the
training batch size, and image→text accuracy over the group's whole held-out set, where retrieving any
caption identical to the true one counts as right (web captions repeat).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F


class HeldOut:
    """Held-out rows, read and resized (no random crop) once, on first use."""

    def __init__(self, read: Callable[[], Iterable[dict[str, torch.Tensor]]], model_name: str) -> None:
        self.read = read  # one pass over the held-out rows, in batches
        self.model_name = model_name
        self._tensors: dict[str, torch.Tensor] | None = None

    def tensors(self, device: torch.device) -> dict[str, torch.Tensor]:
        from mode_ray.train.transforms import augment

        if self._tensors is None:
            parts: dict[str, list[torch.Tensor]] = {"pixels": [], "text": [], "coarse_id": []}
            for batch in self.read():
                ok = batch["ok"].bool()
                for name in parts:
                    parts[name].append(batch[name][ok])
            joined = {name: torch.cat(chunks) for name, chunks in parts.items()} if parts["pixels"] else {}
            if joined and len(joined["pixels"]):
                self._tensors = {
                    "image": augment(joined["pixels"].to(device), self.model_name, train=False),
                    "text": joined["text"].long().to(device),
                    "coarse_id": joined["coarse_id"].to(device),
                }
            else:
                self._tensors = {}
        return self._tensors


@torch.no_grad()
def _features(model: torch.nn.Module, images: torch.Tensor, texts: torch.Tensor, chunk: int) -> tuple:
    img, txt = [], []
    for i in range(0, len(images), chunk):
        image_f, text_f, scale = model(images[i : i + chunk], texts[i : i + chunk])
        img.append(image_f)
        txt.append(text_f)
    return torch.cat(img), torch.cat(txt), scale


def _group_metrics(img: torch.Tensor, txt: torch.Tensor, tokens: torch.Tensor, scale: torch.Tensor, batch: int):
    n = len(img)
    losses = []
    for i in range(0, n, batch):  # the training loss, in fixed batches of the training size
        a, b = img[i : i + batch], txt[i : i + batch]
        if len(a) < 2:
            continue
        logits = scale * a @ b.T
        target = torch.arange(len(a), device=a.device)
        losses.append(((F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2).item())
    picked = (img @ txt.T).argmax(dim=1)
    same_caption = (tokens[picked] == tokens).all(dim=1)
    return {
        "loss": sum(losses) / len(losses) if losses else None,
        "i2t_acc": same_caption.float().mean().item(),
        "n": n,
    }


def validate(model: torch.nn.Module, data: dict[str, torch.Tensor], batch: int) -> dict[str, Any]:
    """{'all': {...}, 'by_cluster': {coarse id: {...}}} on the held-out rows; {} when there are none."""
    if not data or len(data["image"]) < 2:
        return {}
    was_training = model.training
    model.eval()
    try:
        img, txt, scale = _features(model, data["image"], data["text"], batch)
    finally:
        model.train(was_training)
    out: dict[str, Any] = {"all": _group_metrics(img, txt, data["text"], scale, batch), "by_cluster": {}}
    coarse = data["coarse_id"]
    for c in sorted(set(coarse.tolist())):
        mask = coarse == c
        if int(mask.sum()) >= 2:
            out["by_cluster"][str(c)] = _group_metrics(img[mask], txt[mask], data["text"][mask], scale, batch)
    return out
