"""open_clip models: build from a registered config, export checkpoints that stock open_clip loads.

An export is a folder in open_clip's own Hugging Face Hub layout — `open_clip_config.json` (`model_cfg` +
`preprocess_cfg`, written by open_clip's `save_config_for_hf`) and `open_clip_model.safetensors` — plus a
`README.md` model card, so `huggingface-cli upload ORG/REPO EXPORT` publishes it as it is. Stock open_clip
loads it in one line, from disk or, once uploaded, from the Hub:

    model, _, preprocess = open_clip.create_model_and_transforms("local-dir:EXPORT")   # or "hf-hub:ORG/REPO"

`{model_name}.json` (the bare model config) stays beside them, so the older two-line load works too:

    open_clip.add_model_config("EXPORT/mode-tiny.json")
    model, _, preprocess = open_clip.create_model_and_transforms(
        "mode-tiny", pretrained="EXPORT/open_clip_model.safetensors")

Exports made before this layout (`{model_name}.json` + `open_clip_model.pt`) still load.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from mode_ray.config import S3Config
from mode_ray.run_root.storage import get_fs, is_local, join, read_bytes, write_bytes

if TYPE_CHECKING:  # torch only in annotations: `CONFIG_DIR` and the file names are read without it
    import torch

CONFIG_DIR = Path(__file__).parent / "configs"
HF_CONFIG_FILE = "open_clip_config.json"  # open_clip's HF_CONFIG_NAME
SAFE_WEIGHTS_FILE = "open_clip_model.safetensors"  # open_clip's HF_SAFE_WEIGHTS_NAME
LEGACY_WEIGHTS_FILE = "open_clip_model.pt"  # exports written before the Hub layout
CARD_FILE = "README.md"


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
    """The Hub layout under out_dir (any fsspec URL): open_clip's config file, safetensors weights, and the
    bare `{model_name}.json`. The model card is written by whoever knows the run (`mode_ray.models.card`)."""
    import tempfile

    import safetensors.torch
    from open_clip.push_to_hf_hub import save_config_for_hf

    model = _unwrap(model)
    config = model_config(model_name)
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / HF_CONFIG_FILE
        save_config_for_hf(model, local, config)  # open_clip's own writer: model_cfg + preprocess_cfg
        write_bytes(join(out_dir, HF_CONFIG_FILE), local.read_bytes(), s3)
    write_bytes(join(out_dir, f"{model_name}.json"), json.dumps(config, indent=2).encode(), s3)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    write_bytes(join(out_dir, SAFE_WEIGHTS_FILE), safetensors.torch.save(tensors), s3)
    return out_dir


def export_info(export_dir: str, s3: S3Config | None = None) -> tuple[str, dict[str, Any]]:
    """(model name, open_clip model config) of an export folder, either layout. An export from elsewhere
    without a `{name}.json` is named after its folder."""
    fs, path = get_fs(export_dir, s3)
    if not fs.exists(path):
        raise FileNotFoundError(f"no export folder at {export_dir}")
    names = [p.rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)]
    bare = sorted(n for n in names if n.endswith(".json") and n != HF_CONFIG_FILE)
    if HF_CONFIG_FILE in names:
        config = json.loads(read_bytes(join(export_dir, HF_CONFIG_FILE), s3))["model_cfg"]
        name = Path(bare[0]).stem if bare else (PurePosixPath(path).name or "model")
        return name.replace("/", "-"), config
    if bare:
        return Path(bare[0]).stem, json.loads(read_bytes(join(export_dir, bare[0]), s3))
    raise FileNotFoundError(f"no open_clip model config ({HF_CONFIG_FILE} or NAME.json) in {export_dir}")


def load_exported(export_dir: str, s3: S3Config | None = None, device: str = "cpu") -> tuple[torch.nn.Module, Any, Any]:
    """(model, eval transform, tokenizer) from an export folder, local or remote, via stock open_clip: the Hub
    layout through `local-dir:` (a remote folder is fetched first), an older export through its config."""
    import tempfile

    import open_clip

    fs, path = get_fs(export_dir, s3)
    names = {p.rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)}
    with tempfile.TemporaryDirectory() as tmp:
        if HF_CONFIG_FILE in names:
            local = path if is_local(export_dir) else tmp
            if not is_local(export_dir):
                for name in (HF_CONFIG_FILE, SAFE_WEIGHTS_FILE):
                    fs.get(f"{path}/{name}", f"{tmp}/{name}")
            model, _, eval_tf = open_clip.create_model_and_transforms(f"local-dir:{local}", device=device)
            return model.eval(), eval_tf, open_clip.get_tokenizer(f"local-dir:{local}")
        model_name, _ = export_info(export_dir, s3)
        local_cfg, local_weights = f"{tmp}/{model_name}.json", f"{tmp}/{LEGACY_WEIGHTS_FILE}"
        fs.get(f"{path}/{model_name}.json", local_cfg)
        fs.get(f"{path}/{LEGACY_WEIGHTS_FILE}", local_weights)
        open_clip.add_model_config(local_cfg)
        model, _, eval_tf = open_clip.create_model_and_transforms(model_name, pretrained=local_weights, device=device)
    return model.eval(), eval_tf, open_clip.get_tokenizer(model_name)
