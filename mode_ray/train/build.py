"""The model a training job starts from: a fresh CLIP from its config (seed; experts and generalists then load the
seed's state), the weights of a dense export (an MCL stage starts from the base), or a CLIP-MoE upcycled from the
base and the MCL stages' MLPs (router fine-tuning). Then which parameters train, and a fixed temperature."""

from __future__ import annotations

import math
from typing import Any

import torch

from mode_ray.config import S3Config


def build_job_model(cfg: dict[str, Any], device: torch.device) -> torch.nn.Module:
    from mode_ray.models import load_model
    from mode_ray.models.clip import build_clip
    from mode_ray.models.moe import MoESpec, mlp_state, set_trainable, upcycle

    s3 = S3Config(**cfg.get("s3") or {})
    moe = cfg.get("moe")
    if moe:  # expert i of every block = that block's MLP in stage i's model; all else from stage 0 (the base)
        base = load_model(moe["stages"][0], s3)[0]
        stages = [mlp_state(base)] + [mlp_state(load_model(url, s3)[0]) for url in moe["stages"][1:]]
        model = upcycle(base, stages, MoESpec(**moe["spec"]), router_seed=cfg["seed"])
    elif cfg.get("init_export"):
        model = load_model(cfg["init_export"], s3)[0]
    else:
        model = build_clip(cfg["model"])[0]
    model = model.to(device).train()
    if cfg.get("fixed_temperature"):
        with torch.no_grad():
            model.logit_scale.fill_(math.log(1.0 / cfg["fixed_temperature"]))
    set_trainable(model, cfg.get("trainable", "all"))
    return model
