"""Every model on every task, from image and text features: accuracy, recall, predictions, routing.

Models, in report order: each data expert; the routed ensembles (one per routing method); the two
controls the reference prints — `all_unit` (uniform average of the experts) and `expert-max` (per task,
the best single expert: an oracle no deployment could pick); then the single models (the CLIP-MoE `moe`,
when the run has one, and the baselines: generalist, generalist-matched, seed).
Routing weights for experts that were not trained (empty clusters) are dropped and the rest renormalised.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from sklearn.metrics import balanced_accuracy_score

from mode_ray.eval.metrics import ACCURACY, MEAN_AVERAGE_PRECISION, MEAN_PER_CLASS_RECALL
from mode_ray.eval.retrieval import Corpus, ensemble_retrieval, recall_at_k
from mode_ray.eval.zero_shot import accuracy, cosine_logits, ensemble_logits, mean_average_precision
from mode_ray.routing.router import TaskRouter
from mode_ray.routing.weights import Routing, distance_from_uniform
from mode_ray.run_root.layout import MOE
from mode_ray.run_root.names import expert_id, expert_name

METHODS = ("reference", "calibrated")
ALL_UNIT = "all_unit"
EXPERT_MAX = "expert-max"
RETRIEVAL_TASK = "retrieval"  # the task name of eval.shards' caption corpus
MAX_SAVED_SCORES = 50_000_000  # retrieval score matrices above this many floats are not saved


def ensemble_name(method: str) -> str:
    return f"ensemble-{method}"


@dataclass
class TaskData:
    """One task's labelled images, with each model's image features in the same row order. `labels`: one
    class index per image [N], or for a multi-label task which classes each image shows [N, C] in {0, 1}."""

    name: str
    class_names: list[str]
    templates: list[str]
    keys: list[str]
    labels: np.ndarray
    image_feats: dict[str, np.ndarray]
    skipped: dict[str, int] = field(default_factory=dict)

    @property
    def multilabel(self) -> bool:
        return self.labels.ndim == 2

    def main_score(self, logits: np.ndarray) -> float:
        """The number expert-max and the routing hit compare models by."""
        return mean_average_precision(logits, self.labels) if self.multilabel else accuracy(logits, self.labels)


@dataclass
class Scores:
    metrics: list[dict[str, Any]] = field(default_factory=list)  # model, kind, task, metric, value, n
    predictions: list[dict[str, Any]] = field(default_factory=list)  # model, task, key, label, pred
    routing: list[dict[str, Any]] = field(default_factory=list)  # task, method, weights, distances …
    arrays: dict[str, np.ndarray] = field(default_factory=dict)  # saved logits, to recompute anything


def kind_of(model: str) -> str:
    if expert_id(model) is not None:
        return "expert"
    if model.startswith("ensemble-"):
        return "ensemble"
    if model in (ALL_UNIT, EXPERT_MAX):
        return "control"
    if model == MOE:
        return "moe"
    return "baseline"


def restrict(weights: np.ndarray, present: list[int]) -> np.ndarray:
    """Weights over the trained experts only, renormalised (per row for per-class weights)."""
    kept = weights[..., present]
    total = kept.sum(axis=-1, keepdims=True)
    return np.where(total > 0, kept / np.maximum(total, 1e-300), 1.0 / len(present))


def routing_record(task: str, routing: Routing, present: list[int]) -> dict[str, Any]:
    return {
        "task": task,
        "method": routing.method,
        "weights": routing.task_weights.tolist(),
        "used_weights": restrict(routing.task_weights, present).tolist(),
        "per_class": routing.weights.ndim == 2,
        "distance_from_uniform": distance_from_uniform(routing.task_weights),
        "distance_mean": float(routing.distance.mean()),
        "distance_min": float(routing.distance.min()),
        "distance_max": float(routing.distance.max()),
        "label_expert_counts": np.bincount(routing.label_expert, minlength=len(routing.task_weights)).tolist(),
    }


def uniform(n_experts: int) -> np.ndarray:
    """The all_unit control's weights."""
    return np.full(n_experts, 1.0 / n_experts)


def score_task(
    task: TaskData,
    class_feats: dict[str, np.ndarray],
    router: TaskRouter,
    present: list[int],
    baselines: list[str],
) -> Scores:
    out = Scores()
    experts = [expert_name(e) for e in present]
    logits = {m: cosine_logits(task.image_feats[m], class_feats[m]) for m in experts + baselines}
    stacked = np.stack([logits[m] for m in experts])  # [E, N, C]
    for method in METHODS:
        routing = router.route(task.class_names, task.templates, method)
        out.routing.append(routing_record(task.name, routing, present))
        weights = restrict(routing.weights, present)
        logits[ensemble_name(method)] = ensemble_logits(stacked, weights)
        out.arrays[f"{task.name}/weights_{method}"] = weights
    logits[ALL_UNIT] = ensemble_logits(stacked, uniform(len(experts)))
    score = {m: task.main_score(logits[m]) for m in experts}
    best = max(experts, key=score.__getitem__)
    logits[EXPERT_MAX] = logits[best]
    for record in out.routing:  # did routing put most weight on the expert the oracle would pick?
        top = experts[int(np.argmax(record["used_weights"]))]
        record.update(top_expert=top, expert_max_pick=best, hit=bool(score[top] == score[best]))
    out.arrays[f"{task.name}/expert_logits"] = stacked
    out.arrays[f"{task.name}/labels"] = task.labels
    n = len(task.labels)
    for model in _report_order(experts, baselines):
        row = {"model": model, "kind": kind_of(model), "task": task.name, "n": n}
        if model == EXPERT_MAX:
            row["note"] = best
        if task.multilabel:  # no single prediction per image: the ranking per class is what counts
            out.metrics.append({**row, "metric": MEAN_AVERAGE_PRECISION, "value": task.main_score(logits[model])})
            continue
        preds = logits[model].argmax(axis=1)
        out.metrics.append({**row, "metric": ACCURACY, "value": accuracy(logits[model], task.labels)})
        with warnings.catch_warnings():  # a class predicted but absent from the labels: expected, not news
            warnings.simplefilter("ignore")
            recall = balanced_accuracy_score(task.labels, preds) if n else float("nan")
        out.metrics.append({**row, "metric": MEAN_PER_CLASS_RECALL, "value": float(recall)})
        out.predictions += [
            {"model": model, "task": task.name, "key": k, "label": int(y), "pred": int(p)}
            for k, y, p in zip(task.keys, task.labels, preds, strict=True)
        ]
    return out


def score_retrieval(
    name: str,
    corpus: Corpus,
    image_feats: dict[str, np.ndarray],
    text_feats: dict[str, np.ndarray],
    router: TaskRouter,
    present: list[int],
    baselines: list[str],
) -> Scores:
    """One retrieval task: image_feats over the corpus' images, text_feats over corpus.texts."""
    out = Scores()
    pairs = (corpus.pair_images, corpus.pair_texts)
    experts = [expert_name(e) for e in present]
    scores = {m: image_feats[m] @ text_feats[m].T for m in experts + baselines}
    results = {m: recall_at_k(s, s, *pairs) for m, s in scores.items()}
    stacked = np.stack([scores[m] for m in experts])
    for method in METHODS:
        whole = router.route(corpus.texts, ("{}",), method, per_class=False)
        per_text = router.route(corpus.texts, ("{}",), method, per_class=True)
        out.routing.append(routing_record(name, whole, present))
        w_corpus, w_text = restrict(whole.weights, present), restrict(per_text.weights, present)
        results[ensemble_name(method)] = ensemble_retrieval(stacked, *pairs, w_corpus, w_text)
        out.arrays[f"{name}/corpus_weights_{method}"] = w_corpus
        out.arrays[f"{name}/per_text_weights_{method}"] = w_text
    if stacked.size <= MAX_SAVED_SCORES:  # the saved arrays recompute every recall; a huge corpus is skipped
        out.arrays[f"{name}/expert_scores"] = stacked
        out.arrays[f"{name}/pair_images"], out.arrays[f"{name}/pair_texts"] = pairs
    unit = ensemble_logits(stacked, uniform(len(experts)))
    results[ALL_UNIT] = recall_at_k(unit, unit, *pairs)
    results[EXPERT_MAX] = {k: max(results[m][k] for m in experts) for k in results[experts[0]]}
    n_images = len(stacked[0])
    for model in _report_order(experts, baselines):
        for metric, value in results[model].items():
            row = {"model": model, "kind": kind_of(model), "task": name, "metric": metric}
            out.metrics.append({**row, "value": value, "n": n_images})
    return out


ENSEMBLE_MODELS = (*(ensemble_name(m) for m in METHODS), ALL_UNIT, EXPERT_MAX)  # all made of every expert


def _report_order(experts: list[str], baselines: list[str]) -> list[str]:
    return [*experts, *ENSEMBLE_MODELS, *baselines]


def merge(parts: list[Scores]) -> Scores:
    out = Scores()
    for p in parts:
        out.metrics += p.metrics
        out.predictions += p.predictions
        out.routing += p.routing
        out.arrays.update(p.arrays)
    return out
