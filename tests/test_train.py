"""Training on real Ray Train with tiny open_clip models: seed, experts, generalist, generalist-matched;
and the plain pieces it is made of (schedule, plan, inputs, hold-out, validation)."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mode_ray.data.train_data import (
    Source,
    draws_per_execution,
    held_out,
    job_datasets,
    read_job_rows,
    row_groups,
)
from mode_ray.run_root.storage import read_json
from mode_ray.runner.trial import failure_marker_path
from mode_ray.stages.train import experts_dir, run_train, with_ancestors
from mode_ray.train.schedule import MATCHED, Schedule, Span, plan_training
from mode_ray.train.transforms import augment, crop_boxes, decode_rows, input_spec
from tests.conftest import REPO, TRAIN_EPOCH, linked_run_root
from tests.conftest import TRAIN_BATCH as BATCH

EXPERTS = ("expert-0", "expert-1")


@pytest.fixture(scope="module")
def trained(trained_run):
    return trained_run


def _own_and_other(m: dict, expert: int) -> tuple[int, int]:
    seen = {int(k): v for k, v in m["samples_seen_by_cluster"].items()}
    return seen.get(expert, 0), sum(v for k, v in seen.items() if k != expert)


def test_every_model_trains_its_planned_samples(trained):
    cfg, prep, summary = trained
    models = summary["models"]
    assert set(models) == {"seed", *EXPERTS, "generalist", MATCHED}
    epoch_steps = TRAIN_EPOCH // BATCH
    seed = models["seed"]
    assert (seed["start_step"], seed["end_step"]) == (0, 2 * epoch_steps)
    assert seed["samples_seen"] == 2 * TRAIN_EPOCH  # every step a full batch: samples = steps × batch
    tail = 2 * TRAIN_EPOCH
    for e, name in enumerate(EXPERTS):
        m = models[name]
        assert m["start_step"] == seed["end_step"]  # continues the seed's schedule position
        assert abs(m["samples_seen"] - tail) <= BATCH  # an epoch counts samples, not passes over the partition
        own, other = _own_and_other(m, e)
        partition = prep["per_expert"][str(e)]
        assert partition < tail  # so it was drawn more than once ...
        rest = prep["in_manifest"] - partition
        share = cfg.training.ooc_ratio * rest / (partition + cfg.training.ooc_ratio * rest)
        assert 0 < other <= 3 * share * m["samples_seen"] + 4  # ... with a fresh out-of-cluster share, and no more
        assert own >= (1 - 3 * share) * m["samples_seen"] - 4
    assert abs(models["generalist"]["samples_seen"] - tail) <= BATCH
    matched = models[MATCHED]
    experts_total = sum(models[n]["samples_seen"] for n in EXPERTS)
    assert abs(matched["samples_seen"] - experts_total) <= BATCH * len(EXPERTS)  # the ensemble's tails together
    assert matched["job"]["stretch"] == len(EXPERTS)
    compute = summary["compute"]
    assert compute["ensemble"]["samples"] == seed["samples_seen"] + experts_total
    assert compute[MATCHED]["samples"] == seed["samples_seen"] + matched["samples_seen"]
    assert compute["generalist"]["samples"] == seed["samples_seen"] + models["generalist"]["samples_seen"]


def test_learning_rate_at_each_tails_first_step_is_the_seeds_schedule(trained):
    cfg, _, summary = trained
    t, models = cfg.training, summary["models"]
    seed_schedule = Schedule(t.lr, t.warmup_steps, models["seed"]["end_step"] + 2 * TRAIN_EPOCH // BATCH, 16)
    assert Schedule(**summary["schedule"]) == seed_schedule
    start = models["seed"]["end_step"]
    for name in (*EXPERTS, "generalist", MATCHED):
        assert models[name]["first_lr"] == pytest.approx(seed_schedule.lr(start), rel=1e-9)
    last = [p["lr"] for p in models["seed"]["loss_history"]][-1]
    assert seed_schedule.lr(start) < last  # and the seed's own curve was heading there


def _clip_loss_on(cfg, model_name: str, expert: int | None) -> float:
    """Mean CLIP loss of a trained model on its own data (no augmentation, fixed batches): deterministic."""
    import pyarrow.dataset as pads
    from open_clip.loss import ClipLoss

    from mode_ray.models.clip import build_clip

    table = pads.dataset(f"{cfg.run_root}/manifest", format="parquet", partitioning="hive").to_table(
        columns=["image", "caption", "coarse_id"]
    )
    rows = [r for r in table.to_pylist() if expert is None or int(r["coarse_id"]) == expert]
    model, _, _, _ = build_clip("mode-tiny")
    model.load_state_dict(torch.load(Path(experts_dir(cfg, model_name)) / "state.pt", weights_only=False)["model"])
    model.eval()
    losses = []
    with torch.no_grad():
        for i in range(0, len(rows) - BATCH + 1, BATCH):
            chunk = rows[i : i + BATCH]
            data = decode_rows([r["image"] for r in chunk], [r["caption"] for r in chunk], "mode-tiny")
            images = augment(torch.from_numpy(data["pixels"]), "mode-tiny", train=False)
            img, txt, scale = model(images, torch.from_numpy(data["text"]).long())
            losses.append(float(ClipLoss()(img, txt, scale)))
    return float(np.mean(losses))


def test_loss_goes_down_for_every_model(trained):
    cfg, _, summary = trained
    for name, m in summary["models"].items():
        curve = [p["loss"] for p in m["loss_history"]]
        assert curve[-1] < np.log(BATCH), name  # below guessing within a batch
    seed_curve = [p["loss"] for p in summary["models"]["seed"]["loss_history"]]
    assert seed_curve[-1] < seed_curve[0]
    # Experts and both generalists start from the seed: on their own data they must end below it.
    for name, expert in (("expert-0", 0), ("expert-1", 1), ("generalist", None), (MATCHED, None)):
        after, before = _clip_loss_on(cfg, name, expert), _clip_loss_on(cfg, "seed", expert)
        assert after < before, (name, before, after)


def test_validation_on_held_out_rows_per_partition(trained):
    cfg, _, summary = trained
    for m in summary["models"].values():
        assert m["holdout_fraction"] == cfg.training.holdout_fraction
        last = m["val_history"][-1]
        assert last["step"] == m["end_step"] and last["all"]["n"] > 0
        assert set(last["by_cluster"]) <= {"0", "1"} and last["by_cluster"]
        assert 0 <= last["all"]["i2t_acc"] <= 1 and np.isfinite(last["all"]["loss"])


def test_time_breakdown_per_trial(trained):
    _, _, summary = trained
    for name, m in summary["models"].items():
        timing = m["timing"]
        assert all(v >= 0 for v in timing.values()), (name, timing)
        assert timing["trial"] > timing["compute"] > 0 and timing["ray_train_start"] > 0 and timing["imports"] > 0
        assert timing["fixed"] == pytest.approx(timing["trial"] - timing["compute"])
        if name != "generalist":  # (its worker restarted once: its stamps are the second attempt's)
            parts = sum(v for k, v in timing.items() if k not in ("trial", "fixed", "other"))
            assert parts + timing["other"] == pytest.approx(timing["trial"], abs=0.5)


def test_experts_resume_seed_optimizer_state(trained):
    cfg, _, summary = trained
    seed_end = summary["models"]["seed"]["end_step"]
    blob = torch.load(Path(experts_dir(cfg, "expert-0")) / "state.pt", weights_only=False)
    adam_steps = {int(s["step"]) for s in blob["optimizer"]["state"].values()}
    # AdamW's per-parameter step counts carry on from the seed's, not from zero.
    assert adam_steps == {blob["state"]["step"]} and blob["state"]["step"] > seed_end


def test_export_loads_in_stock_open_clip_with_same_embeddings(trained):
    import open_clip

    from mode_ray.models.clip import build_clip

    cfg, _, _ = trained
    export = Path(experts_dir(cfg, "expert-1")) / "export"
    # open_clip's Hub layout: one line from the folder (as from `hf-hub:` once uploaded) …
    stock, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{export}")
    also, _ = open_clip.create_model_from_pretrained(f"local-dir:{export}")
    # … and the two-line load with the bare model config.
    open_clip.add_model_config(export / "mode-tiny.json")
    two_line, _, _ = open_clip.create_model_and_transforms(
        "mode-tiny", pretrained=str(export / "open_clip_model.safetensors")
    )
    card = (export / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: open_clip") and "coarse cluster 1" in card and "local-dir:" in card
    ours, _, _, tokenizer = build_clip("mode-tiny")
    ours.load_state_dict(torch.load(Path(experts_dir(cfg, "expert-1")) / "state.pt", weights_only=False)["model"])
    images = torch.randn(3, 3, 32, 32)
    texts = tokenizer(["a handwritten digit", "a red circle", "the letter K"])
    with torch.no_grad():
        for loaded in (stock, also, two_line):
            loaded.eval(), ours.eval()
            torch.testing.assert_close(loaded.encode_image(images), ours.encode_image(images))
            torch.testing.assert_close(loaded.encode_text(texts), ours.encode_text(texts))


def test_failed_worker_recovered_and_rerun_trains_nothing(trained, capsys):
    cfg, _, summary = trained
    assert os.path.exists(failure_marker_path(cfg, "generalist"))  # the injected failure did fire ...
    generalist = summary["models"]["generalist"]
    assert generalist["end_step"] == summary["models"]["expert-0"]["end_step"]  # ... and it still finished
    assert generalist["resumed_at_steps"] == [24]  # from its first checkpoint (it failed at step 27)
    assert summary["models"]["expert-0"]["resumed_at_steps"] == []
    markers = sorted(Path(experts_dir(cfg)).rglob("_SUCCESS"))
    before = [m.read_text() for m in markers]
    again = run_train(cfg)
    assert [m.read_text() for m in markers] == before
    assert again["models"] == summary["models"]
    assert "all models complete" in capsys.readouterr().err
    assert read_json(str(Path(experts_dir(cfg)) / "summary.json")) == again


def test_a_failed_worker_ends_as_if_undisturbed(trained, tmp_path):
    """The generalist — whose worker failed after its first checkpoint in the shared run — trained again
    undisturbed in another run root, from a copy of the same seed: every tensor equal, bit for bit. (A model
    trained twice from scratch is the same bytes at 1 worker in tests/test_bench_quality.py's stability run, the
    seed's, and at 2 workers in tests/test_ddp.py.)"""
    import shutil

    from mode_ray.console.progress import StageLog
    from mode_ray.runner.dag import run_jobs
    from mode_ray.runner.plan_jobs import inputs_of, make_plan, training_jobs

    cfg, prep, _ = trained
    root = linked_run_root(cfg.run_root, tmp_path / "again")
    run = cfg.training.run.model_copy(update={"fail_once_at_step": None})
    again = cfg.model_copy(update={"run_root": str(root), "training": cfg.training.model_copy(update={"run": run})})
    shutil.copytree(experts_dir(cfg, "seed"), experts_dir(again, "seed"))
    plan = make_plan(again, prep["per_expert"])
    jobs = training_jobs(again, plan, inputs_of(again, prep["manifest_run_id"]), None)
    picked = [j for j in jobs if j.name in ("seed", "generalist")]
    assert run_jobs(again, picked, plan.samples_per_epoch, False, StageLog("t")) == ["generalist"]  # the seed: complete
    first, second = (
        torch.load(Path(experts_dir(c, "generalist")) / "state.pt", weights_only=True)["model"] for c in (cfg, again)
    )
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_dense_batches_mix_every_partition_and_expert_batches_hold_their_own(trained):
    from mode_ray.runner.plan_jobs import make_plan

    cfg, prep, _ = trained
    plan = make_plan(cfg, prep["per_expert"])
    jobs = {j.name: j for j in plan.tails}
    spec = input_spec(cfg.training.model)
    shares = {}
    for name in ("generalist", "expert-1"):
        datasets, _ = job_datasets(cfg, jobs[name], 0, spec)
        counts = [
            np.bincount(b["coarse_id"], minlength=2)
            for b in datasets["train_rank0"].iter_batches(batch_size=BATCH, batch_format="numpy", drop_last=True)
        ]
        shares[name] = np.array(counts) / BATCH
    # A dense model's batches hold both partitions (row groups of several partitions in each read task) ...
    assert (shares["generalist"].min(axis=1) > 0.1).mean() > 0.9
    # ... an expert's hold its own, with the out-of-cluster share.
    assert shares["expert-1"][:, 1].mean() > 0.9


def test_reads_without_the_decode_cache_decode_the_same_rows(trained):
    cfg, _, _ = trained
    spec = input_spec("mode-tiny")
    manifest = row_groups(f"{cfg.run_root}/manifest", cfg.data.s3)
    group = next(g for g in manifest if g["coarse_id"] == 1)
    items = {k: np.array([group[k]]) for k in ("path", "row_group", "coarse_id")} | {"seed": [0], "position": [0]}
    source = Source(f"{cfg.run_root}/manifest", False, "mode-tiny", {}, spec.load, spec.context_length)
    rows = read_job_rows(items, source, expert=1, ooc_ratio=0.0, holdout=0.0)
    assert rows["pixels"].shape == (group["rows"], spec.load, spec.load, 3) and rows["ok"].all()
    assert (rows["coarse_id"] == 1).all() and rows["text"].shape == (group["rows"], spec.context_length)
    none = read_job_rows(items, source, expert=0, ooc_ratio=0.0, holdout=0.0)  # another expert, no share
    assert len(none["pixels"]) == 0


def test_a_truncated_latest_checkpoint_resumes_from_the_one_before(trained, capsys):
    """Runs last among the trained-run tests: it retrains the generalist's last epoch."""
    cfg, _, summary = trained
    before = summary["models"]["generalist"]
    run_dir = next(d for d in Path(cfg.run_root, "train_runs").glob("generalist-*") if MATCHED not in d.name)
    latest = sorted(run_dir.glob("checkpoint_2*"))[-1] / "state.pt"
    latest.write_bytes(latest.read_bytes()[: latest.stat().st_size // 2])  # a full disk, a killed upload
    os.remove(Path(experts_dir(cfg, "generalist")) / "_SUCCESS")
    again = run_train(cfg)["models"]["generalist"]
    assert again["end_step"] == before["end_step"]
    assert "unreadable" in again["recovery"][0] and f"step {before['end_step'] - 8}" in again["recovery"][1]
    assert again["loss_history"][-1]["step"] == before["end_step"]
    assert "unreadable" in capsys.readouterr().err  # said on the console too


# --------------------------------------------------------------------------- the plain pieces


def test_a_data_buffer_too_small_for_its_reads_is_said_with_the_size_that_fits():
    """The shipped configs feed their reads at full speed; 256 px reads (ViT-B-16) in the demo's 128 MB would
    run about one read task at a time (bench/feed.py), and the message names the budget that fits."""
    from mode_ray.config import load_config
    from mode_ray.runner.trial import buffer_shortfall

    for name in ("demo", "cloud"):
        cfg = load_config(REPO / "configs" / f"{name}.yaml")
        assert buffer_shortfall(cfg.training, input_spec(cfg.training.model)) is None, name
    small = load_config(REPO / "configs" / "demo.yaml", ["training.model=ViT-B-16"]).training
    said = buffer_shortfall(small, input_spec("ViT-B-16"))
    assert said is not None and "data_buffer_mb=128" in said and "256 px" in said and "1154 or more" in said
    assert buffer_shortfall(small.model_copy(update={"run": small.run.model_copy(update={"data_buffer_mb": 1154})}),
                            input_spec("ViT-B-16")) is None  # fmt: skip


def test_plan_counts_steps_for_every_job():
    plan = plan_training(
        epochs=4,
        seed_fraction=0.5,
        samples_per_epoch=1000,
        batch_size=100,
        base_lr=1e-3,
        warmup_steps=5,
        per_expert={"0": 10, "1": 0, "2": 30},
        n_coarse=3,
    )
    assert plan.seed.steps == 20 and plan.schedule.total_steps == 40 and plan.empty_experts == [1]
    names = [j.name for j in plan.tails]
    assert names == [MATCHED, "expert-0", "expert-2", "generalist"]  # the longest first: it bounds the phase
    matched = plan.tails[0]
    assert (matched.start_step, matched.end_step, matched.stretch) == (20, 60, 2.0)
    assert all(j.steps == 20 and j.init_from_seed for j in plan.tails[1:])
    scratch = plan_training(
        epochs=4,
        seed_fraction=0.5,
        samples_per_epoch=1000,
        batch_size=100,
        base_lr=1e-3,
        warmup_steps=5,
        per_expert={"0": 10, "1": 5},
        n_coarse=2,
        use_seed=False,
        matched_control=False,
    )
    assert scratch.seed is None and [(j.start_step, j.end_step) for j in scratch.tails] == [(0, 40)] * 3


def test_training_one_model_plans_it_and_what_it_continues():
    """`mode-ray train --model NAME`: the job and its ancestors, in plan order; an unknown name is refused."""
    from types import SimpleNamespace as Job

    jobs = [Job(name="seed", parents=()), *(Job(name=n, parents=("seed",)) for n in ("expert-0", "generalist"))]
    jobs.append(Job(name="moe-stage1", parents=("generalist",)))
    assert [j.name for j in with_ancestors(jobs, ["moe-stage1"])] == ["seed", "generalist", "moe-stage1"]
    assert [j.name for j in with_ancestors(jobs, ["seed"])] == ["seed"]
    with pytest.raises(ValueError, match="no model \\['expert-9'\\]"):
        with_ancestors(jobs, ["expert-9"])


def test_schedule_warmup_cosine_and_stretched_tail():
    s = Schedule(base_lr=1e-3, warmup_steps=10, total_steps=200, tail_start=100)
    assert s.lr(0) == pytest.approx(1e-4) and s.lr(9) == pytest.approx(1e-3)
    assert s.lr(100) == pytest.approx(5e-4)  # half way through the cosine, whoever continues it
    assert s.lr(200) == pytest.approx(0.0, abs=1e-12)
    # generalist-matched: n tails long, the same curve stretched; equal at the branch point and at the end.
    assert s.lr(100, stretch=4) == s.lr(100)
    assert s.lr(100 + 4 * 50, stretch=4) == pytest.approx(s.lr(150))
    assert s.lr(100 + 4 * 100, stretch=4) == pytest.approx(0.0, abs=1e-12)


def test_decode_flags_bad_images_and_crops_stay_inside():
    buf = io.BytesIO()
    Image.new("RGB", (40, 60), (200, 10, 10)).save(buf, format="JPEG")
    spec = input_spec("mode-tiny")
    out = decode_rows([buf.getvalue(), b"not an image", None], ["a", "b", "c"], "mode-tiny")
    assert out["ok"].tolist() == [True, False, False]
    assert out["pixels"].shape == (3, spec.load, spec.load, 3) and out["pixels"][0].mean() > 50
    assert out["text"].shape == (3, spec.context_length) and not out["pixels"][1:].any()
    boxes = crop_boxes(500, spec.load, torch.Generator().manual_seed(0))
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2:] <= spec.load).all()
    area = w * h / spec.load**2
    assert area.min() >= 0.85 and area.max() <= 1.0 and (w != h).any()  # scale (0.9, 1), ratio (3/4, 4/3)
    images = augment(torch.from_numpy(out["pixels"]), "mode-tiny", train=True)
    assert images.shape == (3, 3, spec.size, spec.size)
    red = augment(torch.from_numpy(out["pixels"][:1]), "mode-tiny", train=False)[0]
    expected = (torch.tensor([200, 10, 10]) / 255 - torch.tensor(spec.mean)) / torch.tensor(spec.std)
    torch.testing.assert_close(red.mean(dim=(1, 2)), expected.float(), atol=0.08, rtol=0)


def test_hold_out_is_fixed_by_key_and_sized_by_fraction():
    keys = [f"k{i:05d}" for i in range(20000)]
    first, again = held_out(keys, 0.05), held_out(list(reversed(keys)), 0.05)[::-1]
    assert (first == again).all() and 0.04 < first.mean() < 0.06
    assert not held_out(keys, 0.0).any()


def test_one_execution_holds_the_whole_small_job():
    from mode_ray.config import config_from_dict

    cfg = config_from_dict({"run_root": "/tmp/x", "data": {"shards": "/tmp/x"}, "training": {"batch_size": 10}})
    groups = [{"coarse_id": 0, "rows": 100}, {"coarse_id": 1, "rows": 300}]
    expert = Span("expert-0", 0, 0, 50, 1.0, False)  # 500 samples from a partition of 100 (+2% of 300)
    draws = draws_per_execution(groups, expert, cfg, holdout=0.0)
    assert draws * (100 + 0.02 * 300) >= 500 and (draws - 1) * (100 + 0.02 * 300) < 500 * 1.02
    dense = Span("generalist", None, 0, 40, 1.0, False)
    assert draws_per_execution(groups, dense, cfg, holdout=0.0) == 2  # 400 samples from 400 rows, with a margin
