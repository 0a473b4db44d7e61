"""Turn manifest rows into CLIP inputs: decoded, open_clip-transformed images and tokenised captions."""

from __future__ import annotations

import io
from functools import cache
from typing import Any

import numpy as np
from PIL import Image

from mode_ray.models.clip import model_config


@cache
def _transform_and_tokenizer(model_name: str, is_train: bool = True) -> tuple[Any, Any, int]:
    import open_clip

    size = model_config(model_name)["vision_cfg"]["image_size"]
    # open_clip's own train transform: RandomResizedCrop(scale=(0.9, 1.0)), as in the reference recipe.
    transform = open_clip.image_transform(size, is_train=is_train)
    return transform, open_clip.get_tokenizer(model_name), size


def clip_inputs(
    images: list[bytes | None], captions: list[str], coarse: Any, model_name: str, is_train: bool = True
) -> dict[str, np.ndarray]:
    """Train (augmenting) or eval (resize + centre crop) transform of open_clip, per the flag."""
    transform, tokenizer, size = _transform_and_tokenizer(model_name, is_train)
    pixels = np.zeros((len(images), 3, size, size), dtype=np.float32)
    ok = np.zeros(len(images), dtype=bool)
    for i, payload in enumerate(images):
        try:
            with Image.open(io.BytesIO(payload)) as img:  # type: ignore[arg-type]
                pixels[i] = transform(img.convert("RGB")).numpy()
            ok[i] = True
        except Exception:  # noqa: BLE001 - any decode failure is counted by the loop, never fatal
            ok[i] = False
    return {
        "image": pixels,
        "text": tokenizer(captions).numpy(),
        "ok": ok,
        "coarse_id": np.asarray(coarse, dtype=np.int32),
    }
