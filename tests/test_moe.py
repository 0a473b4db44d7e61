"""`mode-ray moe` end to end on the session's trained run: MCL stages and router fine-tuning as Ray trials, each
data-parallel at 2 workers (the dense jobs at 2 workers are tests/test_ddp.py's)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import TWO_WORKERS, demo_config, linked_run_root

MOE_SETTINGS = (
    "moe.stages=3",
    "moe.image_clusters=2",
    "moe.text_clusters=2",
    "moe.mcl_optim.lr=0.001",
    "moe.mcl_optim.warmup_steps=2",
    "moe.router_optim.lr=0.01",
    "moe.router_epochs=1",
    "moe.top_k=2",
)


@pytest.fixture(scope="module")
def moe_run(trained_run, tmp_path_factory):
    """The trained run's outputs linked into a fresh run root, so building the MoE leaves the shared run alone;
    every MoE job at 2 workers; the router job fails once on purpose and must resume."""
    from mode_ray.runner.trial import failure_marker_path
    from mode_ray.stages.moe import run_moe

    cfg, _, _ = trained_run
    root = linked_run_root(cfg.run_root, tmp_path_factory.mktemp("moe-run"), "experts")
    settings = (*MOE_SETTINGS, "clustering.n_coarse=2", *trained_settings(cfg), *TWO_WORKERS)
    moe_cfg = demo_config(root, cfg.data.shards, *settings, "training.run.fail_once_at_step={moe-router: 5}")
    marker = failure_marker_path(moe_cfg, "moe-router")
    if os.path.exists(marker):
        os.remove(marker)
    summary = run_moe(moe_cfg)
    return moe_cfg, summary, marker


def trained_settings(cfg) -> list[str]:
    t = cfg.training
    return [
        f"training.samples_per_epoch={t.samples_per_epoch}",
        f"training.epochs={t.epochs}",
        f"training.seed_fraction={t.seed_fraction}",
        f"training.batch_size={t.batch_size}",
        f"training.warmup_steps={t.warmup_steps}",
        "training.run.log_every_steps=4",
        "training.run.checkpoint_every_epochs=1",
    ]


def _state(url: str) -> dict[str, torch.Tensor]:
    from mode_ray.models import load_model

    return {k: v.clone() for k, v in load_model(url)[0].state_dict().items()}


def test_moe_builds_resumes_and_loads_back(moe_run) -> None:
    from mode_ray.models import load_model
    from mode_ray.models.moe import expert_usage, moe_layers, track_usage
    from mode_ray.run_root.layout import RunPaths

    cfg, summary, marker = moe_run
    paths = RunPaths(cfg.run_root)
    assert os.path.exists(marker), "the injected router failure never fired"
    assert len(summary["stages"]) == 2
    for stage in summary["stages"]:
        assert stage["steps"] > 0 and stage["samples_seen"] >= stage["steps"] * cfg.training.batch_size - 1
        clustered = sum(stage["clusters"].values())
        assert stage["rows_in_small_clusters"] == sum(
            v for v in stage["clusters"].values() if v < cfg.training.batch_size
        )
        assert clustered == stage["rows"]
    assert summary["router"]["samples_seen"] > 0
    assert summary["compute"]["samples"] > summary["compute"]["moe_samples"] > 0
    for job in ("stage-1", "stage-2", "router"):  # DDP kept the 2 ranks equal, bit for bit, in every MoE job
        digests = json.loads(Path(paths.moe(job), "metrics.json").read_text())["weights_sha256_by_rank"]
        assert len(digests) == 2 and digests[0] == digests[1], job

    model, transform, tokenizer = load_model(paths.export("moe"))
    layers = list(moe_layers(model))
    assert {t for t, _, _ in layers} == {"image", "text"}
    assert all(layer.n_experts == 3 and layer.top_k == 2 for _, _, layer in layers)
    track_usage(model)
    with torch.no_grad():
        image = model.encode_image(torch.randn(2, 3, 32, 32))
        text = model.encode_text(tokenizer(["a red circle", "the digit 7"]))
    assert image.shape[0] == 2 and text.shape[0] == 2 and torch.isfinite(image).all()
    assert all(abs(sum(s) - 1) < 1e-6 for tower in expert_usage(model).values() for s in tower.values())


def test_mcl_stage_changes_only_mlps_and_router_tuning_only_routers(moe_run) -> None:
    from mode_ray.models import load_model
    from mode_ray.models.moe import MoESpec, mlp_state, upcycle
    from mode_ray.run_root.layout import RunPaths

    cfg, _, _ = moe_run
    paths = RunPaths(cfg.run_root)
    base = _state(paths.export("generalist"))
    stage = _state(os.path.join(paths.moe("stage-1"), "export"))
    changed = {k for k in base if not torch.equal(base[k], stage[k])} - {"logit_scale"}
    assert changed and all(".mlp.c_fc." in k or ".mlp.c_proj." in k for k in changed)
    assert stage["logit_scale"].exp().item() == pytest.approx(1 / cfg.moe.temperature)  # fixed, not learnt

    moe = _state(paths.export("moe"))
    stages = [
        load_model(u)[0]
        for u in (paths.export("generalist"), *(os.path.join(paths.moe(f"stage-{s}"), "export") for s in (1, 2)))
    ]
    spec = MoESpec("mode-tiny", {}, 3, 2)
    fresh = upcycle(stages[0], [mlp_state(m) for m in stages], spec, router_seed=cfg.training.seed).state_dict()
    changed = {k for k in fresh if not torch.equal(fresh[k], moe[k])}
    assert changed and all(k.endswith(".mlp.gate.weight") for k in changed)


def test_moe_rerun_trains_nothing(moe_run) -> None:
    from mode_ray.run_root.layout import RunPaths
    from mode_ray.stages.moe import run_moe

    cfg, summary, _ = moe_run
    stamp = os.path.getmtime(os.path.join(RunPaths(cfg.run_root).moe("router"), "metrics.json"))
    again = run_moe(cfg)
    assert os.path.getmtime(os.path.join(RunPaths(cfg.run_root).moe("router"), "metrics.json")) == stamp
    assert again["compute"] == summary["compute"]


def test_mcl_batches_come_from_one_cluster_on_every_worker() -> None:
    from mode_ray.train.sampler import homogeneous_batches

    rng = np.random.default_rng(0)
    labels = rng.choice([0, 1, 2, 3], size=500, p=[0.5, 0.3, 0.17, 0.03])
    plan = homogeneous_batches(labels, global_batch=32, steps=40, world=2, seed=1)
    assert plan.batches.shape == (40, 32)
    for batch, label in zip(plan.batches, plan.labels, strict=True):
        assert set(labels[batch].tolist()) == {label}
    ranks = [plan.rank_rows(r, 2).reshape(40, 16) for r in range(2)]
    for i in range(40):  # both workers' shares of a global batch: one cluster, no row twice
        rows = np.concatenate([ranks[0][i], ranks[1][i]])
        assert len(set(labels[rows].tolist())) == 1 and len(set(rows.tolist())) == 32
    small = int((labels == 3).sum())
    assert small < 32 and plan.small_clusters == {3: small} and plan.skipped_rows == small
    assert 3 not in set(plan.labels.tolist())
    # one epoch covers every row of every cluster that can form a batch
    epoch = homogeneous_batches(
        labels, 32, steps=sum(-(-int((labels == c).sum()) // 32) for c in (0, 1, 2)), world=2, seed=2
    )
    assert set(epoch.batches.ravel().tolist()) == set(np.flatnonzero(labels != 3).tolist())


def test_the_moe_branch_trains_to_the_same_bits_again(moe_run, tmp_path) -> None:
    """The CLIP-MoE branch again in another run root, undisturbed, at the same 2 workers, from the first run's
    stage 1 (copied: its rerun would be the same code as stage 2's): stage 2 — its clustering of pairs embedded
    by stage 1's model, its plan and planned batches, its training — and the router, whose worker failed once in
    the first run, end equal, bit for bit."""
    import shutil

    from mode_ray.run_root.layout import RunPaths
    from mode_ray.stages.moe import run_moe

    cfg, _, _ = moe_run
    root = linked_run_root(cfg.run_root, tmp_path / "again", "experts")
    first, second = RunPaths(cfg.run_root), RunPaths(str(root))
    shutil.copytree(first.moe("stage-1"), second.moe("stage-1"))  # copy2: the files keep their times
    kept = os.path.join(second.moe("stage-1"), "metrics.json")
    stamp = os.path.getmtime(kept)
    run = cfg.training.run.model_copy(update={"fail_once_at_step": None})
    again = cfg.model_copy(update={"run_root": str(root), "training": cfg.training.model_copy(update={"run": run})})
    run_moe(again)
    assert os.path.getmtime(kept) == stamp, "stage 1 was trained again: the copy was not taken as complete"
    a, b = (_state(os.path.join(p.moe("stage-2"), "export")) for p in (first, second))
    assert all(torch.equal(a[k], b[k]) for k in a), "stage-2"
    a, b = _state(first.export("moe")), _state(second.export("moe"))
    assert all(torch.equal(a[k], b[k]) for k in a), "router"
