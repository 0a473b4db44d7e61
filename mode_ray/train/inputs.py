"""What a model's inputs are (side, decoded side, normalisation, text context), as plain data: the trial
process passes it on to its datasets without importing torch or open_clip."""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache

LOAD_RATIO = 8 / 7


@dataclass(frozen=True)
class InputSpec:
    size: int  # the model's input side
    load: int  # the decoded side the crops are taken from
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    context_length: int


@cache
def input_spec(model_name: str) -> InputSpec:
    from open_clip.transform import PreprocessCfg

    from mode_ray.models.clip import model_config

    cfg = model_config(model_name)
    size = cfg["vision_cfg"]["image_size"]
    size = size if isinstance(size, int) else size[0]
    pre = PreprocessCfg(**cfg.get("preprocess_cfg", {}))
    return InputSpec(size, math.ceil(size * LOAD_RATIO), pre.mean, pre.std, cfg["text_cfg"]["context_length"])
