"""Where mode_ray can compute what the references compute: each formula pinned against a transcription of
the reference's own lines (cited per test; transcribed as arithmetic, not copied), under `preset: reference`."""

from __future__ import annotations

import math

import pytest
import torch

from mode_ray.config import Config
from mode_ray.train.schedule import Schedule


def _reference_cosine_lr(base_lr: float, warmup: int, total: int, step: int) -> float:
    """open_clip's `cosine_lr` (src/open_clip_train/scheduler.py), which MetaCLIP's training (apps/mode) and
    CLIP-MoE's train scripts call: linear warmup (step + 1) / warmup, then a half cosine over the steps after
    warmup: 0.5 · (1 + cos(π · (step − warmup) / (total − warmup))) · base."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup))) * base_lr


@pytest.mark.parametrize(("warmup", "total"), [(200, 1250), (10, 64), (2000, 40000)])
def test_cosine_after_warmup_is_the_references_schedule(warmup: int, total: int) -> None:
    ours = Schedule(1e-5, warmup, total, 0, decay_after_warmup=True)
    for step in sorted({0, 1, warmup - 1, warmup, warmup + 1, total // 2, total - 2, total - 1}):
        assert ours.lr(step) == pytest.approx(_reference_cosine_lr(1e-5, warmup, total, step), rel=1e-12, abs=0)
    # today's default decays over the whole schedule: below the reference's rate after warmup, as documented
    default = Schedule(1e-5, warmup, total, 0)
    mid = warmup + (total - warmup) // 2
    assert default.lr(mid) < ours.lr(mid)


def _config(*sets: str) -> Config:
    from mode_ray.config import load_config
    from tests.conftest import REPO

    return load_config(REPO / "configs/demo.yaml", list(sets))


def test_the_reference_preset_sets_what_differs_and_an_explicit_setting_wins() -> None:
    reference = _config("preset=reference")
    assert reference.training.lr_decay == "after_warmup" and reference.moe.lr_decay == "after_warmup"
    m = reference.moe
    assert (m.router_label_smoothing, m.router_temperature, m.router_warmup_steps, m.optimizer) == (
        0.1,
        0.01,
        200,
        "reference",
    )
    today = _config()
    assert today.training.lr_decay == "whole_schedule" and today.moe.optimizer == "mode_ray"
    assert today.moe.router_temperature is None and today.moe.router_label_smoothing == 0.0
    mixed = _config("preset=reference", "moe.router_warmup_steps=5")
    assert mixed.moe.router_warmup_steps == 5 and mixed.moe.router_label_smoothing == 0.1


def test_router_stage_loss_under_the_preset_is_the_references() -> None:
    """CLIP-MoE's router fine-tuning (train/train_moe.py): logit scale fixed at 100, and the CLIP loss
    (cross-entropy both ways, averaged) with label smoothing 0.1."""
    from mode_ray.stages.moe import router_task
    from mode_ray.train.losses import SmoothedClipLoss

    loop = router_task_loop(router_task, _config("preset=reference"))
    assert loop["fixed_temperature"] == 0.01 and loop["label_smoothing"] == 0.1
    torch.manual_seed(0)
    image, text = (torch.nn.functional.normalize(torch.randn(8, 16), dim=-1) for _ in range(2))
    scale = torch.tensor(1 / loop["fixed_temperature"])
    logits = scale * image @ text.T
    labels = torch.arange(8)
    expected = (
        torch.nn.functional.cross_entropy(logits, labels, label_smoothing=0.1)
        + torch.nn.functional.cross_entropy(logits.T, labels, label_smoothing=0.1)
    ) / 2
    ours = SmoothedClipLoss(loop["label_smoothing"])(image, text, scale)
    torch.testing.assert_close(ours, expected, rtol=1e-6, atol=1e-7)


def router_task_loop(router_task, cfg: Config) -> dict:  # noqa: ANN001
    """The router job's loop settings, without the MCL stages it would upcycle (a tiny export stands in)."""
    import tempfile

    from mode_ray.models.clip import build_clip, export_open_clip

    model, *_ = build_clip("mode-tiny")
    with tempfile.TemporaryDirectory() as tmp:
        export_open_clip(model, "mode-tiny", tmp)
        return router_task(cfg, [tmp, tmp])["loop"]


def test_the_reference_optimizer_is_torch_adamw_defaults_with_decay_everywhere() -> None:
    """CLIP-MoE's train scripts build `torch.optim.AdamW(params, lr=…, weight_decay=…)`: β (0.9, 0.999),
    ε 1e-8, one group (every trainable parameter decays)."""
    from mode_ray.models.clip import build_clip
    from mode_ray.train.loop import make_optimizer

    model, *_ = build_clip("mode-tiny")
    base = {"lr": 1e-5, "weight_decay": 0.2, "betas": (0.9, 0.98), "eps": 1e-6}
    ours = make_optimizer(model, {**base, "optimizer": "reference"})
    reference = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.2)
    assert len(ours.param_groups) == 1
    for key in ("betas", "eps", "weight_decay", "lr"):
        assert ours.param_groups[0][key] == reference.param_groups[0][key]
    assert sum(p.numel() for p in ours.param_groups[0]["params"]) == sum(p.numel() for p in model.parameters())
    today = make_optimizer(model, base)  # open_clip's split: gains, biases and the logit scale do not decay
    assert [g["weight_decay"] for g in today.param_groups] == [0.0, 0.2] and today.param_groups[0]["betas"] == (
        0.9,
        0.98,
    )


def test_new_settings_at_their_defaults_leave_completion_hashes_as_they_were() -> None:
    """A run trained before these settings existed is not retrained after an upgrade: at their defaults they
    are not in what completion markers hash; at the reference's values they are."""
    from mode_ray.stages.moe import stage_settings

    today, reference = _config(), _config("preset=reference")
    assert "lr_decay" not in today.training.learning_settings()
    assert reference.training.learning_settings()["lr_decay"] == "after_warmup"
    assert "decay_after_warmup" not in Schedule(1e-3, 10, 100, 50).settings()
    assert stage_settings(today, "base", 1, "") != stage_settings(reference, "base", 1, "")
