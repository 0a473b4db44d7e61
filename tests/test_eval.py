"""`mode-ray eval` on a real trained run: every model × task, recomputable numbers, routing that finds
the domain's expert, folder tasks, skips counted."""

from __future__ import annotations

import io
import json
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.dataset as pads
import pytest

from mode_ray.demo import demo_data
from mode_ray.eval.retrieval import ensemble_retrieval
from mode_ray.eval.zero_shot import ensemble_logits
from mode_ray.routing.router import TaskRouter
from mode_ray.stages.evaluate import run_eval

TASKS = ["digit", "shape", "color", "texture", "letter", "folder-shapes"]
EXPERTS = ["expert-0", "expert-1"]
BASELINES = ["generalist", "generalist-matched", "seed"]
MODELS = [*EXPERTS, "ensemble-reference", "ensemble-calibrated", "all_unit", "expert-max", *BASELINES]


@pytest.fixture(scope="module")
def evaluated(evaluated_run):
    return evaluated_run


def _csv(cfg) -> pd.DataFrame:
    return pd.read_csv(Path(cfg.run_root) / "eval" / "report.csv")


def test_report_lists_every_model_and_task(evaluated):
    cfg, result = evaluated
    report = _csv(cfg)
    acc = report[report.metric == "accuracy"]
    assert set(zip(acc.model, acc.task, strict=True)) == {(m, t) for m in MODELS for t in TASKS}
    retrieval = report[report.task == "retrieval"]
    assert set(retrieval.metric) == {"i2t_r@1", "i2t_r@5", "t2i_r@1", "t2i_r@5"}
    assert set(retrieval.model) == set(MODELS)
    assert (retrieval.value >= 0).all() and (retrieval.value <= 1).all()
    compute = report.drop_duplicates("model").set_index("model")
    samples, seconds = compute["compute_samples"], compute["train_seconds"]
    assert samples["ensemble-reference"] > samples["expert-0"] > samples["seed"] > 0
    assert abs(samples["generalist-matched"] - samples["ensemble-calibrated"]) <= 32 * 2  # compute-matched
    assert seconds["ensemble-calibrated"] > seconds["expert-0"] > seconds["seed"] > 0
    assert np.isnan(compute["trained_samples"]["ensemble-calibrated"])  # a mixture: no single count of its own
    md = (Path(cfg.run_root) / "eval" / "report.md").read_text()
    assert all(f"| {m}" in md for m in MODELS) and "Routing weights per task" in md and "Routing hit rate" in md
    assert (Path(cfg.run_root) / "eval" / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert result["accuracy"]["seed"]["average"] == pytest.approx(acc[acc.model == "seed"].value.mean())


def test_numbers_recompute_from_saved_predictions_and_logits(evaluated):
    cfg, _ = evaluated
    out = Path(cfg.run_root) / "eval"
    report = _csv(cfg)
    preds = pd.read_parquet(out / "predictions.parquet")
    recomputed = preds.assign(hit=preds.label == preds.pred).groupby(["model", "task"]).hit.mean()
    for row in report[report.metric == "accuracy"].itertuples():
        assert recomputed[(row.model, row.task)] == pytest.approx(row.value, abs=1e-12)
        assert row.n == len(preds[(preds.model == row.model) & (preds.task == row.task)])
    per_class = preds.assign(hit=preds.label == preds.pred).groupby(["model", "task", "label"]).hit.mean()
    for row in report[report.metric == "mean_per_class_recall"].itertuples():  # CLIP_benchmark's second number
        assert per_class[(row.model, row.task)].mean() == pytest.approx(row.value, abs=1e-12)
    arrays = np.load(out / "logits.npz")
    for task in TASKS:
        logits, labels = arrays[f"{task}/expert_logits"], arrays[f"{task}/labels"]
        task_preds = preds[preds.task == task]
        for method in ("reference", "calibrated"):
            ensemble = ensemble_logits(logits, arrays[f"{task}/weights_{method}"]).argmax(1)
            assert ensemble.tolist() == task_preds[task_preds.model == f"ensemble-{method}"].pred.tolist()
        uniform = ensemble_logits(logits, np.full(len(logits), 1 / len(logits), dtype=logits.dtype)).argmax(1)
        assert uniform.tolist() == task_preds[task_preds.model == "all_unit"].pred.tolist()
        best = max((logits[e].argmax(1) == labels).mean() for e in range(len(logits)))
        accuracy = report[report.metric == "accuracy"]
        expert_max = accuracy[(accuracy.model == "expert-max") & (accuracy.task == task)].value.item()
        assert expert_max == pytest.approx(best)
    # Retrieval: the routed ensembles' recalls from the saved per-expert scores and weights.
    scores, pairs = arrays["retrieval/expert_scores"], (arrays["retrieval/pair_images"], arrays["retrieval/pair_texts"])
    for method in ("reference", "calibrated"):
        recalls = ensemble_retrieval(
            scores,
            *pairs,
            arrays[f"retrieval/corpus_weights_{method}"],
            arrays[f"retrieval/per_text_weights_{method}"],
        )
        saved = report[(report.model == f"ensemble-{method}") & (report.task == "retrieval")]
        for row in saved.itertuples():
            assert recalls[row.metric] == pytest.approx(row.value, abs=1e-12)


def _domain_experts(cfg) -> dict[str, int]:
    """The expert that holds most of each demo domain's training pairs."""
    domains = {}
    for tar_path in Path(cfg.data.shards).rglob("*.tar"):
        with tarfile.open(tar_path) as tar:
            for member in tar:
                if member.name.endswith(".json"):
                    domains[member.name.split(".")[0]] = json.load(io.BytesIO(tar.extractfile(member).read()))
    manifest = pads.dataset(f"{cfg.run_root}/manifest", format="parquet", partitioning="hive")
    counts: dict[str, Counter] = {}
    for row in manifest.to_table(columns=["key", "coarse_id"]).to_pylist():
        counts.setdefault(domains[row["key"]]["domain"], Counter())[int(row["coarse_id"])] += 1
    return {d: c.most_common(1)[0][0] for d, c in counts.items() if d in demo_data.DOMAINS}


def test_calibrated_routing_puts_most_weight_on_the_domains_expert(evaluated):
    cfg, _ = evaluated
    holder = _domain_experts(cfg)
    router = TaskRouter.from_run(cfg.run_root, cfg.embedding, cfg.eval.routing)
    saved = {(r["task"], r["method"]): r for r in json.loads((Path(cfg.run_root) / "eval/routing.json").read_text())}
    task_domain = {"digit": "digits", "shape": "shapes", "texture": "textures", "letter": "letters"}
    for task, domain in task_domain.items():
        names, templates = demo_data.CLASS_NAMES[task], demo_data.TASK_TEMPLATES[task]
        weights = router.route(names, templates, "calibrated").weights
        assert weights[holder[domain]] >= 0.8, (task, weights, holder)
        reference = router.route(names, templates, "reference").weights
        assert reference.max() < weights.max()  # the released formula is far flatter
        for method, w in (("calibrated", weights), ("reference", reference)):
            np.testing.assert_allclose(saved[(task, method)]["weights"], w)  # the report shows what routes


def test_folder_task_and_skipped_images_are_counted(evaluated, capsys):
    cfg, result = evaluated
    assert result["header"]["skipped images"] == {"folder-shapes": {"not_an_image": 1}}
    report = _csv(cfg)
    folder = report[(report.task == "folder-shapes") & (report.metric == "accuracy")]
    assert (folder.n == 12).all()
    again = run_eval(cfg)
    assert again == result and "eval/ complete" in capsys.readouterr().err


def test_routing_hit_rate_is_the_share_of_tasks_routed_to_the_oracles_pick(evaluated):
    cfg, result = evaluated
    report = _csv(cfg)
    routing = json.loads((Path(cfg.run_root) / "eval/routing.json").read_text())
    tasks = [r for r in routing if r["task"] != "retrieval"]
    for method in ("reference", "calibrated"):
        rows = [r for r in tasks if r["method"] == method]
        for r in rows:
            acc = report[(report.task == r["task"]) & (report.metric == "accuracy")].set_index("model").value
            assert (
                r["expert_max_pick"]
                == report[
                    (report.model == "expert-max") & (report.task == r["task"]) & (report.metric == "accuracy")
                ].note.item()
            )
            assert r["hit"] == (acc[r["top_expert"]] == acc[r["expert_max_pick"]])
        assert result["routing_hit_rate"][method] == pytest.approx(np.mean([r["hit"] for r in rows]))
