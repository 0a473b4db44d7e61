"""Pretrained CLIP weights named as open_clip names them, resolved to a folder every mode_ray loader reads.

    local-dir:PATH      a folder in open_clip's Hub layout (open_clip_config.json + weights), or a mode_ray export
    hf-hub:ORG/REPO     the same on the Hugging Face Hub; from the local cache when offline (HF_HUB_OFFLINE=1)
    ARCH:TAG | ARCH:FILE  an open_clip architecture with a pretrained tag (downloaded by open_clip) or a weights
                        file; built once and exported in the Hub layout under run_root/pretrained/
    PATH or URL         an export folder, as before

`training.init` (the seed's starting weights) and `moe.base` (the CLIP the MoE upcycles) take these.
"""

from __future__ import annotations

import os
from typing import Any

from mode_ray.config import S3Config
from mode_ray.run_root.storage import exists, join, settings_hash

LOCAL_DIR, HF_HUB = "local-dir:", "hf-hub:"
ARCH_FIELDS = {  # what decides the shapes of the weights: an init must match training.model on these
    "vision_cfg": ("image_size", "layers", "width", "patch_size", "head_width", "mlp_ratio"),
    "text_cfg": ("context_length", "vocab_size", "width", "heads", "layers"),
}


def is_identifier(name: str) -> bool:
    """Whether a name is one of the forms above rather than a model of the run (`seed`, `expert-0`, …)."""
    return "/" in name or ":" in name  # local-dir:, hf-hub:, ARCH:… and paths; run models have neither


def resolve_pretrained(identifier: str, run_root: str, s3: S3Config | None = None) -> str:
    """The folder (path or URL) holding the weights an identifier names."""
    if identifier.startswith(LOCAL_DIR):
        return os.path.abspath(os.path.expanduser(identifier[len(LOCAL_DIR) :]))
    if identifier.startswith(HF_HUB):
        from huggingface_hub import constants, snapshot_download

        try:  # with HF_HUB_OFFLINE set, huggingface_hub itself reads only its local cache
            return snapshot_download(identifier[len(HF_HUB) :])
        except Exception as err:  # noqa: BLE001 — any failure to find it names the identifier
            offline = constants.HF_HUB_OFFLINE
            where = "the local Hugging Face cache (offline)" if offline else "the Hugging Face Hub"
            raise ValueError(f"{identifier}: not found in {where}: {type(err).__name__}: {err}") from None
    if "://" not in identifier and ":" in identifier:
        return _materialise(identifier, run_root, s3)
    return identifier


def _materialise(identifier: str, run_root: str, s3: S3Config | None) -> str:
    """ARCH:TAG or ARCH:FILE through open_clip, exported once in the Hub layout inside the run root."""
    import open_clip

    from mode_ray.models.clip import HF_CONFIG_FILE, export_open_clip, register_model_configs

    arch, pretrained = identifier.split(":", 1)
    out = join(run_root, "pretrained", f"{arch}-{settings_hash(identifier)[:8]}")
    if exists(join(out, HF_CONFIG_FILE), s3):
        return out
    register_model_configs()
    if open_clip.get_model_config(arch) is None:
        raise ValueError(f"{identifier}: {arch!r} is not an open_clip architecture")
    try:
        model, _, _ = open_clip.create_model_and_transforms(arch, pretrained=pretrained)
    except RuntimeError as err:
        raise ValueError(f"{identifier}: open_clip could not load {pretrained!r} for {arch}: {err}") from None
    return export_open_clip(model, arch, out, s3)


def check_architecture(folder: str, model_name: str, setting: str, s3: S3Config | None = None) -> dict[str, Any]:
    """The weights' own open_clip config; an error when its shapes differ from `model_name`'s."""
    from mode_ray.models.clip import export_info, model_config

    _, theirs = export_info(folder, s3)
    ours = model_config(model_name)
    differ = [
        f"{tower}.{key} {theirs.get(tower, {}).get(key)} ≠ {ours.get(tower, {}).get(key)}"
        for tower, keys in ARCH_FIELDS.items()
        for key in keys
        if theirs.get(tower, {}).get(key) != ours.get(tower, {}).get(key)
    ]
    if theirs.get("embed_dim") != ours.get("embed_dim"):
        differ.insert(0, f"embed_dim {theirs.get('embed_dim')} ≠ {ours.get('embed_dim')}")
    if differ:
        raise ValueError(
            f"{setting}: the weights' architecture differs from training.model={model_name!r} "
            f"({'; '.join(differ)}): set training.model to the weights' architecture"
        )
    return theirs
