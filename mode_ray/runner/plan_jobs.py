"""Every training job of a run, planned from its config as typed `TrainJob`s (Ray-free): the seed, the data
experts and generalists continuing it, CLIP-MoE's MCL stages and router, and the experts `add-data` adds.
`mode_ray.runner.dag` runs them; nothing here trains or reads data but the prep summary's counts.

    seed ──▶ expert-e, generalist, generalist-matched            (MoDE: each continues the seed)
    base ──▶ stage-1 ──▶ stage-2 ──▶ … ──▶ router                (CLIP-MoE: base = a model of the run or an
      └──────────┴───────────┴──────────▶ router                   export from elsewhere)
"""

from __future__ import annotations

from dataclasses import dataclass

from mode_ray.config import Config, OptimConfig
from mode_ray.data.mcl_plan import stage_name
from mode_ray.run_root.layout import MOE, STATE_FILE, RunPaths
from mode_ray.run_root.names import SEED
from mode_ray.run_root.storage import join
from mode_ray.train.job import (
    Balance,
    Data,
    Inputs,
    Loss,
    McLPlan,
    Optimizer,
    Paths,
    Start,
    TrainJob,
    Upcycle,
)
from mode_ray.train.schedule import Plan, Schedule, Span, plan_training

ROUTER = "router"


def inputs_of(cfg: Config, manifest_run: str) -> Inputs:
    t = cfg.training
    return Inputs(
        model=t.model,
        batch_size=t.batch_size,
        precision=t.precision,
        grad_accum_steps=t.grad_accum_steps,
        seed=t.seed,
        shuffle_buffer=t.shuffle_buffer,
        holdout_fraction=t.holdout_fraction,
        holdout_max_rows=t.holdout_max_rows,
        decode_cache=t.decode_cache,
        caption_draw=t.caption_draw,
        manifest=manifest_run,
    )


def samples_per_epoch(cfg: Config, manifest_rows: int) -> int:
    """The configured epoch, or the manifest's training rows (the hold-out never trains)."""
    from mode_ray.data.train_data import holdout_fraction

    if cfg.training.samples_per_epoch:
        return cfg.training.samples_per_epoch
    return max(1, round(manifest_rows * (1 - holdout_fraction(cfg, manifest_rows))))


def optim(block: OptimConfig, total_steps: int = 0, tail_start: int = 0) -> tuple[Optimizer, Schedule]:
    """The job's optimizer and learning-rate schedule from its config block, field for field: one helper for
    every job kind (models: `training`; MCL stages: `moe.mcl_optim`; router: `moe.router_optim`)."""
    optimizer = Optimizer(block.kind, block.weight_decay, block.betas, block.eps, block.grad_clip_norm)
    after_warmup = block.lr_decay == "after_warmup"
    return optimizer, Schedule(block.lr, block.warmup_steps, total_steps, tail_start, after_warmup)


def make_plan(cfg: Config, per_expert: dict[str, int]) -> Plan:
    t = cfg.training
    _, lr = optim(t)  # training's learning-rate curve; the plan counts its steps
    return plan_training(
        epochs=t.epochs,
        seed_fraction=t.seed_fraction,
        samples_per_epoch=samples_per_epoch(cfg, sum(per_expert.values())),
        batch_size=t.batch_size,
        base_lr=lr.base_lr,
        warmup_steps=lr.warmup_steps,
        per_expert=per_expert,
        n_coarse=cfg.clustering.n_coarse,
        use_seed=t.use_seed,
        matched_control=t.matched_control,
        decay_after_warmup=lr.decay_after_warmup,
    )


def model_job(cfg: Config, span: Span, schedule: Schedule, inputs: Inputs, init: str | None) -> TrainJob:
    """A dense model of the run: the seed (random or `training.init`), or a tail continuing the seed."""
    t, paths = cfg.training, RunPaths(cfg.run_root)
    if span.init_from_seed:
        start, parents, urls = Start("resume"), (SEED,), (join(paths.experts(SEED), STATE_FILE),)
    elif init:
        start, parents, urls = Start("weights", identity=t.init), (), (init,)
    else:
        start, parents, urls = Start("random"), (), ()
    data = Data("all") if span.expert is None else Data("partition", span.expert, t.ooc_ratio)
    optimizer, _ = optim(t)  # the schedule is the plan's: training's curve over the run's steps (`make_plan`)
    return TrainJob(
        name=span.name,
        role="model",
        parents=parents,
        start=start,
        data=data,
        trainable="all",
        schedule=schedule,
        first_step=span.start_step,
        end_step=span.end_step,
        stretch=span.stretch,
        optimizer=optimizer,
        loss=Loss(),
        inputs=inputs,
        paths=Paths(paths.experts(span.name), paths.export(span.name), urls),
    )


def training_jobs(cfg: Config, plan: Plan, inputs: Inputs, init: str | None) -> list[TrainJob]:
    """The seed (when there is one) and every tail: experts, generalist, generalist-matched."""
    spans = ([plan.seed] if plan.seed else []) + plan.tails
    return [model_job(cfg, span, plan.schedule, inputs, init) for span in spans]


@dataclass(frozen=True)
class MoEBase:
    """The dense CLIP the MoE upcycles: a model of the run (`job`: its name) or an export from elsewhere."""

    url: str  # its export folder
    job: str | None = None
    identity: str | None = None  # how an outside export is named (moe.base)


def mcl_job(cfg: Config, base: MoEBase, inputs: Inputs, stage: int) -> TrainJob:
    """MCL stage `stage`: the base's MLPs fine-tuned on batches clustered by stage `stage - 1`'s model."""
    moe, paths = cfg.moe, RunPaths(cfg.run_root)
    previous = stage_name(stage - 1)
    out = paths.moe(stage_name(stage))
    optimizer, schedule = optim(moe.mcl_optim)  # its steps are planned with its data (`TrainJob.with_steps`)
    plan = McLPlan(
        stage,
        moe.image_clusters,
        moe.text_clusters,
        moe.stage_epochs,
        moe.mcl_last_batch,
        moe.mcl_batch_order,
        moe.cluster_sample_rows,
    )
    return TrainJob(
        name=f"moe-{stage_name(stage)}",
        role="mcl",
        parents=((base.job,) if base.job else ()) + ((f"moe-{previous}",) if stage > 1 else ()),
        start=Start("weights", identity=base.identity),
        data=Data("mcl", mcl=plan),
        trainable="mlp",
        schedule=schedule,
        first_step=0,
        end_step=None,
        stretch=1.0,
        optimizer=optimizer,
        loss=Loss(moe.label_smoothing, moe.temperature),
        inputs=inputs,
        paths=Paths(
            out, join(out, "export"), (base.url,), join(paths.moe(previous), "export") if stage > 1 else base.url
        ),
    )


def router_job(cfg: Config, base: MoEBase, inputs: Inputs, stages: list[TrainJob], spe: int) -> TrainJob:
    """Router fine-tuning of the MoE upcycled from the base and every MCL stage's MLPs."""
    moe, paths = cfg.moe, RunPaths(cfg.run_root)
    steps = max(1, round(moe.router_epochs * spe / inputs.batch_size))
    optimizer, schedule = optim(moe.router_optim, steps)
    balance = Balance(moe.balance_coef, moe.balance_counts, moe.balance_text_weight, moe.balance_form)
    return TrainJob(
        name=f"moe-{ROUTER}",
        role="router",
        parents=((base.job,) if base.job else ()) + tuple(s.name for s in stages),
        start=Start("upcycle", identity=base.identity),
        data=Data("all"),
        trainable="router",
        schedule=schedule,
        first_step=0,
        end_step=steps,
        stretch=1.0,
        optimizer=optimizer,
        loss=Loss(moe.router_label_smoothing, moe.router_temperature, balance),
        inputs=inputs,
        paths=Paths(paths.moe(ROUTER), paths.export(MOE), (base.url, *(s.paths.export_dir for s in stages))),
        upcycle=Upcycle(moe.stages, moe.top_k, tuple(moe.towers), moe.expert_dropout),
    )


def moe_jobs(cfg: Config, base: MoEBase, inputs: Inputs, spe: int) -> list[TrainJob]:
    """MCL stages 1..N-1 (stage 0 is the base), then the router."""
    stages = [mcl_job(cfg, base, inputs, s) for s in range(1, cfg.moe.stages)]
    return [*stages, router_job(cfg, base, inputs, stages, spe)]
