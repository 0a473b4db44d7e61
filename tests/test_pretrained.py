"""Pretrained CLIP weights in open_clip's own layouts as training.init and moe.base, with no network."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from mode_ray.models.clip import build_clip, model_config
from mode_ray.models.pretrained import check_architecture, resolve_pretrained
from mode_ray.ownership import claim_run_root
from tests.conftest import demo_config

PREP = ("prep", "manifest", "train_inputs", "clusters", "embeddings", "rejects")  # a trained run's prep, linked


@pytest.fixture(scope="module")
def hub_weights(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A tiny CLIP saved by open_clip's own Hub writer (save_config_for_hf) and a safetensors file, as a model
    downloaded from the Hub or written by open_clip's tools is: not mode_ray's exporter."""
    import safetensors.torch
    from open_clip.push_to_hf_hub import save_config_for_hf

    torch.manual_seed(123)
    model = build_clip("mode-tiny")[0]
    folder = tmp_path_factory.mktemp("hub-weights")
    save_config_for_hf(model, folder / "open_clip_config.json", model_config("mode-tiny"))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    safetensors.torch.save_file(state, folder / "open_clip_model.safetensors")
    return folder, state


def _hf_cache(root: Path, repo: str, files: Path) -> Path:
    """The local Hugging Face cache layout huggingface_hub itself reads: refs/main → snapshots/COMMIT/."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    base = root / f"models--{repo.replace('/', '--')}"
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(commit)
    shutil.copytree(files, base / "snapshots" / commit)
    return root


def _same_weights(folder: str, state: dict[str, torch.Tensor]) -> bool:
    from mode_ray.models import load_model

    loaded = load_model(folder)[0].state_dict()
    return all(torch.equal(loaded[k], v) for k, v in state.items())


def test_every_identifier_resolves_to_the_same_weights(hub_weights, tmp_path, monkeypatch):
    import huggingface_hub.constants

    folder, state = hub_weights
    assert resolve_pretrained(f"local-dir:{folder}", str(tmp_path)) == str(folder)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(_hf_cache(tmp_path / "hf", "me/tiny", folder)))
    cached = resolve_pretrained("hf-hub:me/tiny", str(tmp_path))
    assert _same_weights(cached, state)
    with pytest.raises(ValueError, match="not found in the local Hugging Face cache"):
        resolve_pretrained("hf-hub:me/absent", str(tmp_path))
    built = resolve_pretrained(f"mode-tiny:{folder / 'open_clip_model.safetensors'}", str(tmp_path / "run"))
    assert built.startswith(str(tmp_path / "run" / "pretrained")) and _same_weights(built, state)
    assert check_architecture(str(folder), "mode-tiny", "training.init")["embed_dim"] == 64
    with pytest.raises(ValueError, match="training.init: the weights' architecture differs from training.model"):
        check_architecture(str(folder), "mode-demo", "training.init")


def test_the_seed_starts_from_training_init_and_moe_base_takes_hub_weights(trained_run, hub_weights, tmp_path):
    from mode_ray.stages.moe import resolve_base
    from mode_ray.stages.train import run_train

    cfg, _, _ = trained_run
    folder, state = hub_weights
    root = tmp_path / "run"
    claim_run_root(str(root))
    for name in PREP:
        os.symlink(os.path.join(cfg.run_root, name), root / name)
    sets = (
        "clustering.n_coarse=2", "training.samples_per_epoch=64", "training.epochs=1", "training.batch_size=32",
        "training.seed_fraction=0.5", "training.matched_control=false", "training.lr=1e-12",
        "training.weight_decay=0", "training.warmup_steps=0", "training.checkpoint_every_epochs=1",
        f"training.init=local-dir:{folder}", f"moe.base=local-dir:{folder}",
    )  # fmt: skip
    own = demo_config(root, cfg.data.shards, *sets)
    run_train(own)
    seed = build_clip("mode-tiny")[0]
    seed.load_state_dict(torch.load(root / "experts/seed/state.pt", weights_only=True)["model"])
    for key, value in state.items():  # one step at lr 1e-12 from the init: the init, to float precision
        torch.testing.assert_close(seed.state_dict()[key], value, rtol=0, atol=1e-6)
    url, identity, _ = resolve_base(own)
    assert url == str(folder) and identity == f"local-dir:{folder}" and _same_weights(url, state)
