"""What Ray Train gives the training loop (`mode_ray.train.loop.Runtime`): the worker's rank and device, its
dataset shards, the job's latest checkpoint, DDP, reports with checkpoints, and the stage's progress bars.
The only module under `mode_ray/train/` that imports Ray."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import torch

from mode_ray.train.batches import job_batches


class RayTrainRuntime:
    def __init__(self, board: str | None, datasets: dict[str, Any]) -> None:
        import ray.train
        import ray.train.torch

        ctx = ray.train.get_context()
        self.rank, self.world_size = ctx.get_world_rank(), ctx.get_world_size()
        self.device: torch.device = ray.train.torch.get_device()
        self.board = board if self.rank == 0 else None
        self.datasets = datasets  # this job's, by name (mode_ray.data.rank_data)
        self.streams: dict[str, Any] = {}  # opened once: each pass over a stream is a new epoch of it

    def batches(
        self, dataset: str, batch_size: int, shuffle_buffer: int, seed: int
    ) -> Iterator[dict[str, torch.Tensor]]:
        from mode_ray.data.rank_data import open_stream

        if dataset not in self.streams:
            self.streams[dataset] = open_stream(dataset, self.datasets[dataset])
        shard = self.streams[dataset]
        drop_last = dataset != "holdout"  # training batches are whole; every held-out row counts
        return shard.iter_torch_batches(
            batch_size=batch_size,
            drop_last=drop_last,
            local_shuffle_buffer_size=shuffle_buffer or None,
            local_shuffle_seed=seed if shuffle_buffer else None,
        )

    def latest_checkpoint(self) -> Any | None:
        import ray.train

        return ray.train.get_checkpoint()

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        import ray.train.torch

        return ray.train.torch.prepare_model(model)

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        import ray.train

        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=checkpoint)

    def progress(self, bar: str, **update: Any) -> None:
        from mode_ray.console.progress_bars import report

        report(self.board, bar, **update)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train's entry point on every worker: `config` holds the job, how it runs, its datasets and the
    progress board. The trial and Train's controller unpickle it too, so this module imports no model library:
    the loop (open_clip alone is ~3 s of a core) is imported here, on the worker, after its data stream has
    started."""
    started = time.time()
    rt = RayTrainRuntime(config.get("progress_board"), config["datasets"])
    job = config["job"]
    batches = job_batches(job, rt)  # its first blocks are read while this worker imports the loop
    if job.start.identity is None:  # the run's own architecture throughout: open_clip without unused towers
        from mode_ray.models.lean_import import import_open_clip_for

        import_open_clip_for(job.inputs.model)
    from mode_ray.train.loop import train

    train(job, config["run"], rt, started, batches)
