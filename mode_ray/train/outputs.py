"""A finished job's folder, written by rank 0, which holds the model (so the trial never loads it again):
the final training state (what a child job continues), the export, and what training recorded (Ray-free)."""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
from typing import Any

import torch

from mode_ray.config import S3Config
from mode_ray.run_root.layout import STATE_FILE, TRAIN_RECORD
from mode_ray.run_root.storage import join, write_bytes, write_json
from mode_ray.train.checkpoints import save_state
from mode_ray.train.job import TrainJob


def export_model(job: TrainJob, model: torch.nn.Module, s3: S3Config) -> None:
    """A dense model as a stock open_clip export; a CLIP-MoE as its own folder (`mode_ray.models.load_model`)."""
    from mode_ray.models.clip import export_open_clip

    if job.upcycle is None:
        export_open_clip(model, job.inputs.model, job.paths.export_dir, s3)
        return
    from mode_ray.models.moe import moe_layers, save_moe
    from mode_ray.train.build import moe_spec

    spec = moe_spec(job, s3)
    for tower, block, _ in moe_layers(model):
        spec.layers.setdefault(tower, []).append(block)
    save_moe(model, spec, job.paths.export_dir, s3)


def weights_digest(model: torch.nn.Module) -> str:
    """sha256 of the model's state, tensor by tensor in state-dict order, whatever their dtype or device."""
    digest = hashlib.sha256()
    for tensor in model.state_dict().values():
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def write_outputs(
    job: TrainJob, s3: S3Config, model: torch.nn.Module, opt: Any, scaler: Any, state: dict[str, Any], stamps: dict
) -> None:
    start = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, STATE_FILE)
        save_state(local, model, opt, scaler, state)
        with open(local, "rb") as f:
            write_bytes(join(job.paths.out_dir, STATE_FILE), f.read(), s3)
    export_model(job, getattr(model, "module", model), s3)
    stamps["outputs_written"] = time.time()
    keys = ("seen", "skipped_images", "loss_history", "val_history", "executions", "recovery", "weights_sha256_by_rank")
    record = {key: state[key] for key in keys} | {"resumed_at_steps": state.get("resumed_at_steps", [])}
    record.update(
        start_step=state["init_step"],
        end_step=state["step"],
        first_lr=state["first_lr"],
        worker_seconds=state["seconds"],
        stamps=stamps,
        export_seconds=stamps["outputs_written"] - start,
    )
    write_json(join(job.paths.out_dir, TRAIN_RECORD), record, s3)
