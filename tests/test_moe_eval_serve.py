"""The CLIP-MoE (`moe`) in `mode-ray eval` and behind the endpoint: a MoE upcycled in the test from the
session's trained generalist and seed (real open_clip, real Ray, real HTTP), in a run root of its own that
links the trained run's outputs, so the tests that count the shared run's models keep seeing no MoE."""

from __future__ import annotations

import base64
import json
import os
from dataclasses import asdict
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest
import torch

from mode_ray.demo import demo_data
from mode_ray.eval.tasks import configured_tasks, templates_of
from mode_ray.eval.zero_shot import class_text_features, image_features, preprocess
from mode_ray.models import load_model
from mode_ray.models.clip import model_config
from mode_ray.models.moe import MoESpec, mlp_state, moe_layers, save_moe, track_usage, upcycle
from mode_ray.run_root.layout import MOE, RunPaths
from mode_ray.run_root.ownership import claim_run_root
from mode_ray.run_root.storage import MARKER
from mode_ray.samples.shards import iter_tar_rows
from mode_ray.samples.validate import IMAGE_SUFFIXES, Limits, Rejected, check_image
from mode_ray.stages.evaluate import run_eval
from tests.conftest import served_config, undeploy

TASKS = ["digit", "shape", "color", "texture", "letter", "folder-shapes"]
TOP_K = 1


@pytest.fixture(scope="module")
def moe_run(evaluated_run, tmp_path_factory):
    """(the shared run's eval config, this run's eval config, the moe summary, this run's eval result)."""
    cfg, _ = evaluated_run
    root = tmp_path_factory.mktemp("moe-eval-run")
    claim_run_root(str(root))  # a run root of ours before the links go in
    for name in ("prep", "clusters", "experts"):  # what eval and serve read; eval/ and moe/ are its own
        os.symlink(os.path.join(cfg.run_root, name), root / name)
    paths = RunPaths(str(root))
    name = cfg.training.model
    base, _, _ = load_model(paths.export("generalist"))
    seed, _, _ = load_model(paths.export("seed"))
    spec = MoESpec(base_model=name, open_clip_config=model_config(name), n_experts=2, top_k=TOP_K)
    save_moe(upcycle(base, [mlp_state(base), mlp_state(seed)], spec), spec, paths.export(MOE))
    base_compute = json.loads(Path(paths.experts_summary).read_text())["compute"]["generalist"]
    summary = {
        "base": "generalist",
        "compute": {
            "samples": base_compute["samples"] + 512,
            "train_seconds": base_compute["train_seconds"] + 7.0,
            "trial_seconds": 30.0,
        },
        "spec": asdict(spec),
        "stages": [{"stage": 1, "samples_seen": 256}],
        "router": {"samples_seen": 256},
    }
    Path(paths.moe_summary).write_text(json.dumps(summary))
    moe_cfg = cfg.model_copy(update={"run_root": str(root)})
    return cfg, moe_cfg, summary, run_eval(moe_cfg)


def test_eval_reports_the_moe_as_one_more_single_model(moe_run):
    cfg, moe_cfg, summary, result = moe_run
    out, before = Path(moe_cfg.run_root) / "eval", Path(cfg.run_root) / "eval"
    report, original = pd.read_csv(out / "report.csv"), pd.read_csv(before / "report.csv")
    assert set(report.model) == set(original.model) | {MOE}
    moe = report[report.model == MOE]
    assert set(moe.kind) == {"moe"}
    assert set(moe[moe.metric == "accuracy"].task) == set(TASKS)
    assert set(moe[moe.task == "retrieval"].metric) == {"i2t_r@1", "i2t_r@5", "t2i_r@1", "t2i_r@5"}
    assert ((moe.value >= 0) & (moe.value <= 1)).all()
    assert (moe.compute_samples == summary["compute"]["samples"]).all()
    assert (moe.trained_samples == summary["compute"]["samples"]).all()
    assert moe.train_seconds.to_numpy() == pytest.approx(summary["compute"]["train_seconds"])
    assert MOE in result["accuracy"]
    # The ensembles are still over the data experts only.
    arrays, arrays_before = np.load(out / "logits.npz"), np.load(before / "logits.npz")
    for task in TASKS:
        assert arrays[f"{task}/expert_logits"].shape == arrays_before[f"{task}/expert_logits"].shape
        np.testing.assert_allclose(arrays[f"{task}/expert_logits"], arrays_before[f"{task}/expert_logits"], atol=1e-5)
    md = (out / "report.md").read_text()
    assert "| moe |" in md and "Expert usage of `moe`" in md and "image tower:" in md and "text tower:" in md
    assert (out / "moe_usage.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Same eval settings but for the MoE: its summary is in the settings hash.
    hashes = [json.loads((d / MARKER).read_text())["config_hash"] for d in (out, before)]
    assert hashes[0] != hashes[1]


def _eval_images(cfg) -> list[bytes]:
    """Every usable image the evaluation reads: the eval shards and the folder task."""
    limits = Limits(cfg.data.caption_field, cfg.data.max_image_bytes, cfg.data.max_image_pixels, cfg.data.seed)
    images = []
    for tar in sorted(Path(cfg.eval.shards).rglob("*.tar")):
        with open(tar, "rb") as f:
            images += [row["image"] for row in iter_tar_rows(f, str(tar)) if row.get("image")]
    folder = next(t.location for t in cfg.eval.tasks if t.source == "folder")
    images += [p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.suffix[1:].lower() in IMAGE_SUFFIXES]
    usable = []
    for payload in images:
        try:
            check_image(payload, limits)
            usable.append(payload)
        except Rejected:
            pass
    return usable


def test_moe_usage_counts_every_image_and_class_prompt(moe_run):
    _, moe_cfg, summary, _ = moe_run
    usage = json.loads((Path(moe_cfg.run_root) / "eval" / "moe_usage.json").read_text())
    layers = summary["spec"]["layers"]
    assert set(usage["shares"]) == {"image", "text"}
    for tower, blocks in usage["shares"].items():
        assert set(blocks) == {str(i) for i in layers[tower]}
        for values in blocks.values():
            assert len(values) == 2 and sum(values) == pytest.approx(1, abs=1e-9)
    # Recount on this side, with the same images and prompts: the counts that came back from Ray add up.
    model, transform, tokenizer = load_model(RunPaths(moe_cfg.run_root).export(MOE))
    track_usage(model, True)
    images = _eval_images(moe_cfg)
    for i in range(0, len(images), 64):
        image_features(model, preprocess(images[i : i + 64], transform))
    vision = summary["spec"]["open_clip_config"]["vision_cfg"]
    tokens = (vision["image_size"] // vision["patch_size"]) ** 2 + 1
    local = {}
    for tower, i, layer in moe_layers(model):
        if tower == "image":
            local[(tower, str(i))] = layer.usage.clone()
        layer.usage.zero_()
    for task in configured_tasks(moe_cfg):
        class_text_features(model, tokenizer, task.class_names, templates_of(task, moe_cfg.eval.templates))
    for tower, i, layer in moe_layers(model):
        if tower == "text":
            local[(tower, str(i))] = layer.usage.clone()
    for (tower, block), counts in local.items():
        slots = usage["routed_slots"][tower][block]
        assert slots == int(counts.sum())
        if tower == "image":
            assert slots == len(images) * tokens * TOP_K
        np.testing.assert_allclose(usage["shares"][tower][block], (counts / counts.sum()).numpy(), atol=0.01)


def test_served_models_include_the_moe_when_the_run_has_one(moe_run):
    from mode_ray.serve.app import served_models

    cfg, moe_cfg, _, _ = moe_run
    assert MOE not in served_models(cfg)
    assert served_models(moe_cfg)[-1] == MOE
    chosen = moe_cfg.model_copy(update={"serve": moe_cfg.serve.model_copy(update={"models": ["expert-0", "expert-1"]})})
    assert served_models(chosen) == ["expert-0", "expert-1"]
    without = cfg.model_copy(update={"serve": cfg.serve.model_copy(update={"models": ["expert-0", MOE]})})
    with pytest.raises(ValueError, match="not trained"):
        served_models(without)


@pytest.fixture(scope="module")
def served_moe(moe_run):
    from mode_ray.stages.serve import deploy

    _, moe_cfg, _, _ = moe_run
    cfg = served_config(moe_cfg, "serve.request_timeout_s=20", "serve.layout=single")
    url = deploy(cfg)
    with httpx.Client(base_url=url, timeout=60) as client:
        yield cfg, client
    undeploy(cfg)


def test_moe_answers_over_http_and_is_listed(served_moe):
    cfg, client = served_moe
    tar = sorted(Path(cfg.eval.shards).rglob("*.tar"))[0]
    with open(tar, "rb") as f:
        image = next(row["image"] for row in iter_tar_rows(f, str(tar)) if row.get("image"))
    labels = list(demo_data.CLASS_NAMES["shape"])
    body = {"inputs": base64.b64encode(image).decode(), "parameters": {"candidate_labels": labels, "model": MOE}}
    r = client.post("/", json=body)
    assert r.status_code == 200, r.text
    scores = [p["score"] for p in r.json()]
    assert sorted(p["label"] for p in r.json()) == sorted(labels)
    assert scores == sorted(scores, reverse=True) and sum(scores) == pytest.approx(1, abs=1e-4)
    body["parameters"]["return_expert_weights"] = True
    answer = client.post("/v1/zero-shot-image-classification", json=body).json()
    assert answer["model"] == MOE and answer["expert_weights"] is None
    assert [p["label"] for p in answer["predictions"]] == [p["label"] for p in r.json()]
    # The same numbers as the MoE loaded here.
    model, transform, tokenizer = load_model(RunPaths(cfg.run_root).export(MOE))
    with torch.inference_mode():
        feats = image_features(model, preprocess([image], transform))
        text = class_text_features(model, tokenizer, labels, ["This is a photo of {}."])
    logits = float(model.logit_scale.detach().exp().clamp(max=100)) * (feats @ text.T)[0]
    expected = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    got = {p["label"]: p["score"] for p in r.json()}
    np.testing.assert_allclose([got[label] for label in labels], expected, atol=1e-4)
    ensemble = client.post(
        "/", json={**body, "parameters": {"candidate_labels": labels, "return_expert_weights": True}}
    )
    assert set(ensemble.json()["expert_weights"]) == {"expert-0", "expert-1"}  # the MoE is not in the ensemble
    info = {e["id"]: e for e in client.get("/v1/experts").json()["experts"]}
    assert info[MOE]["kind"] == "moe" and info[MOE]["checkpoint"].endswith("moe/model")
    assert info["generalist"]["kind"] == "baseline"
    assert MOE in client.get("/health").json()["models"]
