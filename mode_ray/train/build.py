"""The model a training job starts from (its `Start`): a fresh CLIP from its config, the weights of a dense
export (training.init, an MCL stage's base), or a CLIP-MoE upcycled from the base and the MCL stages' MLPs
(router fine-tuning). A job that continues its parent loads the parent's state afterwards, in the loop. Then
which parameters train, and a fixed temperature."""

from __future__ import annotations

import math

import torch

from mode_ray.config import S3Config
from mode_ray.models.moe import MoESpec
from mode_ray.train.job import TrainJob


def moe_spec(job: TrainJob, s3: S3Config) -> MoESpec:
    """The upcycled model's spec: the base's open_clip config, `n_experts` stage MLPs, top-k, towers."""
    from mode_ray.models.clip import export_info

    assert job.upcycle is not None
    name, config = export_info(job.paths.start_urls[0], s3)
    up = job.upcycle
    return MoESpec(name, config, up.n_experts, up.top_k, list(up.towers), expert_dropout=up.expert_dropout)


def build_job_model(job: TrainJob, s3: S3Config, device: torch.device) -> torch.nn.Module:
    from mode_ray.models import load_model
    from mode_ray.models.clip import build_clip
    from mode_ray.models.moe import mlp_state, set_trainable, upcycle

    urls = job.paths.start_urls
    if job.start.kind == "upcycle":  # expert i of every block = its MLP in stage i's model; the rest: the base's
        base = load_model(urls[0], s3)[0]
        stages = [mlp_state(base)] + [mlp_state(load_model(url, s3)[0]) for url in urls[1:]]
        model = upcycle(base, stages, moe_spec(job, s3), router_seed=job.inputs.seed)
    elif job.start.kind == "weights":
        model = load_model(urls[0], s3)[0]
    else:  # random, or resumed from the parent's state by the loop
        model = build_clip(job.inputs.model)[0]
    model = model.to(device).train()
    if job.loss.fixed_temperature:
        with torch.no_grad():
            model.logit_scale.fill_(math.log(1.0 / job.loss.fixed_temperature))
    set_trainable(model, job.trainable)
    return model
