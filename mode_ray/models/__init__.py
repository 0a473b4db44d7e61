"""Model definitions (plain torch/open_clip; nothing here knows about Ray).

load_model(url) -> (model, eval transform, tokenizer)   any trained model of a run: a dense CLIP's
                                                         stock-open_clip export or the CLIP-MoE's folder
"""

from __future__ import annotations

from typing import Any

from mode_ray.config import S3Config


def load_model(url: str, s3: S3Config | None = None, device: str = "cpu") -> tuple[Any, Any, Any]:
    """One call for every model a run trains: a folder with `moe_config.json` is a CLIP-MoE (`load_moe`),
    any other an open_clip export (`load_exported`)."""
    from mode_ray.models.clip import load_exported
    from mode_ray.models.moe import MOE_CONFIG_FILE, load_moe
    from mode_ray.run_root.storage import exists, join

    if exists(join(url, MOE_CONFIG_FILE), s3):
        model, _, eval_tf, tokenizer = load_moe(url, s3, device)
        return model, eval_tf, tokenizer
    return load_exported(url, s3, device)
