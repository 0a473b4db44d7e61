"""One optimizer block (`OptimConfig`) for every job kind: training's flat keys, `moe.mcl_optim` and
`moe.router_optim`, each field one to one onto the planned job's `Optimizer`/`Schedule` (Ray-free: plans only)."""

from __future__ import annotations

from dataclasses import asdict, fields
from typing import Any

import pytest
import torch

from mode_ray.config import (
    MOVED_MOE_KEYS,
    Config,
    ConfigError,
    McLOptimConfig,
    OptimConfig,
    RouterOptimConfig,
    TrainingConfig,
    config_from_dict,
    load_config,
)
from mode_ray.train.job import Optimizer, TrainJob
from tests.conftest import REPO

# Every OptimConfig field: where it lands on a job, and a value no block has by default.
LANDS: dict[str, tuple[str, str, Any]] = {
    "kind": ("optimizer", "kind", "reference"),
    "lr": ("schedule", "base_lr", 0.0123),
    "weight_decay": ("optimizer", "weight_decay", 0.0456),
    "betas": ("optimizer", "betas", (0.81, 0.97)),
    "eps": ("optimizer", "eps", 3e-7),
    "warmup_steps": ("schedule", "warmup_steps", 7),
    "lr_decay": ("schedule", "decay_after_warmup", "after_warmup"),
    "grad_clip_norm": ("optimizer", "grad_clip_norm", 2.5),
}
BLOCKS = {"training": TrainingConfig, "moe.mcl_optim": McLOptimConfig, "moe.router_optim": RouterOptimConfig}
MODELS = {"seed", "expert-0", "expert-1", "generalist", "generalist-matched"}  # `training` plans these


def _config(*sets: str) -> Config:
    base = {"run_root": "/tmp/optim-plan", "data": {"shards": "/tmp/optim-plan/shards"}}
    return config_from_dict(
        base,
        [
            "clustering.n_coarse=2",
            "training.samples_per_epoch=1000",
            "training.batch_size=50",
            "training.matched_control=true",
            "moe.stages=3",
            *sets,
        ],
    )


def _jobs(cfg: Config) -> dict[str, list[TrainJob]]:
    """Every job kind a run plans, by the block that should drive it: the seed, both experts, generalist and
    generalist-matched (`train`), the experts `add-data` adds (their schedule read back from the run's
    summary, as `grow` does), the MCL stages and the router (`moe`)."""
    from mode_ray.runner.plan_jobs import MoEBase, inputs_of, make_plan, moe_jobs, training_jobs
    from mode_ray.stages.grow import _plan_from_summary, generation_jobs

    plan, inputs = make_plan(cfg, {"0": 500, "1": 500}), inputs_of(cfg, "manifest")
    models = training_jobs(cfg, plan, inputs, None)
    summary = {"schedule": asdict(plan.schedule), "samples_per_epoch": plan.samples_per_epoch, "batch_size": 50}
    added = generation_jobs(cfg, "gen-1", ["expert-2", "expert-3"], [], _plan_from_summary(summary), "manifest")
    *mcl, router = moe_jobs(cfg, MoEBase("/nowhere", job="generalist"), inputs, 1000)
    assert {j.name for j in models} == MODELS and [j.name for j in added] == ["expert-2", "expert-3"]
    assert [j.role for j in mcl] == ["mcl", "mcl"] and router.role == "router"
    return {"training": models + added, "moe.mcl_optim": mcl, "moe.router_optim": [router]}


def _landed(job: TrainJob, field: str) -> Any:
    where, attr, _ = LANDS[field]
    value = getattr(getattr(job, where), attr)
    return ("after_warmup" if value else "whole_schedule") if field == "lr_decay" else value


def test_every_optim_field_has_one_place_on_a_job() -> None:
    """One to one: each OptimConfig field lands on one Optimizer/Schedule field, and every Optimizer field and
    the schedule's learning-rate fields come from one (the learning rate is the schedule's alone)."""
    assert set(OptimConfig.model_fields) == set(LANDS)
    targets = {(where, attr) for where, attr, _ in LANDS.values()}
    assert {("optimizer", f.name) for f in fields(Optimizer)} | {
        ("schedule", "base_lr"),
        ("schedule", "warmup_steps"),
        ("schedule", "decay_after_warmup"),
    } == targets
    assert "lr" not in {f.name for f in fields(Optimizer)}
    for block in BLOCKS.values():  # training and both MoE blocks are OptimConfigs: the same knobs
        assert issubclass(block, OptimConfig) and set(LANDS) <= set(block.model_fields)


@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("field", LANDS)
def test_every_optim_setting_reaches_every_job_of_its_block(block: str, field: str) -> None:
    """Set in one block, a field reaches every job that block drives, and no job of another block."""
    value = LANDS[field][2]
    default_cfg = _config()
    assert value != getattr(BLOCKS[block](), field), "the test value must not be the block's default"
    shown = list(value) if isinstance(value, tuple) else value
    cfg = _config(f"{block}.{field}={shown}")
    planned, defaults = _jobs(cfg), _jobs(default_cfg)
    for name, jobs in planned.items():
        for job, default in zip(jobs, defaults[name], strict=True):
            expected = value if name == block else _landed(default, field)
            got = _landed(job, field)
            assert got == (tuple(expected) if isinstance(expected, list) else expected), (name, job.name, field)


def test_the_moe_blocks_defaults_are_todays() -> None:
    """MCL: lr 1e-5, decay 0.2, 200 warmup steps; router: lr 1e-6, decay 0.01, no warmup; both mode_ray's AdamW
    at training's default β/ε, a cosine over the whole schedule, and no gradient clipping (as the references)."""
    jobs = _jobs(_config())
    mcl, router = jobs["moe.mcl_optim"][0], jobs["moe.router_optim"][0]
    assert (mcl.schedule.base_lr, mcl.optimizer.weight_decay, mcl.schedule.warmup_steps) == (1e-5, 0.2, 200)
    assert (router.schedule.base_lr, router.optimizer.weight_decay, router.schedule.warmup_steps) == (1e-6, 0.01, 0)
    for job in (mcl, router):
        assert job.optimizer == Optimizer("mode_ray", job.optimizer.weight_decay, (0.9, 0.98), 1e-6, None)
        assert not job.schedule.decay_after_warmup
    seed = jobs["training"][0]
    assert seed.optimizer == Optimizer("mode_ray", 0.2, (0.9, 0.98), 1e-6, None) and seed.schedule.base_lr == 5e-4


def test_training_betas_no_longer_reach_the_moe() -> None:
    """The MoE blocks have their own β and ε: before them, MCL stages and the router took training's."""
    jobs = _jobs(_config("training.betas=[0.5, 0.6]", "training.eps=1e-3"))
    assert all(j.optimizer.betas == (0.5, 0.6) and j.optimizer.eps == 1e-3 for j in jobs["training"])
    for j in jobs["moe.mcl_optim"] + jobs["moe.router_optim"]:
        assert (j.optimizer.betas, j.optimizer.eps) == ((0.9, 0.98), 1e-6)


def _step(job: TrainJob, grad: list[float]) -> tuple[float, list[float]]:
    """The loop's optimizer step (`Trainer.optimizer_step`) on one parameter with gradient `grad`, under SGD at
    lr 1 so the update is the (clipped) gradient itself."""
    from mode_ray.train.loop import Trainer

    model = torch.nn.Module()
    model.weight = torch.nn.Parameter(torch.zeros(len(grad)))
    model.logit_scale = torch.nn.Parameter(torch.zeros(()))
    model.weight.grad = torch.tensor(grad)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    trainer = Trainer(job, model, opt, scaler, None, torch.device("cpu"), None)  # type: ignore[arg-type]
    norm = trainer.optimizer_step(1.0)
    return norm, (-model.weight.detach()).tolist()


@pytest.mark.parametrize("block", ["moe.mcl_optim", "moe.router_optim"])
def test_an_moe_job_with_grad_clip_norm_clips(block: str) -> None:
    """MoE jobs honour grad_clip_norm (their default, null, clips nothing, as the references)."""
    clipped = _jobs(_config(f"{block}.grad_clip_norm=5"))[block][0]
    free = _jobs(_config())[block][0]
    assert clipped.optimizer.grad_clip_norm == 5 and free.optimizer.grad_clip_norm is None
    norm, update = _step(clipped, [30.0, 40.0])
    assert norm == pytest.approx(50.0) and update == pytest.approx([3.0, 4.0], rel=1e-5)
    norm, update = _step(free, [30.0, 40.0])
    assert norm == pytest.approx(50.0) and update == pytest.approx([30.0, 40.0])


@pytest.mark.parametrize("old", MOVED_MOE_KEYS)
def test_the_old_moe_keys_fail_naming_the_new_key(old: str) -> None:
    value = "reference" if old == "optimizer" else "after_warmup" if old == "lr_decay" else 1
    with pytest.raises(ConfigError, match=f"moe.{old} is now {MOVED_MOE_KEYS[old]}"):
        _config(f"moe.{old}={value}")
    with pytest.raises(ConfigError, match=f"moe.{old} is now moe.(mcl|router)_optim"):
        load_config(REPO / "configs/demo.yaml", [f"moe.{old}={value}"])


def test_the_reference_preset_fills_the_moe_blocks() -> None:
    cfg = _config("preset=reference", "moe.mcl_optim.lr=0.001")
    assert cfg.moe.mcl_optim.lr == 0.001 and cfg.moe.mcl_optim.kind == "reference"
    assert cfg.moe.mcl_optim.lr_decay == cfg.moe.router_optim.lr_decay == "after_warmup"
    assert (cfg.moe.router_optim.kind, cfg.moe.router_optim.warmup_steps) == ("reference", 200)
    assert cfg.training.kind == "mode_ray"  # MoDE's reference trains with open_clip's AdamW


def test_a_jobs_hash_still_reads_its_learning_rate_where_the_optimizer_held_it() -> None:
    """`Optimizer` no longer carries the learning rate (the schedule does, and always did set it each step);
    the hash reads the base rate where it was, so a run finished before the change is not retrained."""
    from mode_ray.train.job import hashed_fields

    for jobs in _jobs(_config("moe.router_optim.lr=0.5")).values():
        for job in jobs:
            assert hashed_fields(job)["optimizer"]["lr"] == job.schedule.base_lr
