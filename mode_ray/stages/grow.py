"""`mode-ray add-data`: grow a trained MoDE system with data it has never seen — new experts for what its
clusters do not cover — without retraining or touching the experts it has (MoDE's continual claim).

    new shards ─▶ read + validate + embed (prep's own Ray Data path)  ─▶ generations/NAME/{embeddings,rejects}
               ─▶ score against the fine centres: below the run's coverage threshold = not covered
               ─▶ enough uncovered samples: two-step clustering of them → new fine centres → new coarse
                  clusters = new experts; clusters/centroids.npz gains them (the previous version is kept
                  under clusters/versions/); too few: they join their nearest expert, and the summary says so
               ─▶ assign every new sample to the grown centres  ─▶ generations/NAME/manifest (a new manifest
                  generation: the run's manifest is never rewritten)
               ─▶ train only the new experts, from the seed, on the seed's schedule, as Ray Train trials
               ─▶ experts/summary.json and experts/registry.json list them; eval and serve pick them up

The coverage threshold is calibrated on the run's own data: a low percentile (`continual.coverage_percentile`)
of the assignment scores of its manifest, stored with the centroids and reported. Samples the clusters cover
join their existing partition (in the new generation), for the next retraining of that expert: with
`--refresh-experts` (`continual.refresh_experts`) that is now: each grown expert's folder is first copied to
experts/versions/NAME-before-GEN/, then its own job (from the seed, its budget) runs again over its grown
partition, in the same DAG as the new experts. `mode-ray experts rollback NAME` puts the copy back.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mode_ray import kmeans
from mode_ray.config import Config
from mode_ray.console.progress import console, stage_log
from mode_ray.data.train_data import build_generation_caches, generation_roots
from mode_ray.run_root.compute import model_compute
from mode_ray.run_root.layout import RunPaths, centroid_geometry, read_centroids
from mode_ray.run_root.names import SEED, expert_id, expert_name
from mode_ray.run_root.ownership import claim, claim_run_root, remove_owned_tree
from mode_ray.run_root.registry import in_service, last_refresh, pop_refresh, record_added, record_refreshed
from mode_ray.run_root.storage import (
    MARKER,
    clear_marker,
    copy_tree,
    exists,
    join,
    mark_done,
    marker_info,
    parquet_dataset,
    read_bytes,
    read_json,
    settings_hash,
    stage_done,
    write_bytes,
    write_json,
)
from mode_ray.runner.dag import job_done, train_stage
from mode_ray.runner.plan_jobs import inputs_of, model_job
from mode_ray.samples.hash_sample import HashSample
from mode_ray.samples.rejects import only_valid
from mode_ray.stages.prep import (
    assign_stage,
    embed_stage,
    embeddings_to_numpy,
    print_summary,
    read_embeddings,
    summarise,
)
from mode_ray.stages.train import experts_dir
from mode_ray.train.job import TrainJob, job_hashes
from mode_ray.train.schedule import Plan, Schedule


def generation_paths(cfg: Config, name: str) -> RunPaths:
    return RunPaths(join(cfg.run_root, "generations", name))


def generation_config(cfg: Config, name: str, shards: str | list[str]) -> Config:
    """The run's config pointed at the generation: its own embeddings/rejects/manifest, the new shards."""
    data = cfg.data.model_copy(update={"shards": shards, "demo": None})
    return cfg.model_copy(update={"run_root": generation_paths(cfg, name).root, "data": data})


def coverage_threshold(cfg: Config, cents: dict[str, Any]) -> float:
    """The run's own low percentile of assignment scores (computed once, then read from the centroids)."""
    if "coverage_threshold" in cents:
        return float(cents["coverage_threshold"])
    manifest = RunPaths(cfg.run_root).manifest
    scores = parquet_dataset(manifest, cfg.data.s3).to_table(columns=["score"])["score"]
    return float(np.percentile(scores.to_numpy(), cfg.continual.coverage_percentile))


def _score_rows(batch: pa.Table, fine: np.ndarray, threshold: float, geometry: str) -> pa.Table:
    """Whether each valid row's best fine-centre score reaches the threshold; only uncovered rows keep their
    embedding (the rest need not travel to the driver)."""
    scores, _ = kmeans.nearest(embeddings_to_numpy(batch["embedding"]), fine, 1, geometry=geometry)  # type: ignore[arg-type]
    covered = pa.array(scores[:, 0] >= threshold)
    out = batch.select(["key"]).append_column("covered", covered)
    return out.append_column("embedding", pc.if_else(covered, None, batch["embedding"]))


@dataclass(frozen=True)
class Uncovered:
    """What the fine centres do not cover: counts over every valid sample, and a bounded sample of the
    uncovered embeddings (the new centres' k-means fits on it; the driver never holds more)."""

    valid: int
    count: int
    sample: np.ndarray


def uncovered_embeddings(
    cfg: Config, paths: RunPaths, fine: np.ndarray, threshold: float, geometry: str = "spherical"
) -> Uncovered:
    """Only uncovered rows reach the driver, and at most twice `clustering.max_sample` of them at a time (the
    smallest seeded key hashes, as prep samples)."""
    ds = read_embeddings(paths, cfg.data.s3, ["key", "reason", "embedding"])
    ds = ds.map_batches(only_valid, batch_format="pyarrow").map_batches(
        _score_rows, fn_kwargs={"fine": fine, "threshold": threshold, "geometry": geometry}, batch_format="pyarrow"
    )
    sample, valid, count = HashSample(cfg.clustering.seed, fine.shape[1], bound=cfg.clustering.max_sample), 0, 0
    for batch in ds.iter_batches(batch_format="pyarrow", batch_size=65536):
        valid += len(batch)
        uncovered = batch.filter(pc.invert(batch["covered"]))
        count += len(uncovered)
        if len(uncovered):
            sample.add(uncovered["key"].to_pylist(), embeddings_to_numpy(uncovered["embedding"]))
    return Uncovered(valid, count, sample.rows().astype(np.float32))


def grown_centroids(cfg: Config, cents: dict[str, Any], new: Uncovered, per_expert: dict[str, int]) -> dict[str, Any]:
    """New fine centres over the uncovered samples, mapped to new coarse clusters (one per typical expert's
    worth of samples); ids continue after the existing ones, so every existing expert keeps its own."""
    x = new.sample
    typical = float(np.median([n for n in per_expert.values() if n])) if per_expert else float(new.count)
    n_experts = max(1, round(new.count / max(typical, 1.0)))
    fine_per_expert = max(1, round(len(cents["fine"]) / len(cents["coarse"])))
    n_fine = int(min(n_experts * fine_per_expert, max(1, len(x) // 8)))
    n_experts = min(n_experts, n_fine)
    c, geometry = cfg.clustering, centroid_geometry(cents)  # new centres in the run's own geometry
    fit = kmeans.two_step(
        x, n_fine, n_experts, c.iterations, c.coarse_iterations, c.tol, c.seed, c.balanced, geometry=geometry
    )  # type: ignore[arg-type]
    old_fine, old_coarse = len(cents["fine"]), len(cents["coarse"])
    raw = {"fine_raw": np.vstack([cents["fine_raw"], fit.fine_raw]).astype(np.float32)} if "fine_raw" in cents else {}
    return {
        **cents,
        **raw,
        "fine": np.vstack([cents["fine"], fit.fine]).astype(np.float32),
        "coarse": np.vstack([cents["coarse"], fit.coarse]).astype(np.float32),
        "fine_to_coarse": np.concatenate([cents["fine_to_coarse"], fit.fine_to_coarse + old_coarse]),
        "fine_sizes": np.concatenate([cents["fine_sizes"], fit.fine_sizes]),
        "new_fine": np.arange(old_fine, old_fine + n_fine),
    }


def _npz(cents: dict[str, Any]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **{k: np.asarray(v) for k, v in cents.items()})
    return buf.getvalue()


def decide_stage(cfg: Config, name: str, upstream: str, force: bool) -> dict[str, Any]:
    """Coverage, new centres (if any), the run's centroids grown and versioned; the decision as a dict."""
    paths, gen = RunPaths(cfg.run_root), generation_paths(cfg, name)
    with stage_log("add-data: what is new") as log:
        settings = settings_hash(upstream, cfg.continual.model_dump(mode="json"))
        if stage_done(gen.clusters, settings, cfg.data.s3):
            log.skip("generations/" + name + "/clusters complete")
            return marker_info(gen.clusters, cfg.data.s3)["decision"]
        cents = read_centroids(paths.centroids, cfg.data.s3)
        applied = json.loads(str(cents.get("generations", "[]")))
        if name in applied:
            raise ValueError(f"generation {name!r} already grew {paths.centroids}; add the data under a new --name")
        if force and exists(gen.clusters, cfg.data.s3):
            raise ValueError("--force cannot redo a generation whose centres are in use; add it under a new --name")
        threshold = coverage_threshold(cfg, cents)
        new = uncovered_embeddings(cfg, gen, cents["fine"], threshold, centroid_geometry(cents))
        valid, n_new = new.valid, new.count
        per_expert = read_json(paths.prep_summary, cfg.data.s3)["per_expert"]
        version = int(cents.get("version", 1))
        decision: dict[str, Any] = {
            "valid_samples": valid,
            "uncovered": n_new,
            "coverage_threshold": threshold,
            "coverage_percentile": cfg.continual.coverage_percentile,
            "centroids_version": version,
            "new_experts": [],
        }
        grown = dict(cents)
        if n_new >= cfg.continual.min_expert_samples:
            grown = grown_centroids(cfg, cents, new, per_expert)
            new_coarse = sorted(set(grown["fine_to_coarse"][grown.pop("new_fine")].tolist()))
            decision["new_experts"] = [expert_name(e) for e in new_coarse]
            decision["new_fine_centres"] = int(len(grown["fine"]) - len(cents["fine"]))
            decision["why"] = f"{n_new} of {valid} samples below the coverage threshold: new experts"
        elif valid == 0:  # e.g. shards without the run's data.caption_field: say so, not "0 of 0 … join"
            decision["why"] = f"no new sample is valid: each is in {gen.rejects} with its reason"
        else:
            decision["why"] = (
                f"{n_new} of {valid} samples below the coverage threshold, fewer than "
                f"continual.min_expert_samples={cfg.continual.min_expert_samples}: they join their nearest experts"
            )
        grown.update(
            version=version + 1, coverage_threshold=threshold, generations=json.dumps([*applied, name])
        )  # fmt: skip
        write_bytes(gen.centroids, _npz(grown), cfg.data.s3)  # what the generation's manifest is assigned with
        archive = join(paths.clusters, "versions", f"centroids-v{version}.npz")
        write_bytes(archive, read_bytes(paths.centroids, cfg.data.s3), cfg.data.s3)
        write_bytes(paths.centroids, _npz(grown), cfg.data.s3)  # last: the run now routes to the grown centres
        decision["previous_centroids"] = archive
        mark_done(gen.clusters, settings, cfg.data.s3, decision=decision)
        log.done(decision["why"])
        return decision


def _plan_from_summary(summary: dict[str, Any]) -> Plan:
    """The plan the run's experts were trained on: a new expert gets exactly an existing expert's budget."""
    return Plan(
        schedule=Schedule(**summary["schedule"]),
        samples_per_epoch=summary["samples_per_epoch"],
        batch_size=summary["batch_size"],
        seed=None,
        tails=[],
        empty_experts=[],
    )


def grown_experts(cfg: Config, added: dict[str, int], new: list[str], trained: list[str]) -> list[str]:
    """The existing data experts in service whose partitions this generation grew (`added`: its samples per
    coarse id): what `--refresh-experts` retrains."""
    names = [expert_name(int(e)) for e, n in sorted(added.items(), key=lambda kv: int(kv[0])) if n]
    return in_service(cfg, [e for e in names if e in trained and e not in new])


def previous_version(cfg: Config, expert: str, name: str) -> str:
    """Where `expert`'s folder is kept as it was before generation `name` retrained it (copied once)."""
    archive = join(experts_dir(cfg), "versions", f"{expert}-before-{name}")
    if not exists(join(archive, MARKER), cfg.data.s3):
        copy_tree(experts_dir(cfg, expert), archive, cfg.data.s3)
    return archive


def generation_jobs(
    cfg: Config, name: str, new: list[str], refresh: list[str], plan: Plan, manifest_run: str
) -> list[TrainJob]:
    """The new experts, and the grown ones again (each its own job: from the seed, its budget, now over its
    grown partition — the trial reads every generation's rows, `train_data.training_roots`). A grown
    expert's previous version is kept first; its new marker names the settings `train` knows it by, so
    `train` keeps the refresh."""
    inputs = inputs_of(cfg, manifest_run)
    jobs = []
    for e in new + refresh:
        job = model_job(cfg, plan.tail(e, expert_id(e)), plan.schedule, inputs, None)
        if e in refresh:
            before = marker_info(previous_version(cfg, e, name), cfg.data.s3)
            job = replace(job, marker={"train_settings": before.get("train_settings", before["config_hash"])})
        jobs.append(job)
    return jobs


def train_generation(
    cfg: Config, name: str, new: list[str], refresh: list[str], manifest_run: str, force: bool
) -> tuple[list[str], list[str]]:
    """The new experts, from the seed on an existing expert's budget, and (when asked) the grown ones, as
    one DAG of Ray Train trials after the seed; no other model is loaded. Returns (new trained, refreshed) now."""
    plan = _plan_from_summary(read_json(RunPaths(cfg.run_root).experts_summary, cfg.data.s3))
    if cfg.training.batch_size != plan.batch_size:
        raise ValueError(
            f"training.batch_size is {cfg.training.batch_size} here but the run's experts trained with "
            f"{plan.batch_size}: add-data must use the run's own training settings (its config.yaml)"
        )
    jobs = generation_jobs(cfg, name, new, refresh, plan, manifest_run)
    known = {SEED: marker_info(experts_dir(cfg, SEED), cfg.data.s3)["config_hash"]}
    hashes = job_hashes(jobs, known)
    for job in jobs:  # mid-refresh, the folder is not the old expert any more
        if job.name in refresh and (force or not job_done(cfg, job, hashes[job.name])):
            claim(job.paths.out_dir, f"model {job.name}", cfg.data.s3)  # still ours without a marker
            clear_marker(job.paths.out_dir, cfg.data.s3)
    complete = "new and refreshed experts complete"
    done = train_stage(
        cfg, "add-data: train", jobs, plan.samples_per_epoch, force, "experts, from the seed", complete, known
    )
    return [e for e in new if e in done], [e for e in refresh if e in done]


def update_summary(cfg: Config, experts: list[str]) -> dict[str, Any]:
    """experts/summary.json gains the new experts (and the ensemble's compute grows by theirs)."""
    paths = RunPaths(cfg.run_root)
    summary = read_json(paths.experts_summary, cfg.data.s3)
    for e in experts:
        summary["models"][e] = read_json(join(experts_dir(cfg, e), "metrics.json"), cfg.data.s3)
    summary["compute"] = model_compute(summary["models"])
    write_json(paths.experts_summary, summary, cfg.data.s3)
    return summary


def run_add_data(cfg: Config, force: bool = False) -> dict[str, Any]:
    """The whole `add-data` for `continual.shards` as generation `continual.name`; every part skips itself
    when complete, so a rerun trains nothing."""
    from mode_ray.ray_env.runtime import ray_runtime

    paths = RunPaths(cfg.run_root)
    claim_run_root(cfg.run_root, cfg.data.s3)
    shards = cfg.continual.shards
    if not shards:
        raise ValueError("add-data needs the new data: --shards URL (continual.shards)")
    name = cfg.continual.name or f"gen-{settings_hash(shards)[:8]}"
    if not exists(paths.experts_summary, cfg.data.s3):
        raise ValueError(f"no trained experts under {cfg.run_root}: add-data grows a trained run")
    if SEED not in read_json(paths.experts_summary, cfg.data.s3)["models"]:  # said before any new data is read
        raise ValueError("add-data needs a run trained from a seed (training.use_seed): new experts start from it")
    gen_cfg = generation_config(cfg, name, shards)
    gen = generation_paths(cfg, name)
    with ray_runtime(cfg):
        embedded = embed_stage(gen_cfg, gen, force)
        decision = decide_stage(cfg, name, embedded, force)
        assigned = assign_stage(gen_cfg, gen, settings_hash(embedded, decision), force)
        with stage_log("add-data: summary") as log:
            prep = summarise(gen_cfg, gen)
            sizes = {e: prep["per_expert"].get(str(expert_id(e)), 0) for e in decision["new_experts"]}
            generation = {**prep, "name": name, "shards": shards, "manifest_run_id": assigned, **decision}
            generation["new_expert_sizes"] = sizes
            write_json(join(gen.root, "summary.json"), generation, cfg.data.s3)
            print_summary(prep)
            log.done(f"at {gen.root}/summary.json")
        models = list(read_json(paths.experts_summary, cfg.data.s3)["models"])
        grown = grown_experts(cfg, prep["per_expert"], decision["new_experts"], models)
        refresh = grown if cfg.continual.refresh_experts else []
        if decision["new_experts"] or refresh:
            build_generation_caches(cfg)  # this generation's and any earlier one's that trained nothing
        trained, refreshed = train_generation(cfg, name, decision["new_experts"], refresh, assigned, force)
        update_summary(cfg, decision["new_experts"] + refresh)
        for e in trained:
            record_added(cfg, e, name, sizes[e])
        for e in refreshed:
            record_refreshed(cfg, e, name, partition_size(cfg, e), previous_version(cfg, e, name))
    print_growth(generation, trained, {e: prep["per_expert"][str(expert_id(e))] for e in grown}, refresh, refreshed)
    return {**generation, "grown_experts": grown, "refreshed": refreshed}


def partition_size(cfg: Config, expert: str) -> int:
    """The expert's partition over the run's manifest and every generation added to it: what a refresh
    trains on (`train_data.training_roots`)."""
    coarse = str(expert_id(expert))
    summaries = [RunPaths(cfg.run_root).prep_summary] + [join(g, "summary.json") for g in generation_roots(cfg)]
    return sum(read_json(s, cfg.data.s3)["per_expert"].get(coarse, 0) for s in summaries if exists(s, cfg.data.s3))


def rollback_expert(cfg: Config, expert: str) -> str:
    """Put back the version of `expert` from before its last refresh; returns where it came from."""
    previous = last_refresh(cfg, expert)["previous"]
    remove_owned_tree(experts_dir(cfg, expert), cfg.data.s3)
    copy_tree(previous, experts_dir(cfg, expert), cfg.data.s3)
    update_summary(cfg, [expert])
    pop_refresh(cfg, expert)  # last: bumps the registry, so a running serve redeploys the restored version
    return previous


def print_growth(
    generation: dict[str, Any], trained: list[str], grown: dict[str, int], refresh: list[str], refreshed: list[str]
) -> None:
    new = generation["new_experts"]
    console.print(
        f"generation {generation['name']}: {generation['samples_in']} samples in, {generation['in_manifest']} "
        f"in its manifest, {generation['rejected_samples']} rejected; coverage threshold "
        f"{generation['coverage_threshold']:.3f} (p{generation['coverage_percentile']:g} of the run's own scores): "
        f"{generation['uncovered']} not covered"
    )
    if new:
        sizes = ", ".join(f"{e} ({generation['new_expert_sizes'][e]} samples)" for e in new)
        console.print(f"new experts: {sizes}; trained now: {', '.join(trained) or 'none (already complete)'}")
    else:
        console.print(f"no new expert: {generation['why']}")
    if grown:
        joined = ", ".join(f"{e} +{n}" for e, n in grown.items())
        if refresh:
            done = ", ".join(refreshed) or "none (already complete)"
            console.print(f"grown partitions: {joined}; refreshed now: {done}")
        else:
            console.print(f"grown partitions: {joined}, kept for their next retraining (add-data --refresh-experts)")
