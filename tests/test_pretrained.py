"""Pretrained CLIP weights in open_clip's own layouts as training.init and moe.base, with no network."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from mode_ray.models.clip import build_clip, model_config
from mode_ray.models.pretrained import check_architecture, resolve_pretrained
from tests.conftest import demo_config, linked_run_root


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


@pytest.fixture(scope="module")
def init_run(trained_run, hub_weights, tmp_path_factory):
    """The trained run's prep, trained again from training.init at a learning rate of 1e-12, tracked to
    TensorBoard, an MLflow file store and W&B (offline): the seed and the generalist that continues it (`train
    --model generalist`), two jobs of two kinds, which is what "every job is tracked" needs; the experts' tails
    are the same kind of job as the generalist's."""
    from mode_ray.stages.train import run_train

    cfg, _, _ = trained_run
    folder, _ = hub_weights
    root = linked_run_root(cfg.run_root, tmp_path_factory.mktemp("init-run"))
    sets = (
        "clustering.n_coarse=2", "training.samples_per_epoch=64", "training.epochs=1", "training.batch_size=32",
        "training.seed_fraction=0.5", "training.matched_control=false", "training.lr=1e-12",
        "training.weight_decay=0", "training.warmup_steps=0", "training.run.checkpoint_every_epochs=1",
        "training.run.log_every_steps=1", f"training.init=local-dir:{folder}", f"moe.base=local-dir:{folder}",
        "tracking.report_to=[tensorboard, mlflow, wandb]",
    )  # fmt: skip
    own = demo_config(root, cfg.data.shards, *sets)
    return own, run_train(own, models=["generalist"])


def test_the_seed_starts_from_training_init_and_moe_base_takes_hub_weights(init_run, hub_weights):
    from mode_ray.stages.moe import resolve_base

    cfg, _ = init_run
    folder, state = hub_weights
    seed = build_clip("mode-tiny")[0]
    seed.load_state_dict(torch.load(Path(cfg.run_root) / "experts/seed/state.pt", weights_only=True)["model"])
    for key, value in state.items():  # one step at lr 1e-12 from the init: the init, to float precision
        torch.testing.assert_close(seed.state_dict()[key], value, rtol=0, atol=1e-6)
    base, known = resolve_base(cfg, set())
    assert base.url == str(folder) and base.identity == f"local-dir:{folder}" and not known
    assert _same_weights(base.url, state)


def _wandb_records(path: Path) -> list:
    """The records of a W&B run file, parsed with W&B's own protobuf schema. The file is a LevelDB-style log
    (a 7-byte `:W&B` header, then 32 KiB blocks of records, each `crc32 (4) · length (2) · type (1)` + data,
    type 1 whole / 2 first / 3 middle / 4 last); wandb 0.31 ships no Python reader for it, so the framing is
    read here and every record is W&B's `Record` message."""
    import struct

    from wandb.proto import wandb_internal_pb2

    data, block, pos, chunks, partial = path.read_bytes(), 32768, 7, [], b""
    assert data[:4] == b":W&B", path
    while pos + 7 <= len(data):
        left = block - pos % block
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7]) if left >= 7 else (0, 0, 0)
        if left < 7 or (length == 0 and kind == 0):  # block trailer or padding
            pos += left
            continue
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        partial = chunk if kind in (1, 2) else partial + chunk
        if kind in (1, 4):
            chunks.append(partial)
    records = []
    for chunk in chunks:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(chunk)
        records.append(record)
    return records


def test_every_job_is_tracked_where_tensorboard_mlflow_and_wandb_read_it(init_run):
    from mlflow import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg, summary = init_run
    models = sorted(summary["models"])
    assert models == ["generalist", "seed"]
    for name in models:
        events = EventAccumulator(os.path.join(cfg.tracking.dir, name))
        events.Reload()
        losses = events.Scalars("train/loss")
        history = summary["models"][name]["loss_history"]
        assert [e.step for e in losses] == [p["step"] for p in history]
        assert [e.value for e in losses] == pytest.approx([p["loss"] for p in history], rel=1e-6)
        assert {"train/lr", "val/loss", "train/samples_seen"} <= set(events.Tags()["scalars"])
        for key in ("grad_norm_max", "logit_scale"):  # the signals a diverging run shows first
            values = [e.value for e in events.Scalars(f"train/{key}")]
            assert values == pytest.approx([p[key] for p in history], rel=1e-6) and min(values) > 0
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3's opt-in to read a file store
    client = MlflowClient(tracking_uri=f"file:{cfg.tracking.dir}/mlruns")
    experiment = client.get_experiment_by_name(f"mode_ray-{Path(cfg.run_root).name}")
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(r.info.run_name for r in runs) == models
    for run in runs:
        history = client.get_metric_history(run.info.run_id, "train.loss")
        assert len(history) == len(summary["models"][run.info.run_name]["loss_history"])
    wandb_runs = {}
    for path in Path(cfg.tracking.dir, "wandb").glob("offline-run-*/run-*.wandb"):
        records = _wandb_records(path)
        run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
        assert (run.project, run.run_group) == ("mode_ray", f"mode_ray-{Path(cfg.run_root).name}")
        losses = []
        for r in records:
            if r.WhichOneof("record_type") == "history":
                items = {"/".join(i.nested_key) or i.key: i.value_json for i in r.history.item}
                if "train/loss" in items:
                    losses.append((int(items["_step"]), float(items["train/loss"])))
        wandb_runs[run.display_name] = losses
    assert sorted(wandb_runs) == models
    for name, losses in wandb_runs.items():
        history = summary["models"][name]["loss_history"]
        assert [s for s, _ in losses] == [p["step"] for p in history]
        assert [v for _, v in losses] == pytest.approx([p["loss"] for p in history], rel=1e-6)
