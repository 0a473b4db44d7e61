"""MoDE data prep on real Ray: every sample accounted for, clusters that find the domains, resumable, s3://."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import pytest

from mode_ray.config import S3Config
from mode_ray.demo import demo_data
from mode_ray.run_root.layout import RunPaths, read_centroids
from mode_ray.run_root.ownership import STAMP, claim
from mode_ray.stages.prep import run_prep
from tests.conftest import demo_config, session_workers


def _tar_samples(root: Path) -> dict[str, dict]:
    """key -> parsed json (or None) for every sample in the shards, read with tarfile only."""
    out: dict[str, dict] = {}
    for tar_path in sorted(root.rglob("*.tar")):
        try:
            with tarfile.open(tar_path, mode="r|") as tar:
                for member in tar:
                    key = member.name.split(".")[0]
                    data = tar.extractfile(member).read()
                    if member.name.endswith(".json"):
                        try:
                            out[key] = json.loads(data)
                        except ValueError:
                            out[key] = None
                    else:
                        out.setdefault(key, None)
        except tarfile.ReadError:
            pass
    return out


def _manifest(run_root: str, columns=("key", "fine_id", "coarse_id", "score")) -> dict[str, tuple]:
    table = pads.dataset(f"{run_root}/manifest", format="parquet", partitioning="hive").to_table(columns=list(columns))
    rows = table.to_pylist()
    return {r["key"]: tuple(r[c] for c in columns[1:]) for r in rows}


def _rejects(run_root: str) -> list[dict]:
    return pads.dataset(f"{run_root}/rejects", format="parquet").to_table().to_pylist()


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("prep-shards")
    record = demo_data.generate(str(out), samples=800, shards=4, seed=11, faults=True)
    return out, record


@pytest.fixture(scope="module")
def local_run(ray_session, shards, tmp_path_factory):
    root, _ = shards
    run_root = tmp_path_factory.mktemp("prep-run")
    cfg = demo_config(run_root, root)
    summary = run_prep(cfg)
    return cfg, summary


def test_every_sample_is_in_manifest_or_rejects(shards, local_run):
    root, record = shards
    cfg, summary = local_run
    manifest = _manifest(cfg.run_root)
    rejects = _rejects(cfg.run_root)
    rejected_keys = [r["key"] for r in rejects if r["key"] is not None]
    assert len(rejected_keys) == len(set(rejected_keys))
    assert not set(manifest) & set(rejected_keys)
    every_key = set(_tar_samples(root))
    truncated = next(f for f in record["faults"] if f["kind"] == "truncated_tar")
    every_key |= set(truncated["keys"])
    assert set(manifest) | set(rejected_keys) == every_key
    assert summary["samples_in"] == record["samples"] == len(every_key)
    # Every injected fault is rejected, with the reason dataset.json gives.
    reasons = {r["key"]: r["reason"] for r in rejects if r["key"] is not None}
    for fault in record["faults"]:
        if fault["kind"] == "truncated_tar":
            assert set(truncated["intact_keys"]) <= set(manifest)  # salvaged from the damaged shard
            lost = set(truncated["keys"]) - set(truncated["intact_keys"])
            assert all(reasons[k] == "unreadable_shard" for k in lost)
        else:
            assert reasons[fault["key"]] == fault["reason"], fault
    shard_level = [r for r in rejects if r["key"] is None]
    assert len(shard_level) == 1 and shard_level[0]["shard"].endswith(truncated["shard"])
    assert summary["rejects_by_reason"]["unreadable_shard"] == 2
    assert sum(summary["per_expert"].values()) == len(manifest)


def test_small_outputs_are_one_file_a_partition_whatever_embeddings_holds(local_run):
    """Prep reads `embeddings/` (a file per written block) in blocks of Ray Data's target size, so the manifest
    holds one file per coarse partition and rejects one file besides the listing while they fit a block: the
    files and row groups training reads in order, which a read task per file would split (and so change every
    model's data order)."""
    cfg, _ = local_run
    run = Path(cfg.run_root)
    assert len(list((run / "embeddings").glob("*.parquet"))) > 1
    partitions = [p for p in (run / "manifest").iterdir() if p.is_dir()]
    assert partitions and all(len(list(p.glob("*.parquet"))) == 1 for p in partitions)
    assert sorted(p.name for p in (run / "rejects").glob("*.parquet")) == ["listing.parquet", "part-000000.parquet"]


def test_clusters_find_the_domains_and_are_balanced(shards, local_run):
    root, _ = shards
    cfg, summary = local_run
    domains = {k: (m or {}).get("domain") for k, m in _tar_samples(root).items()}
    manifest = _manifest(cfg.run_root)
    counts = Counter((coarse, domains.get(key)) for key, (_, coarse, _) in manifest.items())
    labelled = [(c, d) for (c, d) in counts.elements() if d in demo_data.DOMAINS]
    per_cluster: dict[int, Counter] = {}
    for c, d in labelled:
        per_cluster.setdefault(c, Counter())[d] += 1
    purity = sum(max(cnt.values()) for cnt in per_cluster.values()) / len(labelled)
    assert purity >= 0.9, per_cluster
    sizes = np.array(summary["fine_sizes_on_sample"])
    assert sizes.max() <= 1.1 * sizes.mean()
    cents = read_centroids(RunPaths(cfg.run_root).centroids)
    assert cents["fine"].shape == (16, 384) and cents["coarse"].shape == (4, 384)
    assert str(cents["encoder_id"]) == "minilm:all-MiniLM-L6-v2"
    # the raw member means beside the unit centres (the reference router's), and how far the geometries differ
    raw_norms = np.linalg.norm(cents["fine_raw"], axis=1)
    assert str(cents["geometry"]) == "spherical" and (raw_norms < 1).all() and (raw_norms > 0.3).all()
    np.testing.assert_allclose(cents["fine_raw"] / raw_norms[:, None], cents["fine"], atol=1e-5)
    clustering = summary["clustering"]
    assert 0 <= clustering["geometries_disagree_on"] <= clustering["sample_size"]
    # Fine ids, coarse ids and scores are consistent with the centroids.
    key, (fine, coarse, score) = next(iter(manifest.items()))
    assert cents["fine_to_coarse"][fine] == coarse and 0 < score <= 1.0001
    expert0 = pads.dataset(f"{cfg.run_root}/manifest/coarse_id=0", format="parquet").to_table()
    assert expert0.num_rows == summary["per_expert"]["0"]
    assert {"image", "caption", "shard", "fine_id"} <= set(expert0.column_names)


def test_rerun_skips_and_interrupted_run_resumes_to_the_same_manifest(ray_session, local_run, tmp_path, capsys):
    cfg, summary = local_run
    markers = sorted(Path(cfg.run_root).rglob("_SUCCESS"))
    before = [m.read_text() for m in markers]
    assert run_prep(cfg) == summary
    assert [m.read_text() for m in markers] == before  # nothing redone
    assert capsys.readouterr().err.count("skipped") >= 3

    # A run killed during clustering: embeddings/ and rejects/ complete, clusters/ and manifest/ half-written.
    # Each stage claimed (stamped) its folder before writing, as the run root was claimed.
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copy(Path(cfg.run_root) / STAMP, resumed / STAMP)
    for stage in ("embeddings", "rejects"):
        shutil.copytree(Path(cfg.run_root) / stage, resumed / stage)
    for stage in ("clusters", "manifest"):
        claim(str(resumed / stage), stage)
    (resumed / "clusters/centroids.npz").write_bytes(b"partial")
    (resumed / "manifest/coarse_id=0").mkdir(parents=True)
    (resumed / "manifest/coarse_id=0/stale.parquet").write_bytes(b"partial")
    cfg2 = cfg.model_copy(update={"run_root": str(resumed)})
    run_prep(cfg2)
    first_manifest, resumed_manifest = _manifest(cfg.run_root), _manifest(str(resumed))
    assert {k: v[:2] for k, v in resumed_manifest.items()} == {k: v[:2] for k, v in first_manifest.items()}
    for key, (_, _, score) in resumed_manifest.items():  # BLAS batching may move the last float bit
        assert score == pytest.approx(first_manifest[key][2], abs=1e-5)
    first, second = (read_centroids(f"{r}/clusters/centroids.npz") for r in (cfg.run_root, resumed))
    np.testing.assert_array_equal(first["fine"], second["fine"])  # same seed, same centroids
    assert not (resumed / "manifest/coarse_id=0/stale.parquet").exists()


def test_force_keeps_what_mode_ray_did_not_write(ray_session, local_run, tmp_path):
    cfg, _ = local_run
    run = tmp_path / "run"
    shutil.copytree(cfg.run_root, run)
    (run / "notes.txt").write_text("my notes")  # a file of the user's beside the stages
    (run / "analysis").mkdir()
    (run / "analysis" / "plot.png").write_bytes(b"png")
    before = (run / "manifest" / "_SUCCESS").read_text()
    run_prep(cfg.model_copy(update={"run_root": str(run)}), force=True)
    assert (run / "manifest" / "_SUCCESS").read_text() != before  # every stage redone
    assert (run / "notes.txt").read_text() == "my notes"
    assert (run / "analysis" / "plot.png").read_bytes() == b"png"


def test_s3_run_matches_local(ray_session, s3_endpoint, shards, local_run):
    _, record = shards
    cfg, summary = local_run
    s3 = S3Config(endpoint_url=s3_endpoint, region="us-east-1")
    demo_data.generate("s3://mode-test/shards", samples=800, shards=4, seed=11, faults=True, s3=s3)
    s3_cfg = demo_config(
        "s3://mode-test/run",
        "s3://mode-test/shards",
        f"data.s3.endpoint_url={s3_endpoint}",
        "data.s3.region=us-east-1",
    )
    s3_summary = run_prep(s3_cfg)
    for field in ("samples_in", "in_manifest", "rejected_samples", "rejects_by_reason", "per_expert"):
        assert s3_summary[field] == summary[field], field
    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=s3_endpoint)
    assert fs.exists("mode-test/run/clusters/centroids.npz")
    assert fs.exists("mode-test/run/prep/summary.json")
    assert any(p.endswith(".parquet") for p in fs.find("mode-test/run/manifest/coarse_id=1"))
    with fs.open("mode-test/run/prep/summary.json") as f:
        assert json.load(io.TextIOWrapper(f))["samples_in"] == record["samples"]


def _outage_after_listing(monkeypatch, s3_server, restart_after_s: float | None) -> list[str]:
    """The S3 endpoint goes away right after the shards are listed, before any is read; it comes back
    after `restart_after_s` (None: not during the run). Returns the shards listed, once it went down."""
    import threading

    from mode_ray.samples.shards import list_shards as listed
    from mode_ray.stages import prep

    down: list[str] = []

    def list_then_fail(*args, **kwargs):
        out = listed(*args, **kwargs)
        s3_server.stop()
        down.extend(out[0])
        if restart_after_s is not None:
            threading.Timer(restart_after_s, s3_server.start).start()
        return out

    monkeypatch.setattr(prep, "list_shards", list_then_fail)
    return down


def test_s3_outage_is_ridden_out_or_each_shard_rejected_with_its_reason(
    ray_session, s3_server, shards, local_run, tmp_path, monkeypatch
):
    import time

    from mode_ray.samples.rejects import Reason

    _, summary = local_run
    s3 = S3Config(endpoint_url=s3_server.endpoint, region="us-east-1")
    demo_data.generate("s3://mode-test/outage", samples=800, shards=4, seed=11, faults=True, s3=s3)
    sets = ("data.s3.endpoint_url=" + s3_server.endpoint, "data.s3.region=us-east-1")

    # Down for 3 s while the shards are read: the reads are retried with backoff, nothing is lost.
    down = _outage_after_listing(monkeypatch, s3_server, restart_after_s=3.0)
    brief = run_prep(demo_config(tmp_path / "brief", "s3://mode-test/outage", *sets))
    assert down and s3_server.server is not None
    for field in ("samples_in", "in_manifest", "rejected_samples", "rejects_by_reason", "per_expert"):
        assert brief[field] == summary[field], field

    # Down for good: after its attempts every shard is a shard-level reject with the reason — never a hang.
    down = _outage_after_listing(monkeypatch, s3_server, restart_after_s=None)
    cfg = demo_config(tmp_path / "gone", "s3://mode-test/outage", *sets, "data.s3.max_attempts=2")
    start = time.monotonic()
    try:
        with pytest.raises(ValueError, match="no valid samples|no samples"):
            run_prep(cfg)
    finally:
        s3_server.start()
    assert time.monotonic() - start < 120
    lost = [r for r in _rejects(cfg.run_root) if r["stage"] == "read"]
    assert {r["shard"] for r in lost} == set(down)  # every listed shard, each with the reason
    assert all(r["reason"] == Reason.UNREADABLE_SHARD and "could not open the shard" in r["detail"] for r in lost)


def test_the_clustering_sample_is_bounded_while_it_streams_and_is_the_first_by_hash(local_run):
    """`clustering.max_sample` bounds what the driver holds: the bounded sample is exactly the first rows of
    the unbounded one (smallest seeded hashes, ties by key)."""
    from mode_ray.run_root.layout import RunPaths
    from mode_ray.stages.prep import load_cluster_sample

    cfg, _ = local_run

    def sample(bound: int | None) -> np.ndarray:
        clustering = cfg.clustering.model_copy(update={"max_sample": bound, "sample_fraction": 1.0})
        return load_cluster_sample(cfg.model_copy(update={"clustering": clustering}), RunPaths(cfg.run_root))

    everything, bounded = sample(None), sample(40)
    assert len(everything) > 4 * 40 and len(bounded) == 40
    np.testing.assert_array_equal(bounded, everything[:40])


def test_two_actors_each_killed_once_write_the_bytes_of_one_undisturbed_actor(ray_session, shards, local_run, tmp_path):
    """Two embedding and assignment actors instead of one, and SIGKILL (not an exception) to an embedding
    actor and to an assignment actor while they work: Ray restarts them and retries their batches, and the
    embeddings, rejects, manifest (row order within each partition included) and centroids are byte-identical
    to the undisturbed one-actor run's. (One run shows both: were either the actor count or a kill to change a
    byte, the files would differ.)"""
    import os
    import signal
    import threading
    import time

    root, _ = shards
    cfg, _ = local_run
    killed: list[str] = []
    stop = threading.Event()
    out = tmp_path / "two"

    def mid_way(actor: str) -> bool:  # the embedder once its first output is written; the assigner at once
        return actor != "CaptionEmbedder" or any((out / "embeddings").glob("*.parquet"))

    def kill_each_once() -> None:
        for actor in ("CaptionEmbedder", "CentroidAssigner"):
            while not stop.is_set():
                pids = session_workers(actor)
                if pids and mid_way(actor):
                    os.kill(pids[0], signal.SIGKILL)
                    killed.append(actor)
                    break
                time.sleep(0.02)

    killer = threading.Thread(target=kill_each_once, daemon=True)
    killer.start()
    two = demo_config(
        out, root, "embedding.min_actors=2", "embedding.max_actors=2", "embedding.num_cpus_per_actor=0.25"
    )
    try:
        run_prep(two)
    finally:
        stop.set()
        killer.join()
    assert killed == ["CaptionEmbedder", "CentroidAssigner"]

    def files(run_root: str, folder: str) -> dict[str, bytes]:
        base = Path(run_root, folder)
        return {str(p.relative_to(base)): p.read_bytes() for p in sorted(base.rglob("*.parquet"))}

    for folder in ("embeddings", "rejects", "manifest"):
        assert files(cfg.run_root, folder) == files(two.run_root, folder), folder
    with (
        np.load(Path(cfg.run_root, "clusters/centroids.npz")) as a,
        np.load(Path(two.run_root, "clusters/centroids.npz")) as b,
    ):
        assert a.files == b.files and all(np.array_equal(a[k], b[k]) for k in a.files)
