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
    from mode_ray.models.lean_import import named_config, open_clip_constants

    cfg = named_config(model_name)
    if cfg is None:  # not a config file: open_clip's registry knows it (added at run time), or says it does not
        from mode_ray.models.clip import model_config

        cfg = model_config(model_name)
    size = cfg["vision_cfg"]["image_size"]
    size = size if isinstance(size, int) else size[0]
    pre, default = cfg.get("preprocess_cfg", {}), open_clip_constants()  # PreprocessCfg's defaults
    mean, std = pre.get("mean", default["OPENAI_DATASET_MEAN"]), pre.get("std", default["OPENAI_DATASET_STD"])
    return InputSpec(size, math.ceil(size * LOAD_RATIO), tuple(mean), tuple(std), cfg["text_cfg"]["context_length"])
