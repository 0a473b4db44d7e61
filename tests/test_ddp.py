"""Data-parallel training keeps the one-worker recipe. On one global batch, the gradients DDP averages over 2
ranks (gloo, one process each, as Ray Train's CPU workers run) equal the gradients of 1 rank on the whole batch,
with the loss the training loop builds (`mode_ray.train.losses.global_batch_loss`). Each rank reads a disjoint
share of the job's rows. A job at 2 workers on real Ray Train ends with equal ranks, learns what 1 worker
learns, and resumes from a failure to the bytes of an undisturbed run."""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from tests.conftest import TRAINED_RUN_SETTINGS, TWO_WORKERS, _free_port, demo_config, linked_run_root

GLOBAL_BATCH = 8


def _global_batch(context_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    images = torch.randn(GLOBAL_BATCH, 3, 32, 32, generator=g)
    texts = torch.randint(1, 400, (GLOBAL_BATCH, context_length), generator=g)
    return images, texts


SMOOTHINGS = (0.0, 0.1)  # open_clip's loss, and the MCL stages' label smoothing


def _gradients(rank: int, world: int, port: int, out: dict) -> None:
    """Rank `rank` of `world`, for each label smoothing: the same initial model, its contiguous share of the
    global batch, one backward through DDP; its gradients by parameter name, under (rank, smoothing)."""
    from torch.nn.parallel import DistributedDataParallel

    from mode_ray.models.clip import build_clip
    from mode_ray.train.losses import global_batch_loss, training_loss

    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    for smoothing in SMOOTHINGS:
        torch.manual_seed(0)
        model = build_clip("mode-tiny")[0]
        images, texts = _global_batch(model.context_length)
        share = GLOBAL_BATCH // world
        images, texts = images[rank * share : (rank + 1) * share], texts[rank * share : (rank + 1) * share]
        if world > 1:
            model = DistributedDataParallel(model)
        loss = training_loss(global_batch_loss(smoothing, rank, world), model, model(images, texts), None)
        loss.backward()
        named = getattr(model, "module", model).named_parameters()
        out[(rank, smoothing)] = {name: p.grad.detach().clone() for name, p in named if p.grad is not None}
    if world > 1:
        torch.distributed.destroy_process_group()


@functools.cache
def _ranks(world: int) -> dict[tuple[int, float], dict[str, torch.Tensor]]:
    """Every rank's gradients at every smoothing: one process per rank (spawned once for both smoothings)."""
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_gradients, args=(world, _free_port(), out), nprocs=world, join=True)
        return dict(out)


@pytest.mark.parametrize("smoothing", SMOOTHINGS)
def test_two_ranks_give_the_one_rank_gradient_on_one_global_batch(smoothing: float) -> None:
    one = _ranks(1)[(0, smoothing)]
    two = {rank: _ranks(2)[(rank, smoothing)] for rank in (0, 1)}
    assert set(two[0]) == set(one) and len(one) > 10
    for name, grad in one.items():
        torch.testing.assert_close(two[0][name], grad, rtol=1e-4, atol=1e-6, msg=name)
        assert torch.equal(two[0][name], two[1][name]), name  # DDP hands every rank the same average
    assert any(grad.abs().sum() > 0 for grad in one.values())


# --------------------------------------------------------------------------- jobs at 2 workers, on real Ray Train


def _row_prints(dataset) -> Counter:
    """Every row a dataset hands a worker, by its content (pixels and tokens), counted."""
    out: Counter = Counter()
    for batch in dataset.iter_batches(batch_size=256, batch_format="numpy"):
        for pixels, text in zip(batch["pixels"], batch["text"], strict=True):
            out[hashlib.sha1(pixels.tobytes() + text.tobytes()).hexdigest()] += 1
    return out


def test_each_rank_reads_a_disjoint_share_and_together_every_row_once(trained_run):
    """A generalist's data at 2 workers against 1, over one pass of its rows: the ranks' streams share no row,
    together they hold the one-worker stream's rows exactly (none read twice, none skipped), and with the
    hold-out they are the whole manifest."""
    from mode_ray.data.train_data import job_datasets
    from mode_ray.runner.plan_jobs import make_plan
    from mode_ray.train.transforms import input_spec

    cfg, prep, _ = trained_run
    two = demo_config(cfg.run_root, cfg.data.shards, *TRAINED_RUN_SETTINGS, *TWO_WORKERS)
    spec = input_spec(cfg.training.model)
    streams = {}
    for c in (cfg, two):
        job = next(j for j in make_plan(c, prep["per_expert"]).tails if j.name == "generalist")
        job = replace(job, end_step=job.start_step + 2)  # fewer samples than rows: an execution is one pass
        datasets, facts = job_datasets(c, job, 0, spec)
        assert facts["draws_per_execution"] == 1
        streams[c.training.run.num_workers] = [
            _row_prints(datasets[f"train_rank{r}"]) for r in range(c.training.run.num_workers)
        ]
    (one,), (rank0, rank1) = streams[1], streams[2]
    assert rank0 and rank1 and abs(sum(rank0.values()) - sum(rank1.values())) <= 2 * 128  # a row group's share apart
    assert rank0 + rank1 == one  # every row of the pass, each as often as one worker reads it
    assert not [p for p in rank0 if p in rank1 and one[p] == 1]  # no row on both ranks
    holdout = datasets["holdout"].count()
    assert sum(one.values()) + holdout == prep["in_manifest"]  # and nothing outside the hold-out left out


@pytest.fixture(scope="module")
def two_worker_seeds(trained_run, tmp_path_factory):
    """The trained run's seed trained again at 2 workers in two fresh run roots on the same prep: in the
    first a worker raises after the first checkpoint (step 8 of 16) and the job resumes; the second runs
    undisturbed."""
    from mode_ray.console.progress import StageLog
    from mode_ray.runner.dag import run_jobs
    from mode_ray.runner.plan_jobs import inputs_of, make_plan, training_jobs
    from mode_ray.runner.trial import failure_marker_path

    cfg, prep, _ = trained_run
    runs = []
    for name, fail in (("failed-once", "training.run.fail_once_at_step={seed: 11}"), ("undisturbed", None)):
        root = linked_run_root(cfg.run_root, tmp_path_factory.mktemp(name))
        two = demo_config(root, cfg.data.shards, *TRAINED_RUN_SETTINGS, *TWO_WORKERS, *([fail] if fail else []))
        marker = failure_marker_path(two, "seed")
        if os.path.exists(marker):
            os.remove(marker)
        plan = make_plan(two, prep["per_expert"])
        jobs = [j for j in training_jobs(two, plan, inputs_of(two, prep["manifest_run_id"]), None) if j.name == "seed"]
        assert run_jobs(two, jobs, plan.samples_per_epoch, False, StageLog("t")) == ["seed"]
        runs.append((two, os.path.exists(marker)))
    return runs


def _seed_metrics(cfg) -> dict:
    from mode_ray.stages.train import experts_dir

    return json.loads((Path(experts_dir(cfg, "seed")) / "metrics.json").read_text())


def test_a_two_worker_job_keeps_ranks_equal_the_recipe_and_its_bytes_through_a_failure(trained_run, two_worker_seeds):
    """At 2 workers: every rank ends with the same weights (their digests, gathered at the end); the job
    learns the one-worker recipe (same steps, samples, schedule; held-out loss within 10% on the same data);
    and a job whose worker failed after a checkpoint ends byte-identical to an undisturbed one."""
    from mode_ray.stages.train import experts_dir

    (failed, fired), (undisturbed, _) = two_worker_seeds
    assert fired  # the failure happened
    one = trained_run[2]["models"]["seed"]
    for cfg in (failed, undisturbed):
        m = _seed_metrics(cfg)
        digests = m["weights_sha256_by_rank"]
        assert len(digests) == 2 and digests[0] == digests[1]
        for key in ("start_step", "end_step", "samples_seen", "first_lr", "samples_per_epoch"):
            assert m[key] == one[key], key
        two_loss, one_loss = m["val_history"][-1]["all"]["loss"], one["val_history"][-1]["all"]["loss"]
        assert abs(two_loss - one_loss) <= 0.1 * one_loss, (two_loss, one_loss)
    first, second = (
        torch.load(Path(experts_dir(c, "seed")) / "state.pt", weights_only=True) for c in (failed, undisturbed)
    )
    assert all(torch.equal(first["model"][k], second["model"][k]) for k in first["model"])
    assert _seed_metrics(failed)["weights_sha256_by_rank"] == _seed_metrics(undisturbed)["weights_sha256_by_rank"]
