"""open_clip models: build from a registered config, export checkpoints that stock open_clip loads.

An export is a folder with `{model_name}.json` (the model config, as open_clip's own configs are written)
and `open_clip_model.pt` (a plain state dict). Stock open_clip loads it with two lines:

    open_clip.add_model_config("EXPORT/mode-tiny.json")
    model, _, preprocess = open_clip.create_model_and_transforms("mode-tiny", pretrained="EXPORT/open_clip_model.pt")
"""

from __future__ import annotations

import io
import json
from functools import cache
from pathlib import Path
from typing import Any

import torch

from mode_ray.config import S3Config
from mode_ray.storage import get_fs, join

CONFIG_DIR = Path(__file__).parent / "configs"
WEIGHTS_FILE = "open_clip_model.pt"


@cache
def register_model_configs() -> None:
    """Make the bundled configs (e.g. `mode-tiny`) visible to `open_clip.create_model`."""
    import open_clip

    open_clip.add_model_config(CONFIG_DIR)


def build_clip(model_name: str, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, Any, Any, Any]:
    """(model, train transform, eval transform, tokenizer) for a built-in or registered open_clip config."""
    import open_clip

    register_model_configs()
    if open_clip.get_model_config(model_name) is None:
        raise ValueError(f"unknown open_clip model {model_name!r}; known: {', '.join(open_clip.list_models()[:8])}…")
    model, train_tf, eval_tf = open_clip.create_model_and_transforms(model_name, device=device)
    return model, train_tf, eval_tf, open_clip.get_tokenizer(model_name)


def model_config(model_name: str) -> dict[str, Any]:
    import open_clip

    register_model_configs()
    cfg = open_clip.get_model_config(model_name)
    if cfg is None:
        raise ValueError(f"unknown open_clip model {model_name!r}")
    return cfg


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "module", model)  # DDP


def export_open_clip(model: torch.nn.Module, model_name: str, out_dir: str, s3: S3Config | None = None) -> str:
    """Write `{model_name}.json` + `open_clip_model.pt` under out_dir (any fsspec URL)."""
    fs, path = get_fs(out_dir, s3)
    fs.makedirs(path, exist_ok=True)
    with fs.open(f"{path}/{model_name}.json", "w") as f:
        json.dump(model_config(model_name), f, indent=2)
    buf = io.BytesIO()
    state = {k: v.detach().cpu() for k, v in _unwrap(model).state_dict().items()}
    torch.save(state, buf)
    with fs.open(f"{path}/{WEIGHTS_FILE}", "wb") as f:
        f.write(buf.getvalue())
    return out_dir


def load_exported(export_dir: str, s3: S3Config | None = None, device: str = "cpu") -> tuple[torch.nn.Module, Any, Any]:
    """(model, eval transform, tokenizer) from an export folder, local or remote, via stock open_clip."""
    import tempfile

    import open_clip

    fs, path = get_fs(export_dir, s3)
    configs = [p for p in fs.ls(path, detail=False) if p.endswith(".json")]
    if not configs:
        raise FileNotFoundError(f"no model config (*.json) in {export_dir}")
    model_name = Path(configs[0]).stem
    with tempfile.TemporaryDirectory() as tmp:
        local_cfg, local_weights = f"{tmp}/{model_name}.json", f"{tmp}/{WEIGHTS_FILE}"
        fs.get(configs[0], local_cfg)
        fs.get(join(path, WEIGHTS_FILE), local_weights)
        open_clip.add_model_config(local_cfg)
        model, _, eval_tf = open_clip.create_model_and_transforms(model_name, pretrained=local_weights, device=device)
    return model.eval(), eval_tf, open_clip.get_tokenizer(model_name)
