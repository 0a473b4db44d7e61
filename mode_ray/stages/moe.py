"""CLIP-MoE (DESIGN §4): MCL stages, upcycling and router fine-tuning, as Ray Train runs launched as Tune trials.

    base (a dense CLIP: the run's generalist by default, or any stock-open_clip export)
    for s in 1..N-1:  embed every training pair, image and caption, with stage s-1's model (Ray Data actor pool)
                      → k-means each modality (faiss), labels accumulated over stages
                      → cluster-homogeneous global batches (mode_ray.train.sampler)
                      → a Train run fine-tunes only the MLPs from the base, fixed temperature   = moe/stage-s
    upcycle: every block's MLP → a top-k MoE of the N stage MLPs (stage 0 = the base's)
    router fine-tuning: only the routers train, CLIP + load-balancing loss                          = moe/router
    → moe/model (state dict + JSON config; `mode_ray.models.load_model`) and moe/summary.json

Stages are sequential by the method (stage s clusters with stage s-1's model). Every job runs through the same
trial function and training loop as the data experts (`mode_ray.stages.train.run_phase`), so it is resumable
the same way: a stage whose `_SUCCESS` matches its settings is never redone, an interrupted one resumes from its
Train run's checkpoints or its Tune experiment.
"""

from __future__ import annotations

import io
import json
from dataclasses import asdict
from typing import Any

import numpy as np

from mode_ray.config import Config, without_added_neutral
from mode_ray.layout import MOE, RunPaths
from mode_ray.models.card import write_card
from mode_ray.models.clip import export_info
from mode_ray.models.pretrained import is_identifier, resolve_pretrained
from mode_ray.ownership import claim, claim_run_root
from mode_ray.progress import console, stage_log
from mode_ray.storage import (
    exists,
    join,
    read_bytes,
    read_json,
    settings_hash,
    stage_done,
    write_bytes,
    write_json,
)
from mode_ray.train.schedule import Job, Schedule
from mode_ray.train.transforms import input_spec

ROUTER = "router"
ROUTER_FIELDS = {
    "top_k",
    "towers",
    "router_epochs",
    "router_lr",
    "router_weight_decay",
    "router_warmup_steps",
    "router_label_smoothing",
    "router_temperature",
    "expert_dropout",
    "balance_coef",
    "balance_counts",
    "balance_form",
    "balance_text_weight",
}


def stage_name(stage: int) -> str:
    return f"stage-{stage}"


# --------------------------------------------------------------------------- the base model


def resolve_base(cfg: Config) -> tuple[str, str, dict[str, Any]]:
    """(export URL, identity for the settings hash, training compute behind it) of `moe.base`."""
    paths, s3, base = RunPaths(cfg.run_root), cfg.data.s3, cfg.moe.base
    if not is_identifier(base):  # a model of this run
        marker = join(paths.experts(base), "_SUCCESS")
        if not exists(marker, s3):
            raise ValueError(
                f"moe.base is {base!r}, but {paths.experts(base)} holds no finished model: run `mode-ray train` "
                "first, or set moe.base to a trained model of this run or to an open_clip export folder"
            )
        compute = {}
        if exists(paths.experts_summary, s3):
            compute = read_json(paths.experts_summary, s3)["compute"].get(base, {})
        return paths.export(base), read_bytes(marker, s3).decode(), compute
    folder = resolve_pretrained(base, cfg.run_root, s3)  # local-dir:, hf-hub:, ARCH:TAG|FILE or a folder
    try:
        export_info(folder, s3)
    except FileNotFoundError as err:
        raise ValueError(f"moe.base {base!r} is not an open_clip export folder: {err}") from None
    return folder, base, {}


def export_config(export_url: str, cfg: Config) -> tuple[str, dict[str, Any]]:
    """(model name, open_clip config) of an export folder."""
    return export_info(export_url, cfg.data.s3)


# --------------------------------------------------------------------------- embedding and clustering


class PairEmbedder:
    """Ray Data actor: a dense CLIP loaded once; row groups in → normalised image and text embeddings of their
    training rows out, with where each row lives (to read it back in a planned order)."""

    def __init__(self, model_url: str, source: Any, holdout: float, s3: dict[str, Any]) -> None:
        import torch

        from mode_ray.config import S3Config
        from mode_ray.models import load_model

        torch.set_num_threads(1)
        self.model = load_model(model_url, S3Config(**s3))[0]
        self.source, self.holdout = source, holdout

    def __call__(self, items: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch
        import torch.nn.functional as F

        from mode_ray.stages.train_data import _inputs, locate_rows
        from mode_ray.train.transforms import augment

        where, table = locate_rows(items, self.source, self.holdout)
        inputs = _inputs(table, self.source)
        images, texts = [], []
        with torch.no_grad():
            for i in range(0, len(table), 256):
                pixels = torch.from_numpy(np.array(inputs["pixels"][i : i + 256]))
                images.append(F.normalize(self.model.encode_image(augment(pixels, self.source.model, train=False))))
                tokens = torch.from_numpy(np.array(inputs["text"][i : i + 256])).long()
                texts.append(F.normalize(self.model.encode_text(tokens)))
        return {
            **where,
            "key": np.asarray(table["key"].to_pylist()),
            "coarse_id": inputs["coarse_id"],
            "ok": np.asarray(inputs["ok"], dtype=bool),
            "image": torch.cat(images).numpy().astype(np.float32),
            "text": torch.cat(texts).numpy().astype(np.float32),
        }


def embed_pairs(cfg: Config, model_url: str) -> dict[str, np.ndarray]:
    """Every training row (hold-out excluded), embedded by `model_url`, in a fixed order (path, group, row)."""
    import ray

    from mode_ray.stages.train_data import holdout_fraction, input_cache_dir, make_source, row_groups

    t = cfg.training
    root = input_cache_dir(cfg) if t.decode_cache else RunPaths(cfg.run_root).manifest
    source = make_source(cfg, root, t.decode_cache, input_spec(t.model))
    groups = row_groups(root, cfg.data.s3)
    holdout = holdout_fraction(cfg, sum(g["rows"] for g in groups))
    ds = ray.data.from_items(groups, override_num_blocks=max(1, len(groups) // 8)).map_batches(
        PairEmbedder,
        fn_constructor_kwargs={
            "model_url": model_url,
            "source": source,
            "holdout": holdout,
            "s3": cfg.data.s3.model_dump(),
        },
        batch_size=8,
        batch_format="numpy",
        num_cpus=1,
        compute=ray.data.ActorPoolStrategy(size=1),
    )
    parts: dict[str, list[np.ndarray]] = {}
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):  # seconds: no bar of its own
        for name, values in batch.items():
            parts.setdefault(name, []).append(values)
    rows = {name: np.concatenate(values) for name, values in parts.items()}
    order = np.lexsort((rows["row"], rows["row_group"], rows["path"]))
    return {name: values[order] for name, values in rows.items()}


def write_plan(url: str, rows: dict[str, np.ndarray], ranks: dict[int, np.ndarray], cfg: Config) -> None:
    buf = io.BytesIO()
    np.savez(
        buf,
        path=rows["path"].astype(str),
        row_group=rows["row_group"],
        row=rows["row"],
        coarse_id=rows["coarse_id"],
        **{f"rank{r}": ids for r, ids in ranks.items()},
    )
    write_bytes(url, buf.getvalue(), cfg.data.s3)


# --------------------------------------------------------------------------- the stages


def stage_settings(cfg: Config, base_id: str, stage: int, previous: str) -> str:
    moe = without_added_neutral(cfg.moe.model_dump(mode="json", exclude=ROUTER_FIELDS | {"stages", "base"}))
    t = cfg.training
    training = (t.model, t.batch_size, t.num_workers, t.holdout_fraction, t.decode_cache, t.seed, t.precision)
    return settings_hash(moe, training, base_id, stage, previous)


def previous_labels(cfg: Config, stage: int, keys: np.ndarray) -> np.ndarray | None:
    """The accumulated labels stage `stage` - 1 ended with, aligned to `keys`."""
    if stage == 1:
        return None
    with np.load(
        io.BytesIO(read_bytes(join(RunPaths(cfg.run_root).moe(stage_name(stage - 1)), "labels.npz"), cfg.data.s3))
    ) as data:
        if not np.array_equal(data["key"], keys.astype(str)):
            raise RuntimeError(f"MCL stage {stage - 1}'s labels were made on other rows: rerun with --force")
        return data["acc"]


def prepare_stage(cfg: Config, stage: int, model_url: str, seed: int) -> dict[str, Any]:
    """Embed with the previous stage's model, cluster, plan the batches; returns the stage's task and facts."""
    from mode_ray.cluster import mcl_stage_labels
    from mode_ray.train.sampler import epoch_steps, homogeneous_batches

    moe, t = cfg.moe, cfg.training
    out = RunPaths(cfg.run_root).moe(stage_name(stage))
    claim(out, f"MCL {stage_name(stage)}", cfg.data.s3)  # before its plan: the stage's job trains into it
    rows = embed_pairs(cfg, model_url)
    skipped_images = int((~rows["ok"]).sum())
    rows = {name: values[rows["ok"]] for name, values in rows.items()}
    previous = previous_labels(cfg, stage, rows["key"])
    label, acc = mcl_stage_labels(rows["image"], rows["text"], moe.image_clusters, moe.text_clusters, previous, seed)
    buf = io.BytesIO()
    np.savez(buf, key=rows["key"].astype(str), label=label, acc=acc)
    write_bytes(join(out, "labels.npz"), buf.getvalue(), cfg.data.s3)
    steps = epoch_steps(acc, t.batch_size, moe.stage_epochs, moe.mcl_last_batch)
    plan = homogeneous_batches(acc, t.batch_size, steps, t.num_workers, seed, moe.mcl_last_batch, moe.mcl_batch_order)
    ranks = {r: plan.rank_rows(r, t.num_workers) for r in range(t.num_workers)}
    write_plan(join(out, "plan.npz"), rows, ranks, cfg)
    values, counts = np.unique(acc, return_counts=True)
    facts = {
        "stage": stage,
        "rows": len(acc),
        "clusters": {str(v): int(c) for v, c in zip(values, counts, strict=True)},
        "small_clusters": {str(k): v for k, v in plan.small_clusters.items()},
        "rows_in_small_clusters": plan.skipped_rows,
        "rows_repeated_to_fill_batches": plan.filled,
        "rows_dropped_by_truncation": plan.dropped,
        "skipped_images": skipped_images,
        "steps": steps,
    }
    write_json(join(out, "plan.json"), facts, cfg.data.s3)
    return facts


def mcl_task(cfg: Config, stage: int, base_url: str, steps: int) -> dict[str, Any]:
    moe, t = cfg.moe, cfg.training
    out = RunPaths(cfg.run_root).moe(stage_name(stage))
    return {
        "plan": join(out, "plan.npz"),
        "ranks": {str(r): steps * (t.batch_size // t.num_workers) for r in range(t.num_workers)},
        "out_dir": out,
        "loop": {
            "lr": moe.lr,
            "weight_decay": moe.weight_decay,
            "trainable": "mlp",
            "init_export": base_url,
            "fixed_temperature": moe.temperature,
            "label_smoothing": moe.label_smoothing,
            "optimizer": moe.optimizer,
            "per_rank_data": True,
            "shuffle_buffer": 0,  # the plan's order is the point
        },
    }


def router_task(cfg: Config, stage_urls: list[str]) -> dict[str, Any]:
    from mode_ray.models.moe import MoESpec

    moe = cfg.moe
    name, config = export_config(stage_urls[0], cfg)
    spec = MoESpec(name, config, n_experts=len(stage_urls), top_k=moe.top_k, towers=list(moe.towers))
    spec.expert_dropout = moe.expert_dropout
    paths = RunPaths(cfg.run_root)
    return {
        "out_dir": paths.moe(ROUTER),
        "loop": {
            "lr": moe.router_lr,
            "weight_decay": moe.router_weight_decay,
            "trainable": "router",
            "optimizer": moe.optimizer,
            "label_smoothing": moe.router_label_smoothing,
            "fixed_temperature": moe.router_temperature,
            "moe": {"stages": stage_urls, "spec": asdict(spec)},
            "balance": {
                "coef": moe.balance_coef,
                "counts": moe.balance_counts,
                "text_weight": moe.balance_text_weight,
                "form": moe.balance_form,
            },
            "export_dir": paths.export(MOE),
        },
    }


def _shared(schedule: Schedule, samples_per_epoch: float) -> dict[str, Any]:
    return {"schedule": asdict(schedule), "samples_per_epoch": samples_per_epoch}


def run_moe(cfg: Config, force: bool = False) -> dict[str, Any]:
    """MCL stages 1..N-1, then router fine-tuning of the upcycled MoE; skips whatever is complete."""
    from mode_ray.runtime import ray_runtime
    from mode_ray.stages.train import run_phase  # the trial machinery the data experts train with
    from mode_ray.stages.train_data import build_input_cache

    paths, s3, moe, t = RunPaths(cfg.run_root), cfg.data.s3, cfg.moe, cfg.training
    after_warmup = moe.lr_decay == "after_warmup"
    claim_run_root(cfg.run_root, s3)
    if not exists(paths.prep_summary, s3):
        raise ValueError(f"no prep output under {cfg.run_root}: run `mode-ray prep` first")
    base_url, base_id, base_compute = resolve_base(cfg)
    _, base_config = export_config(base_url, cfg)
    if base_config["vision_cfg"]["image_size"] != input_spec(t.model).size:
        raise ValueError(f"moe.base's image size differs from training.model {t.model!r}, whose inputs the run decoded")
    manifest_run = read_json(paths.prep_summary, s3).get("manifest_run_id", "")
    stage_urls, previous, stages = [base_url], base_id, []
    with ray_runtime(cfg):
        if t.decode_cache:
            build_input_cache(cfg, manifest_run)
        for stage in range(1, moe.stages):
            name, out = stage_name(stage), paths.moe(stage_name(stage))
            settings = stage_settings(cfg, base_id, stage, previous)
            job_name = f"moe-{name}"
            with stage_log(f"moe: MCL {name}") as log:
                if not force and stage_done(out, settings, s3):
                    log.skip(f"moe/{name} complete")
                else:
                    facts = prepare_stage(cfg, stage, stage_urls[-1], t.seed + stage)
                    log.info(
                        f"{facts['rows']:,} pairs in {len(facts['clusters'])} accumulated clusters; "
                        f"{facts['rows_in_small_clusters']} pairs in {len(facts['small_clusters'])} clusters "
                        f"smaller than a batch of {t.batch_size} (not trained on); {facts['steps']} steps"
                    )
                    job = Job(job_name, None, 0, facts["steps"], 1.0, False)
                    schedule = Schedule(moe.lr, moe.warmup_steps, facts["steps"], 0, after_warmup)
                    shared = _shared(schedule, facts["steps"] * t.batch_size / moe.stage_epochs)
                    task = mcl_task(cfg, stage, base_url, facts["steps"])
                    run_phase(cfg, f"moe-{name}", [job], {job_name: settings}, force, shared, {job_name: task})
                    log.done(f"MLPs fine-tuned on cluster-homogeneous batches → {out}")
            stages.append({**read_json(join(out, "plan.json"), s3), **_metrics(out, cfg)})
            stage_urls.append(join(out, "export"))
            previous = settings
        router_settings = settings_hash(
            without_added_neutral(cfg.moe.model_dump(mode="json")),
            stage_urls,
            previous,
            without_added_neutral(t.model_dump(mode="json")),
        )
        router_out = paths.moe(ROUTER)
        with stage_log("moe: router fine-tuning") as log:
            if not force and stage_done(router_out, router_settings, s3):
                log.skip("moe/router complete")
            else:
                from mode_ray.stages.train import samples_per_epoch

                spe = samples_per_epoch(cfg, read_json(paths.prep_summary, s3)["in_manifest"])
                steps = max(1, round(moe.router_epochs * spe / t.batch_size))
                job = Job(f"moe-{ROUTER}", None, 0, steps, 1.0, False)
                schedule = Schedule(moe.router_lr, moe.router_warmup_steps, steps, 0, after_warmup)
                shared = _shared(schedule, spe)
                run_phase(
                    cfg,
                    "moe-router",
                    [job],
                    {job.name: router_settings},
                    force,
                    shared,
                    {job.name: router_task(cfg, stage_urls)},
                )
                log.done(f"{moe.stages} experts a layer, top-{moe.top_k} → {paths.export(MOE)}")
    router = _metrics(router_out, cfg)
    summary = moe_summary(cfg, base_url, base_compute, stages, router)
    write_json(paths.moe_summary, summary, s3)
    write_card(cfg, MOE)
    print_moe_summary(summary)
    return summary


def run_moe_if_enabled(cfg: Config, force: bool = False) -> dict[str, Any] | None:
    """`mode-ray run`'s CLIP-MoE stage: `moe.enabled: false` leaves it out."""
    if not cfg.moe.enabled:
        console.print("[yellow]↷ moe[/yellow] skipped: moe.enabled is false")
        return None
    return run_moe(cfg, force)


def _metrics(out: str, cfg: Config) -> dict[str, Any]:
    m = read_json(join(out, "metrics.json"), cfg.data.s3)
    losses = [p["loss"] for p in m["loss_history"]]
    return {
        "steps": m["steps"],
        "samples_seen": m["samples_seen"],
        "loss_first": losses[0] if losses else None,
        "loss_last": losses[-1] if losses else None,
        "val_history": m["val_history"],
        "timing": m["timing"],
    }


def moe_summary(
    cfg: Config, base_url: str, base_compute: dict[str, Any], stages: list[dict[str, Any]], router: dict[str, Any]
) -> dict[str, Any]:
    """What was built and what it cost: the base's own training compute plus every MCL stage and the router."""
    parts = [*stages, router]
    compute = {
        "samples": base_compute.get("samples", 0) + sum(p["samples_seen"] for p in parts),
        "train_seconds": base_compute.get("train_seconds", 0.0) + sum(p["timing"]["compute"] for p in parts),
        "trial_seconds": base_compute.get("trial_seconds", 0.0) + sum(p["timing"]["trial"] for p in parts),
        "moe_samples": sum(p["samples_seen"] for p in parts),
        "base_compute_known": bool(base_compute),
    }
    spec = json.loads(read_bytes(join(RunPaths(cfg.run_root).export(MOE), "moe_config.json"), cfg.data.s3))
    spec.pop("open_clip_config", None)
    return {
        "base": cfg.moe.base,
        "base_export": base_url,
        "spec": spec,
        "stages": stages,
        "router": router,
        "compute": compute,
    }


def print_moe_summary(summary: dict[str, Any]) -> None:
    from rich.table import Table

    table = Table(title=f"CLIP-MoE from {summary['base']}")
    for col in ("job", "steps", "samples", "loss first → last", "held-out loss", "trial s", "learning s"):
        table.add_column(col)
    for name, part in [*((stage_name(s["stage"]), s) for s in summary["stages"]), (ROUTER, summary["router"])]:
        val = part["val_history"][-1]["all"]["loss"] if part["val_history"] else None
        table.add_row(
            name,
            str(part["steps"]),
            str(part["samples_seen"]),
            f"{part['loss_first']:.3f} → {part['loss_last']:.3f}" if part["loss_first"] is not None else "-",
            f"{val:.3f}" if val is not None else "-",
            f"{part['timing']['trial']:.1f}",
            f"{part['timing']['compute']:.1f}",
        )
    console.print(table)
    c = summary["compute"]
    console.print(f"MoE compute: {c['samples']:,} samples (base included), {c['moe_samples']:,} of them for the MoE")
