"""Training on real Ray Train + Tune with tiny open_clip models: seed, experts, generalist."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from mode_ray.stages.train import experts_dir, failure_marker_path, run_train
from mode_ray.storage import read_json
from mode_ray.train.loop import lr_at
from mode_ray.train.transforms import clip_inputs
from tests.conftest import TRAIN_BATCH as BATCH


@pytest.fixture(scope="module")
def trained(trained_run):
    return trained_run


def test_all_models_trained_on_what_they_should_see(trained):
    cfg, prep, summary = trained
    per_expert = prep["per_expert"]
    models = summary["models"]
    assert set(models) == {"seed", "expert-0", "expert-1", "generalist"}
    seed = models["seed"]
    assert seed["passes"] == 2 and seed["samples_seen"] == 2 * prep["in_manifest"]
    for e in (0, 1):
        m = models[f"expert-{e}"]
        seen = {int(k): v for k, v in m["samples_seen_by_cluster"].items()}
        assert m["passes"] == 2
        assert seen[e] == 2 * per_expert[str(e)]  # its whole partition, every pass
        others = sum(v for k, v in seen.items() if k != e)
        expected = 2 * cfg.training.ooc_ratio * (prep["in_manifest"] - per_expert[str(e)])
        assert 0 < others <= 4 * expected + 5  # the out-of-cluster share, redrawn each pass, and nothing more
        assert m["start_step"] == seed["end_step"]  # continues the seed's schedule position
    generalist = models["generalist"]
    assert generalist["samples_seen"] == 2 * prep["in_manifest"]
    compute = summary["compute_samples"]
    assert compute["mode_total"] == seed["samples_seen"] + sum(models[f"expert-{e}"]["samples_seen"] for e in (0, 1))


def _clip_loss_on(cfg, model_name: str, expert: int | None) -> float:
    """Mean CLIP loss of a trained model on its own data (eval transform, fixed batches): deterministic."""
    import pyarrow.dataset as pads
    from open_clip.loss import ClipLoss

    from mode_ray.models.clip import build_clip

    table = pads.dataset(f"{cfg.run_root}/manifest", format="parquet", partitioning="hive").to_table(
        columns=["image", "caption", "coarse_id"]
    )
    rows = [r for r in table.to_pylist() if expert is None or int(r["coarse_id"]) == expert]
    model, _, _, _ = build_clip("mode-tiny")
    model.load_state_dict(torch.load(Path(experts_dir(cfg, model_name)) / "state.pt", weights_only=False)["model"])
    model.eval()
    losses = []
    with torch.no_grad():
        for i in range(0, len(rows) - BATCH + 1, BATCH):
            chunk = rows[i : i + BATCH]
            data = clip_inputs(
                [r["image"] for r in chunk], [r["caption"] for r in chunk], [0] * len(chunk), "mode-tiny", False
            )
            img, txt, scale = model(torch.from_numpy(data["image"]), torch.from_numpy(data["text"]))
            losses.append(float(ClipLoss()(img, txt, scale)))
    return float(np.mean(losses))


def test_loss_goes_down_for_every_model(trained):
    cfg, _, summary = trained
    seed_history = summary["models"]["seed"]["loss_history"]
    assert seed_history[-1] < seed_history[0]
    # Experts and the generalist start from the seed: on their own data they must end below it.
    for name, expert in (("expert-0", 0), ("expert-1", 1), ("generalist", None)):
        after, before = _clip_loss_on(cfg, name, expert), _clip_loss_on(cfg, "seed", expert)
        assert after < before, (name, before, after)


def test_experts_resume_seed_optimizer_state(trained):
    cfg, _, summary = trained
    seed_end = summary["models"]["seed"]["end_step"]
    blob = torch.load(Path(experts_dir(cfg, "expert-0")) / "state.pt", weights_only=False)
    adam_steps = {int(s["step"]) for s in blob["optimizer"]["state"].values()}
    # AdamW's per-parameter step counts carry on from the seed's, not from zero.
    assert adam_steps == {blob["state"]["step"]} and blob["state"]["step"] > seed_end


def test_export_loads_in_stock_open_clip_with_same_embeddings(trained):
    import open_clip

    from mode_ray.models.clip import build_clip

    cfg, _, _ = trained
    export = Path(experts_dir(cfg, "expert-1")) / "export"
    open_clip.add_model_config(export / "mode-tiny.json")
    stock, _, preprocess = open_clip.create_model_and_transforms(
        "mode-tiny", pretrained=str(export / "open_clip_model.pt")
    )
    ours, _, _, tokenizer = build_clip("mode-tiny")
    ours.load_state_dict(torch.load(Path(experts_dir(cfg, "expert-1")) / "state.pt", weights_only=False)["model"])
    stock.eval(), ours.eval()
    images = torch.randn(3, 3, 32, 32)
    texts = tokenizer(["a handwritten digit", "a red circle", "the letter K"])
    with torch.no_grad():
        torch.testing.assert_close(stock.encode_image(images), ours.encode_image(images))
        torch.testing.assert_close(stock.encode_text(texts), ours.encode_text(texts))


def test_failed_worker_recovered_and_rerun_trains_nothing(trained, capsys):
    cfg, _, summary = trained
    assert os.path.exists(failure_marker_path(cfg, "generalist"))  # the injected failure did fire ...
    assert summary["models"]["generalist"]["passes"] == 2  # ... and the trial still finished its schedule
    markers = sorted(Path(experts_dir(cfg)).rglob("_SUCCESS"))
    before = [m.read_text() for m in markers]
    again = run_train(cfg)
    assert [m.read_text() for m in markers] == before
    assert again["models"] == summary["models"]
    assert "all models complete" in capsys.readouterr().err
    assert read_json(str(Path(experts_dir(cfg)) / "summary.json")) == again


def test_lr_schedule_continues_across_the_seed_boundary():
    base, warmup, total = 1e-3, 10, 4.0
    assert lr_at(0, 0.0, base, warmup, total) == pytest.approx(base / warmup)
    assert lr_at(10, 0.0, base, warmup, total) == pytest.approx(base)
    mid = lr_at(100, 2.0, base, warmup, total)
    assert mid == pytest.approx(base / 2)  # half way through the cosine, whoever continues it
    assert lr_at(200, 4.0, base, warmup, total) == pytest.approx(0.0, abs=1e-12)


def test_undecodable_training_image_is_flagged_not_fatal():
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (40, 40), (200, 10, 10)).save(buf, format="JPEG")
    out = clip_inputs([buf.getvalue(), b"not an image", None], ["a", "b", "c"], [0, 1, 1], "mode-tiny")
    assert out["ok"].tolist() == [True, False, False]
    assert out["image"].shape == (3, 3, 32, 32) and np.abs(out["image"][0]).sum() > 0
    assert out["text"].shape == (3, 32) and out["coarse_id"].tolist() == [0, 1, 1]
