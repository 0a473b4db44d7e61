"""The training loop without Ray: a local `Runtime` gives it in-memory batches and keeps its checkpoints, so
the loop's step, accumulation, checkpoints, resumption and outputs are checked in seconds."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pyarrow.fs as pafs
import pytest
import torch

from mode_ray.config import S3Config, config_from_dict
from mode_ray.runner.plan_jobs import inputs_of, model_job
from mode_ray.train.build import build_job_model
from mode_ray.train.job import TrainJob
from mode_ray.train.loop import LoopRun, train
from mode_ray.train.schedule import Schedule, Span
from mode_ray.train.transforms import input_spec

MODEL = "mode-demo"


class LocalRuntime:
    """One worker, CPU, the data as tensors; each report's checkpoint copied to a folder of its own."""

    rank, world_size, device = 0, 1, torch.device("cpu")

    def __init__(self, data: dict[str, dict[str, torch.Tensor]], checkpoints: Path, resume: Any = None) -> None:
        self.data, self.folder, self.checkpoint = data, checkpoints, resume
        self.reports: list[dict[str, Any]] = []
        self.bars: list[dict[str, Any]] = []

    def batches(self, dataset: str, batch_size: int, shuffle_buffer: int, seed: int):  # noqa: ANN201
        rows = self.data[dataset]
        n = len(rows["ok"])
        last = n if dataset == "holdout" else n - n % batch_size
        for start in range(0, last, batch_size):
            yield {k: v[start : start + batch_size] for k, v in rows.items()}

    def latest_checkpoint(self) -> Any:
        return self.checkpoint

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return model

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        self.reports.append(metrics)
        if checkpoint_dir:
            kept = self.folder / f"checkpoint_{metrics['step']:06d}"
            shutil.copytree(checkpoint_dir, kept)
            self.checkpoint = SimpleNamespace(filesystem=pafs.LocalFileSystem(), path=str(kept))

    def progress(self, bar: str, **update: Any) -> None:
        self.bars.append({"bar": bar, **update})


def rows(n: int, seed: int) -> dict[str, torch.Tensor]:
    spec = input_spec(MODEL)
    g = torch.Generator().manual_seed(seed)
    ok = torch.ones(n, dtype=torch.bool)
    ok[3] = False  # an undecodable image: skipped and counted
    return {
        "pixels": torch.randint(0, 256, (n, spec.load, spec.load, 3), dtype=torch.uint8, generator=g),
        "text": torch.randint(1, 400, (n, spec.context_length), dtype=torch.int32, generator=g),
        "ok": ok,
        "coarse_id": torch.arange(n) % 2,
    }


def seed_job(tmp_path: Path, steps: int, *sets: str) -> TrainJob:
    cfg = config_from_dict(
        {"run_root": str(tmp_path / "run"), "data": {"shards": "x"}, "training": {"model": MODEL, "batch_size": 8}},
        list(sets),
    )
    schedule = Schedule(1e-3, 2, steps, 0)
    return model_job(cfg, Span("seed", None, 0, steps, init_from_seed=False), schedule, inputs_of(cfg, "m"), None)


def loop_run(every: float) -> LoopRun:
    return LoopRun(torch_threads=1, checkpoint_every_steps=every, log_every_steps=2, holdout=True, s3={})


@pytest.fixture
def data() -> dict[str, dict[str, torch.Tensor]]:
    return {"train_rank0": rows(40, 0), "holdout": rows(12, 1)}


def test_the_loop_trains_checkpoints_and_writes_a_model_without_ray(tmp_path, data):
    job = seed_job(tmp_path, 6, "training.grad_accum_steps=2")
    rt = LocalRuntime(data, tmp_path / "ckpt")
    train(job, loop_run(3), rt)
    record = json.loads((Path(job.paths.out_dir) / "train_record.json").read_text())
    assert (record["start_step"], record["end_step"]) == (0, 6)
    assert [p["step"] for p in record["loss_history"]] == [2, 4, 6]
    assert [r["step"] for r in rt.reports] == [3, 6] and all("val_loss" in r for r in rt.reports)
    # 6 steps × 2 micro-batches of 4 rows; a batch holding the bad image has 3 usable rows
    assert 40 <= sum(record["seen"].values()) <= 48 and record["skipped_images"] >= 1
    assert record["executions"] >= 2  # 40 rows = 10 micro-batches: the data ran out once and started again
    assert (Path(job.paths.export_dir) / "open_clip_config.json").exists()
    assert rt.bars[-1]["completed"] == 6


def test_a_job_trains_to_the_same_bits_twice_and_after_a_restart(tmp_path, data):
    """Same job, same seed: every tensor of the final state equal, bit for bit — from scratch twice, and when a
    worker is lost after the first checkpoint and the job resumes there (the data stream's position and every
    generator, random crops included, come back with the checkpoint)."""
    undisturbed = seed_job(tmp_path / "a", 6)
    train(undisturbed, loop_run(3), LocalRuntime(data, tmp_path / "a-ckpt"))
    again = seed_job(tmp_path / "b", 6)
    train(again, loop_run(3), LocalRuntime(data, tmp_path / "b-ckpt"))
    job = seed_job(tmp_path / "c", 6)
    first = LocalRuntime(data, tmp_path / "c-ckpt")
    first.report = _fail_after_first_checkpoint(first)  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match="worker lost"):
        train(job, loop_run(3), first)
    resumed = LocalRuntime(data, tmp_path / "c-ckpt", resume=first.checkpoint)
    train(job, loop_run(3), resumed)
    record = json.loads((Path(job.paths.out_dir) / "train_record.json").read_text())
    assert record["start_step"] == 0 and record["end_step"] == 6
    assert [p["step"] for p in record["loss_history"]] == [2, 4, 6]  # the curve before the restart is kept
    assert [r["step"] for r in resumed.reports] == [6]
    reference = final_weights(undisturbed)
    for other in (again, job):
        weights = final_weights(other)
        assert weights.keys() == reference.keys()
        assert all(torch.equal(weights[k], reference[k]) for k in reference), other.paths.out_dir


def final_weights(job: TrainJob) -> dict[str, torch.Tensor]:
    return torch.load(Path(job.paths.out_dir) / "state.pt", weights_only=True)["model"]


def _fail_after_first_checkpoint(rt: LocalRuntime):  # noqa: ANN202
    keep = rt.report

    def report(metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        keep(metrics, checkpoint_dir)
        raise RuntimeError("worker lost")

    return report


def test_the_curve_records_gradient_norms_and_the_logit_scale_and_clipping_bounds_the_step(tmp_path, data):
    """Each loss-curve point carries the largest and mean gradient norm since the last point (a spike shows
    there) and the logit scale; `training.grad_clip_norm` clips the global norm before the step: clipped to
    almost nothing, Adam's update shrinks below its epsilon and the weights barely move."""
    free = seed_job(tmp_path / "free", 4, "training.weight_decay=0")  # decay moves weights whatever the gradient
    train(free, loop_run(4), LocalRuntime(data, tmp_path / "free-ckpt"))
    points = json.loads((Path(free.paths.out_dir) / "train_record.json").read_text())["loss_history"]
    assert all(p["grad_norm_max"] >= p["grad_norm_mean"] > 0 for p in points)
    assert all(abs(p["logit_scale"] - 1 / 0.07) < 1.0 for p in points)  # open_clip's init, 4 small steps on
    clipped = seed_job(tmp_path / "clipped", 4, "training.weight_decay=0", "training.grad_clip_norm=1e-12")
    assert clipped.optimizer.grad_clip_norm == 1e-12
    train(clipped, loop_run(4), LocalRuntime(data, tmp_path / "clipped-ckpt"))
    start = seed_job(
        tmp_path / "start", 4, "training.weight_decay=0"
    )  # the same init, never stepped: what "barely moved" is measured from
    torch.manual_seed(start.inputs.seed)
    init = build_job_model(start, S3Config(), torch.device("cpu")).state_dict()
    moved = {
        name: (final_weights(job)["visual.proj"] - init["visual.proj"]).abs().max()
        for name, job in (("free", free), ("clipped", clipped))
    }
    assert moved["clipped"] < 1e-3 * moved["free"], moved
