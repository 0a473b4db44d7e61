"""Growing a trained run with new data (`mode-ray add-data`): new experts for a new domain only, trained alone,
the existing experts untouched byte for byte, routing and a running Serve app picking them up."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tarfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pyarrow.dataset as pads
import pytest
from PIL import Image

from mode_ray.demo import demo_data
from mode_ray.routing.router import TaskRouter
from tests.conftest import TRAINED_RUN_SETTINGS, TWO_WORKERS, demo_config, serve_port, undeploy

DISHES = ("ramen", "sushi", "pizza", "tacos", "curry", "dumplings")
SIDES = ("with a fried egg", "on a wooden table", "in a paper box", "with chopsticks", "next to a glass of beer")


def _food_shards(out: Path, n: int, seed: int = 0) -> set[str]:
    """A domain the demo data never shows: food photo captions over photo-like noise. Returns the keys."""
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True)
    keys = set()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for i in range(n):
            key = f"food{i:05d}"
            dish, side = rng.choice(DISHES), rng.choice(SIDES)
            caption = f"a plate of {dish} {side}"
            meta = {"caption": caption, "texts": [caption, f"{dish}, {side}"]}  # texts: the reference's form
            pixels = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
            image = io.BytesIO()
            Image.fromarray(pixels).save(image, format="JPEG")
            for suffix, payload in (("json", json.dumps(meta).encode()), ("jpg", image.getvalue())):
                info = tarfile.TarInfo(f"{key}.{suffix}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
            keys.add(key)
    (out / "0.tar").write_bytes(buf.getvalue())
    return keys


def _digests(root: Path, experts: list[str]) -> dict[str, str]:
    """Every file of the experts' folders (weights, training state, export, metrics), hashed."""
    out = {}
    for e in experts:
        for f in sorted((root / "experts" / e).rglob("*")):
            if f.is_file():
                out[str(f.relative_to(root))] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="module")
def grown_run(trained_run, tmp_path_factory):
    """A copy of the session's trained run (2 experts over the demo's four domains), so growing it leaves
    the run other tests read untouched."""
    cfg, _, _ = trained_run
    root = tmp_path_factory.mktemp("grow") / "run"
    shutil.copytree(cfg.run_root, root, ignore=shutil.ignore_patterns("train_runs", "eval", "moe"))
    sets = (*TRAINED_RUN_SETTINGS, "continual.min_expert_samples=40", "serve.ingress.num_cpus=0.1")
    return root, lambda *more: demo_config(root, cfg.data.shards, *sets, *more)


def test_known_domains_make_no_new_expert(ray_session, grown_run, tmp_path):
    from mode_ray.stages.grow import run_add_data

    root, config = grown_run
    known = tmp_path / "known"
    demo_data.generate(str(known), samples=150, shards=1, seed=99)
    before = (root / "clusters/centroids.npz").read_bytes()
    out = run_add_data(config(f"continual.shards={known}", "continual.name=known"))
    assert out["new_experts"] == [] and out["uncovered"] < 40 and "join their nearest" in out["why"]
    assert out["in_manifest"] == 150 and sum(out["per_expert"].values()) == 150  # covered: joined old experts
    grown = np.load(root / "clusters/centroids.npz")
    assert len(grown["fine"]) == len(np.load(io.BytesIO(before))["fine"]) and int(grown["version"]) == 2
    assert len(grown["fine_raw"]) == len(grown["fine"])  # raw means grow with the centres
    assert (root / "clusters/versions/centroids-v1.npz").read_bytes() == before  # the previous version kept


def test_a_new_domain_becomes_a_new_expert_trained_alone(ray_session, grown_run, tmp_path):
    from mode_ray.run_root.registry import read_registry
    from mode_ray.stages.grow import run_add_data

    root, config = grown_run
    old = _digests(root, ["seed", "expert-0", "expert-1", "generalist"])
    food = tmp_path / "food"
    keys = _food_shards(food, 160)
    cfg = config(f"continual.shards={food}", "continual.name=food", *TWO_WORKERS)  # the seed's run had 1 worker
    out = run_add_data(cfg)
    assert out["new_experts"] == ["expert-2"] and out["uncovered"] > 80, out  # most below the run's own p1
    assert out["per_expert"]["2"] > 150  # and nearly all nearest to the new centres once they exist
    assert _digests(root, ["seed", "expert-0", "expert-1", "generalist"]) == old  # untouched, byte for byte

    # Every new sample is in the new generation's manifest or its rejects; the run's manifest is not rewritten.
    gen = root / "generations" / "food"
    manifest = pads.dataset(gen / "manifest", format="parquet", partitioning="hive").to_table(["key"])
    rejects = pads.dataset(gen / "rejects", format="parquet").to_table(["key"])
    assert set(manifest["key"].to_pylist()) | {k for k in rejects["key"].to_pylist() if k} == keys

    summary = json.loads((root / "experts/summary.json").read_text())
    new = summary["models"]["expert-2"]
    assert new["start_step"] == summary["models"]["expert-0"]["start_step"]  # from the seed, same budget
    assert new["end_step"] == summary["models"]["expert-0"]["end_step"]
    own = new["samples_seen_by_cluster"].get("2", 0)
    assert own > 0.9 * new["samples_seen"]
    digests = json.loads((root / "experts/expert-2/metrics.json").read_text())["weights_sha256_by_rank"]
    assert len(digests) == 2 and digests[0] == digests[1]  # trained data-parallel, its ranks equal bit for bit
    assert read_registry(cfg)["experts"]["expert-2"]["cluster_size"] == out["new_expert_sizes"]["expert-2"]

    router = TaskRouter.from_run(str(root), cfg.embedding, cfg.eval.routing)
    weights = router.route(list(DISHES), ["a plate of {}."], method="calibrated").task_weights
    assert int(np.argmax(weights)) == 2, weights

    new_files = _digests(root, ["expert-2"])
    again = run_add_data(cfg)  # a rerun trains nothing
    assert again["new_experts"] == ["expert-2"] and _digests(root, ["expert-2"]) == new_files
    from mode_ray.stages.train import run_train

    assert "expert-2" in run_train(cfg)["models"]  # a rerun of `train` (nothing to do) keeps the added expert
    assert _digests(root, ["seed", "expert-0", "expert-1", "generalist"]) == old  # and retrains nothing


def test_a_served_app_picks_up_an_added_expert_without_failing_requests(ray_session, grown_run):
    import base64

    from mode_ray.run_root.registry import set_active
    from mode_ray.stages.serve import deploy

    root, config = grown_run
    cfg = config(f"serve.port={serve_port()}", "serve.experts.num_cpus=0.1")
    models = list(json.loads((root / "experts/summary.json").read_text())["models"])
    set_active(cfg, "expert-2", False, models)  # served without it first, as before add-data
    url = deploy(cfg)
    with tarfile.open(next(Path(cfg.data.shards).rglob("*.tar"))) as tar:
        member = next(m for m in tar if m.name.endswith(".jpg"))
        image = base64.b64encode(tar.extractfile(member).read()).decode()
    body = {"inputs": image, "parameters": {"candidate_labels": list(DISHES)}}
    statuses: list[int] = []
    stop = threading.Event()

    def requests_until_stopped() -> None:
        with httpx.Client(base_url=url, timeout=60) as client:
            while not stop.is_set():
                statuses.append(client.post("/", json=body).status_code)

    def served(client: httpx.Client) -> dict[str, dict]:
        return {e["id"]: e for e in client.get("/v1/experts").json()["experts"]}

    try:
        with httpx.Client(base_url=url, timeout=60) as client:
            assert "expert-2" not in served(client)
            thread = threading.Thread(target=requests_until_stopped)
            thread.start()
            time.sleep(1)
            set_active(cfg, "expert-2", True, models)
            deploy(cfg)  # what a running `mode-ray serve` does when the registry changes: an in-place update
            time.sleep(2)
            stop.set()
            thread.join()
            assert len(statuses) > 3 and set(statuses) == {200}, sorted(set(statuses))
            info = served(client)["expert-2"]
            assert info["added"] and info["generation"] == "food" and info["cluster_size"] > 100

            set_active(cfg, "expert-2", False, models)  # `mode-ray experts remove expert-2`
            deploy(cfg)
            assert "expert-2" not in served(client) and (root / "experts/expert-2/export").is_dir()
            assert client.post("/", json=body).status_code == 200
    finally:
        undeploy(cfg)


def test_a_run_without_a_seed_is_refused_before_its_new_data_is_read(grown_run, tmp_path):
    from mode_ray.run_root.ownership import claim_run_root
    from mode_ray.stages.grow import run_add_data

    root, config = grown_run
    seedless = tmp_path / "run"
    claim_run_root(str(seedless))
    summary = json.loads((root / "experts/summary.json").read_text())
    summary["models"].pop("seed")
    (seedless / "experts").mkdir()
    (seedless / "experts/summary.json").write_text(json.dumps(summary))
    cfg = config(f"continual.shards={tmp_path / 'new'}").model_copy(update={"run_root": str(seedless)})
    with pytest.raises(ValueError, match="trained from a seed"):
        run_add_data(cfg)
    assert not (seedless / "generations").exists()  # nothing embedded first


def test_experts_command_lists_and_refuses_unknown_names(grown_run):
    import subprocess
    import sys

    from tests.conftest import REPO

    root, _ = grown_run

    def mode_ray(*args: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "mode_ray.cli", "experts", *args, "--config", "configs/demo.yaml"]
        return subprocess.run([*cmd, "--set", f"run_root={root}"], cwd=REPO, capture_output=True, text=True)

    listed = mode_ray("list")
    assert listed.returncode == 0, listed.stderr
    assert "expert-0: in service" in listed.stderr and "from food" in listed.stderr
    unknown = mode_ray("remove", "expert-9")
    assert unknown.returncode == 2 and "no data expert 'expert-9'" in unknown.stderr
    never = mode_ray("rollback", "expert-0")
    assert never.returncode == 2 and "never refreshed" in never.stderr


def _files(folder: Path) -> dict[str, str]:
    return {
        str(f.relative_to(folder)): hashlib.sha256(f.read_bytes()).hexdigest() for f in folder.rglob("*") if f.is_file()
    }


def test_refresh_retrains_only_the_grown_experts_and_rolls_back(ray_session, grown_run, tmp_path):
    from mode_ray.run_root.registry import read_registry
    from mode_ray.stages.grow import rollback_expert, run_add_data
    from mode_ray.stages.train import run_train

    root, config = grown_run
    models = list(json.loads((root / "experts/summary.json").read_text())["models"])
    before = {m: _files(root / "experts" / m) for m in models}
    old_metrics = {m: json.loads((root / "experts" / m / "metrics.json").read_text()) for m in models}
    more = tmp_path / "more"
    demo_data.generate(str(more), samples=120, shards=1, seed=7, domains=["textures"])
    cfg = config(f"continual.shards={more}", "continual.name=more", "continual.refresh_experts=true")
    out = run_add_data(cfg)
    grown = out["grown_experts"]
    assert out["new_experts"] == [] and grown and out["refreshed"] == grown, out
    assert {m: _files(root / "experts" / m) for m in models if m not in grown} == {
        m: f for m, f in before.items() if m not in grown
    }  # every other model untouched, byte for byte
    rows = sum(json.loads(s.read_text())["in_manifest"] for s in (root / "generations").glob("*/summary.json"))
    registry = read_registry(cfg)["experts"]
    for e in grown:
        assert _files(root / "experts" / "versions" / f"{e}-before-more") == before[e]  # previous version kept
        new = json.loads((root / "experts" / e / "metrics.json").read_text())
        assert _files(root / "experts" / e) != before[e]
        assert (new["start_step"], new["end_step"]) == (old_metrics[e]["start_step"], old_metrics[e]["end_step"])
        assert new["manifest_rows"] == old_metrics[e]["manifest_rows"] + rows  # trained over every generation
        assert registry[e]["refreshes"][-1]["generation"] == "more"

    refreshed = {e: _files(root / "experts" / e) for e in grown}
    assert run_add_data(cfg)["refreshed"] == []  # a rerun retrains nothing
    run_train(cfg)  # and `train` keeps the refreshed experts as they are
    assert {e: _files(root / "experts" / e) for e in grown} == refreshed

    back = grown[0]
    rollback_expert(cfg, back)  # `mode-ray experts rollback`
    assert _files(root / "experts" / back) == before[back] and not read_registry(cfg)["experts"][back]["refreshes"]
    run_train(cfg)  # the rolled-back version is complete for `train` too
    assert _files(root / "experts" / back) == before[back]
    with pytest.raises(ValueError, match="never refreshed"):
        rollback_expert(cfg, back)


@pytest.mark.parametrize("geometry", ["spherical", "euclidean"])
def test_the_run_own_coverage_threshold_leaves_a_new_domain_uncovered_in_either_geometry(geometry):
    """add-data's coverage rule on real caption embeddings, without Ray: prep's assignment scores of a 240-pair
    demo run (`CentroidAssigner`, as the manifest stores them) give the threshold, their 1st percentile;
    add-data's scoring (`_score_rows`) must leave nearly every food caption uncovered and keep its embedding.
    `euclidean` is the reference preset's geometry, where a score is x·c − ‖c‖²/2 to a raw member mean, not a
    cosine: the rule must hold there too (the end-to-end add-data tests run the default, spherical)."""
    import pyarrow as pa

    from mode_ray import kmeans
    from mode_ray.encoders import build_encoder
    from mode_ray.stages.grow import _score_rows
    from mode_ray.stages.prep import CentroidAssigner, embeddings_to_arrow

    rng = np.random.default_rng(0)
    own = [json.loads(demo_data.make_sample(f"k{i}", rng, "train").members[0][1])["caption"] for i in range(240)]
    food = [f"a plate of {rng.choice(DISHES)} {rng.choice(SIDES)}" for _ in range(160)]
    encoder = build_encoder("minilm", "cpu")
    x, y = encoder.encode(own), encoder.encode(food)  # unit rows, as prep stores them

    def table(vectors: np.ndarray) -> pa.Table:
        keys = pa.array([f"t{i}" for i in range(len(vectors))])
        return pa.table({"key": keys, "embedding": embeddings_to_arrow(vectors)})

    fit = kmeans.two_step(x, 8, 2, geometry=geometry)
    scores = CentroidAssigner(fit.fine, fit.fine_to_coarse, False, geometry)(table(x))["score"].to_numpy()
    threshold = float(np.percentile(scores, 1))
    scored = _score_rows(table(y), fit.fine, threshold, geometry)
    covered = scored["covered"].to_numpy(zero_copy_only=False)
    assert covered.mean() < 0.1, (geometry, threshold)
    assert scored["embedding"].null_count == int(covered.sum())  # only the uncovered travel on
    own_covered = _score_rows(table(x), fit.fine, threshold, geometry)["covered"].to_numpy(zero_copy_only=False)
    assert own_covered.mean() >= 0.98  # the same scale as the manifest's: ~99% of the run's rows reach its p1
