"""An MCL stage's data on real Ray and tiny data: a bounded sample clustered on the driver, every training pair
labelled in the actor pool into Parquet, labels accumulated by row, cluster-homogeneous batches read back by id."""

from __future__ import annotations

import os

import numpy as np
import pyarrow.dataset as pads
import pytest

from mode_ray.run_root.ownership import claim_run_root
from tests.conftest import demo_config

SETTINGS = (
    "clustering.n_fine=8",
    "clustering.n_coarse=2",
    "training.decode_cache=false",  # the actors decode from the manifest (test_moe covers the decoded cache)
    "training.batch_size=16",
    "training.run.num_workers=2",
    "training.holdout_fraction=0.1",
    "moe.image_clusters=2",
    "moe.text_clusters=2",
)


@pytest.fixture(scope="module")
def mcl_run(ray_session, tmp_path_factory):
    """A prepped tiny run and a random-init dense model to embed with (memory and bookkeeping, not quality)."""
    from mode_ray.demo import demo_data
    from mode_ray.models.clip import build_clip, export_open_clip
    from mode_ray.stages.prep import run_prep

    shards = tmp_path_factory.mktemp("mcl-shards")
    demo_data.generate(str(shards), samples=240, shards=2, seed=13, faults=True)
    root = tmp_path_factory.mktemp("mcl-run")
    cfg = demo_config(root, shards, *SETTINGS)
    run_prep(cfg)
    base = export_open_clip(build_clip("mode-tiny")[0], "mode-tiny", str(tmp_path_factory.mktemp("base")))
    return cfg, base


def _labels(cfg, stage: int) -> dict[str, np.ndarray]:
    from mode_ray.data.mcl_plan import labels_dir

    table = pads.dataset(labels_dir(cfg, stage), format="parquet").to_table()  # files in name (= row id) order
    return {name: table[name].to_numpy(zero_copy_only=False) for name in table.column_names}


def _manifest_keys(cfg) -> list[str]:
    from mode_ray.data.mcl_plan import stage_rows
    from mode_ray.data.train_data import read_rows

    rows = stage_rows(cfg)
    return [k for f in rows.files for k in read_rows(rows.source, f["path"], 0, columns=["key"])["key"].to_pylist()]


def _all_pairs(cfg, base: str) -> dict[str, np.ndarray]:
    """Every training pair embedded in this process, in row order: what the stage used to collect."""
    from mode_ray.data.mcl_plan import PairEmbedder, stage_rows
    from mode_ray.data.train_data import held_out, read_rows

    rows = stage_rows(cfg)
    embedder = PairEmbedder(base, rows.source, rows.holdout, {})
    keys, images, texts = [], [], []
    for f in rows.files:
        table = read_rows(rows.source, f["path"], f["coarse_id"], columns=rows.source.base_columns)
        table = table.filter(~held_out(table["key"].to_pylist(), rows.holdout))
        ok, image, text = embedder.embed(table)
        keys += [k for k, good in zip(table["key"].to_pylist(), ok, strict=True) if good]
        images.append(image)
        texts.append(text)
    return {"key": np.array(keys), "image": np.concatenate(images), "text": np.concatenate(texts)}


def test_every_training_pair_is_labelled_as_full_data_clustering_labels_it(mcl_run) -> None:
    from mode_ray.data.mcl_plan import NONE, SKIPPED, prepare_stage, stage_rows
    from mode_ray.data.train_data import held_out
    from mode_ray.kmeans import mcl_stage_labels

    cfg, base = mcl_run
    facts = prepare_stage(cfg, 1, base, seed=1)
    labels = _labels(cfg, 1)
    rows = stage_rows(cfg)
    keys = _manifest_keys(cfg)
    assert labels["key"].tolist() == keys and (labels["row_id"] == np.arange(rows.total)).all()  # none lost
    out = held_out(keys, rows.holdout)
    assert (labels["label"][out] == NONE).all() and (labels["acc"][~out] >= 0).sum() == facts["rows"]
    assert (labels["label"][~out] >= 0).sum() + (labels["label"] == SKIPPED).sum() == (~out).sum()
    assert facts["skipped_images"] == (labels["label"] == SKIPPED).sum()
    assert sum(facts["clusters"].values()) == facts["rows"] and facts["steps"] > 0
    # Every pair fits in the default sample: the labels are those of k-means on every pair, same seed.
    pairs = _all_pairs(cfg, base)
    _, full = mcl_stage_labels(pairs["image"], pairs["text"], 2, 2, None, seed=1)
    labelled = labels["acc"] >= 0
    assert labels["key"][labelled].tolist() == pairs["key"].tolist()
    assert (labels["acc"][labelled] == full).all()


def test_batches_are_cluster_homogeneous_and_read_back_by_id(mcl_run) -> None:
    from mode_ray.data.mcl_plan import stage_name, stage_rows
    from mode_ray.data.train_data import PLAN_FILES, mcl_datasets, planned_items, planned_table, read_planned_rows
    from mode_ray.train.transforms import input_spec

    cfg, _ = mcl_run
    labels = _labels(cfg, 1)
    out = os.path.join(cfg.run_root, "moe", stage_name(1))
    with np.load(os.path.join(out, "plan.npz")) as data:
        plan = {name: data[name] for name in data.files}
    per_worker = cfg.training.batch_size // cfg.training.run.num_workers
    steps = [plan[f"rank{r}"].reshape(-1, per_worker) for r in range(cfg.training.run.num_workers)]
    for step in np.concatenate(steps, axis=1):  # one global batch: both ranks' shares
        assert len(set(labels["acc"][step])) == 1 and (labels["acc"][step] >= 0).all()
    rows = stage_rows(cfg)
    ids = plan["rank1"][: 3 * per_worker][::-1]  # any order, repeats allowed
    assert planned_table(rows.source, {k: plan[k] for k in PLAN_FILES}, ids)["key"].to_pylist() == list(
        labels["key"][ids]
    )
    url = os.path.join(out, "plan.npz")
    items = planned_items(0, len(plan["rank0"]), per_worker)[:2]
    read = read_planned_rows({k: np.array([i[k] for i in items]) for k in items[0]}, rows.source, url, seed=0)
    assert len(read["text"]) == 2 * per_worker and read["ok"].all()
    ranks = {r: len(plan[f"rank{r}"]) for r in range(2)}
    datasets = mcl_datasets(cfg, url, ranks, input_spec(cfg.training.model))
    assert datasets["train_rank0"].count() == ranks[0] and "holdout" in datasets


def test_a_later_stage_accumulates_the_previous_labels_by_row(mcl_run) -> None:
    from mode_ray.data.mcl_plan import prepare_stage

    cfg, base = mcl_run
    prepare_stage(cfg, 2, base, seed=2)
    first, second = _labels(cfg, 1), _labels(cfg, 2)
    assert (first["key"] == second["key"]).all()
    kept = first["acc"] >= 0
    assert ((second["acc"] >= 0) == kept).all()
    assert (second["acc"][kept] == first["acc"][kept] * 4 + second["label"][kept]).all()


def test_the_driver_clusters_a_bounded_sample_and_every_pair_is_labelled(mcl_run, tmp_path, monkeypatch) -> None:
    from mode_ray import kmeans
    from mode_ray.data import mcl_plan as mcl

    cfg, base = mcl_run
    root = tmp_path / "bounded"
    claim_run_root(str(root))
    os.symlink(os.path.join(cfg.run_root, "manifest"), root / "manifest")
    small = cfg.model_copy(
        update={"run_root": str(root), "moe": cfg.moe.model_copy(update={"cluster_sample_rows": 40})}
    )
    seen: list[int] = []
    fit = kmeans.mcl_fit

    def recording_fit(image, text, *args, **kwargs):
        seen.append(len(image))
        return fit(image, text, *args, **kwargs)

    monkeypatch.setattr(kmeans, "mcl_fit", recording_fit)
    facts = mcl.prepare_stage(small, 1, base, seed=1)
    labels = _labels(small, 1)
    assert seen == [40]  # far fewer than the pairs, and the bound exactly: the hash sample aims above it
    usable = (labels["label"] != mcl.NONE) & (labels["label"] != mcl.SKIPPED)
    assert facts["rows"] == usable.sum() > 4 * 40 and (labels["acc"][usable] >= 0).all()
